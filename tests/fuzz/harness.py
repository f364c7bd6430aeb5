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

A target is a module ``tests/fuzz/<name>.py`` defining ``TARGET``, and nothing else needs
to name it: the test suite, ``run.py`` and ``bench/fuzz.py`` find it by its file. Its
``one`` takes an input and lets only the component's own errors pass; any other exception
is a finding.
This module imports nothing from popek, so that the runner can import the target (and
popek with it) under atheris's instrumentation.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
# Every module here but these is a target: adding one is adding its file (and, once
# something was found, its corpus directory).
_NOT_TARGETS = {"__init__", "harness", "run"}
TARGETS = tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                       if p.stem not in _NOT_TARGETS and not p.stem.startswith("test_")))

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

    def checked(*args: Any, **kwargs: Any) -> R:
        tracemalloc.start()
        try:
            return fn(*args, **kwargs)
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
def idle_snapshot(disk: Path | None = None, nic: bool = False) -> bytes:
    """A real snapshot file: a tiny bare-metal guest (16 MiB) waiting for interrupts, with
    ``disk`` as its virtio disk if given, and a NIC (a stream socket's) if ``nic``."""
    from popek.machine.config import DiskSpec, MachineConfig, NicSpec
    from popek.machine.runner import EventSources
    from popek.machine.virt import VirtMachine
    from popek.net.stream import StreamBackend
    from popek.vmm import snapshot
    from tests.vmm_guests import guest

    out = bytearray()
    config = MachineConfig(kernel=guest("idle"), mem=16 << 20,
                           disks=[DiskSpec(disk)] if disk else [],
                           nics=[NicSpec("stream", connect="/nonexistent/popek-fuzz.sock")]
                           if nic else [])
    ours, theirs = socket.socketpair()
    with ours, theirs:
        machine = VirtMachine(config, out.extend, nets=[StreamBackend(ours)] if nic else [],
                              events=EventSources())
        while b"idle ready" not in out:
            machine.run_slice()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "idle.snap"
            snapshot.save(path, machine, {"console_bytes": len(out)})
            return path.read_bytes()


class JsonEdits:
    """Edits to a JSON tree, read from bytes (a file that checksums or a schema guard is
    best fuzzed through its parsed tree, so every field meets wrong types and values
    while the JSON stays valid): walk down (a byte with its top bit set, then
    a child index), then a value: null, true, false, a 64-bit or a small integer, a
    double (NaN and infinities too), a string, an empty list or object, deletion, or the
    old string with some hex digits changed (hart registers are saved as hex)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1] if self.pos <= len(self.data) else 0

    def _take(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n:self.pos].ljust(n, b"\0")

    def apply(self, tree: Any) -> Any:
        while self.pos < len(self.data):
            parent, key, node = None, None, tree
            while isinstance(node, dict | list) and node and self._byte() & 0x80:
                keys = list(node) if isinstance(node, dict) else range(len(node))
                parent, key = node, keys[self._byte() % len(keys)]
                node = node[key]
            value = self._value(node)
            if parent is None:
                tree = None if value is DELETE else value
            elif value is DELETE:
                del parent[key]
            else:
                parent[key] = value
        return tree

    def _value(self, old: Any) -> Any:
        kind = self._byte() % 11
        if kind == 10 and type(old) is str and old:  # the same string, some digits changed
            at, digits = self._byte() * 2 % len(old), self._take(self._byte() % 8)
            patch = "".join("0123456789abcdef"[b % 16] for b in digits)
            return (old[:at] + patch + old[at + len(patch):])[:len(old)]
        if kind < 3:
            return (None, True, False)[kind]
        if kind == 3:
            return struct.unpack("<q", self._take(8))[0]
        if kind == 4:
            return self._byte() - 128
        if kind == 5:
            return struct.unpack("<d", self._take(8))[0]
        if kind == 6:
            return self._take(self._byte() % 32).decode("latin-1")
        return ([], {}, DELETE, DELETE)[kind - 7]





DELETE = object()


def json_value(fdp: Any, depth: int, favourites: list[Any]) -> Any:
    """Any JSON value drawn from atheris's ``FuzzedDataProvider`` (NaN and infinities
    included, as Python's json reads them), sometimes one of the ``favourites`` (the
    values a component's checks turn on)."""
    kind = fdp.ConsumeIntInRange(0, 7 if depth > 0 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 16))
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind == 4:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 16))
    if kind == 5:
        return fdp.PickValueInList(favourites)
    if kind == 6:
        return [json_value(fdp, depth - 1, favourites)
                for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.ConsumeUnicode(4): json_value(fdp, depth - 1, favourites)
            for _ in range(fdp.ConsumeIntInRange(0, 3))}


def read_records(data: bytes, kinds: Sequence[struct.Struct],
                 with_bytes: Collection[struct.Struct] = ()
                 ) -> Iterator[tuple[struct.Struct, tuple[Any, ...], bytes]]:
    """A target's input read as a program of records: each a byte choosing one of
    ``kinds`` (modulo their number), then that struct's fields; a record of ``with_bytes``
    is followed by as many bytes as its last field says (fewer at the input's end). Yields
    (kind, fields, those bytes); stops at a record the input cuts short."""
    pos = 0
    while pos < len(data):
        kind = kinds[data[pos] % len(kinds)]
        if pos + 1 + kind.size > len(data):
            return
        fields = kind.unpack_from(data, pos + 1)
        pos += 1 + kind.size
        tail = b""
        if kind in with_bytes:
            tail, pos = data[pos:pos + fields[-1]], pos + fields[-1]
        yield kind, fields, tail


@contextlib.contextmanager
def worker(spec: dict[str, Any], nics: int = 0) -> Iterator[Any]:
    """A VMM worker (:class:`popek.vmm.worker.Worker`) given ``spec`` as a launch gives
    it, without the process: its listening socket and exit record are throwaway ones, and
    it gets ``nics`` NIC host ends (stream sockets whose peers have sent one broadcast
    frame, QEMU-framed, and then stay silent). Everything is closed on the way out."""
    from popek.net.endpoint import HostEnd
    from popek.vmm.hostfiles import PassedFd
    from popek.vmm.worker import Worker

    pairs = [socket.socketpair() for _ in range(nics)]
    frame = b"\xff" * 6 + bytes.fromhex("525400abcdef0800") + bytes(46)
    for _, theirs in pairs:
        theirs.send(len(frame).to_bytes(4, "big") + frame)
    with socket.socket(socket.AF_UNIX) as listener, open(os.devnull, "wb") as record:
        try:
            yield Worker(listener, {**spec, "vm_id": "fuzz", "vmm_uid": os.geteuid(),
                                    "exit_record": PassedFd(record.fileno()),
                                    "nics": [HostEnd("stream", ours) for ours, _ in pairs]})
        finally:
            for ours, theirs in pairs:
                ours.close()
                theirs.close()


def scratch_dir(name: str) -> Path:
    """A directory of this process's own, for a target whose component needs a real one
    (the VMM's state directory). libFuzzer's exit() skips Python's clean-up, so each run
    removes those that processes no longer running left behind. In memory where the
    host has /dev/shm: components that flush files to disk (atomic records) cost little
    there."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    for old in base.glob(f"popek-fuzz-{name}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"popek-fuzz-{name}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def corpus_files(name: str) -> list[Path]:
    directory = CORPUS / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
