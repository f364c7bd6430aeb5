"""What every fuzz target shares: its description, in-memory files, and the run settings.

The engine is atheris (PyPI, a manylinux wheel for CPython 3.11: no compiler needed):
libFuzzer driving Python code whose bytecode atheris instruments for coverage. It was
chosen over hypothesis because most targets read bytes whose meaning lies deep inside a
format (snapshot files, ELF and Image kernels, virtqueue rings in guest RAM): coverage
feedback finds the inputs that pass a magic number, a checksum or a descriptor check and
reach the next layer, which a generator without feedback rarely does; libFuzzer keeps
what it learnt as a corpus of plain files that CI replays; and it enforces the other two
failures a target must never show, a hang (``-timeout``) and runaway memory
(``-rss_limit_mb``). Where a grammar fits, a target reads structure from the bytes
instead of taking them whole, hypothesis-style: the API target builds JSON requests with
atheris's ``FuzzedDataProvider``, the virtio target reads a fake driver's program of
fixed-size records, the snapshot target edits a real snapshot's metadata. So one engine,
one corpus format and one runner serve every target.

A target is a module ``tests/fuzz/<name>.py`` defining ``TARGET``. Its ``one`` takes an
input and lets only the component's own errors pass; any other exception is a finding.
This module imports nothing from popek, so that the runner can import the target (and
popek with it) under atheris's instrumentation.
"""

from __future__ import annotations

import functools
import os
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
TARGETS = ("decoder", "virtio", "snapshot", "kernel", "elf", "api")

R = TypeVar("R")
CI_SEED = 1
TIMEOUT_SECONDS = 30  # an input that runs longer is a hang
RSS_LIMIT_MB = 2048  # a process that grows past this is a finding (runaway allocation)


@dataclass(frozen=True)
class Target:
    """One fuzz target."""

    one: Callable[[bytes], None]  # runs one input; only the component's own errors pass
    ci_runs: int  # new inputs a CI run tries after replaying the corpus
    max_len: int = 4096  # longest input libFuzzer builds
    # Inputs made at start-up (a real snapshot, a real kernel): name -> bytes.
    seeds: Callable[[], dict[str, bytes]] = field(default=lambda: {})
    # RLIMIT_AS for the fuzzing process, so an allocation a length field asked for fails
    # there and then (None: the component maps a huge sparse region by design).
    address_space: int | None = 8 << 30


def heap_checked(fn: Callable[..., R], limit: int) -> Callable[..., R]:
    """``fn``, failing any call during which the Python heap grew by more than ``limit``.

    Header fields and compressed streams must not make a component allocate more than
    its input could need. tracemalloc measures that exactly, per call (guest RAM is an
    mmap, and not counted); it slows every allocation, so targets wrap the parsers they
    test rather than the machine built around them."""

    def checked(*args: Any) -> R:
        tracemalloc.start()
        try:
            return fn(*args)
        finally:  # the component's own error may come after the allocation, as well
            grown = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert grown <= limit, f"{fn.__qualname__} took {grown >> 20} MiB, over {limit >> 20}"

    return checked


class MemFile:
    """A file without a directory (memfd): what a target hands to code that opens paths.

    ``path`` names it through /proc, so loaders open and map it like any file, and nothing
    is left behind when libFuzzer ends the process with exit(), which skips Python's
    clean-up."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(name)
        self.path = Path(f"/proc/{os.getpid()}/fd/{self.fd}")

    def set(self, data: bytes, size: int | None = None) -> None:
        """Make the file ``data``, then holes up to ``size`` bytes (sparse), if given."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        if size is not None:
            os.ftruncate(self.fd, size)

    def put(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)


@functools.cache
def idle_snapshot(disk: Path | None = None) -> bytes:
    """A real snapshot file: a tiny bare-metal guest (16 MiB) waiting for interrupts, with
    ``disk`` as its virtio disk if given."""
    from popek.machine.config import DiskSpec, MachineConfig
    from popek.machine.virt import VirtMachine
    from popek.vmm import snapshot
    from tests.vmm_guests import guest

    out = bytearray()
    config = MachineConfig(kernel=guest("idle"), mem=16 << 20,
                           disks=[DiskSpec(disk)] if disk else [])
    machine = VirtMachine(config, out.extend)
    while b"idle ready" not in out:
        machine.run_slice()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idle.snap"
        snapshot.save(path, machine, {"console_bytes": len(out)})
        return path.read_bytes()


def corpus_files(name: str) -> list[Path]:
    directory = CORPUS / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
