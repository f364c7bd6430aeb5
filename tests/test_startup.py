"""Start-up: what ``popek exec`` and ``popek run`` import before (and, for a short program,
after) the guest runs, and the cache of decompressed images that spares a boot its lzma.

A short program's ``popek exec`` is mostly start-up, and imports are most of that: the
modules named here took ~0.1 s between them before they were imported only where used.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import lzma
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from popek import images
from popek.cli import GC_THRESHOLDS
from popek.machine import image_cache, loader
from popek.machine.config import MachineConfig
from popek.machine.image_cache import HEADER, ImageCache
from popek.machine.loader import ImageError, read_image
from popek.machine.virt import RAM_BASE, VirtMachine

REPO = Path(__file__).resolve().parents[1]
HELLO = REPO / "images" / "programs" / "hello-static"

# Imported by neither command unless asked for (--gdb, NICs, containers, an ELF kernel,
# tier 2, a stencil library to build): each cost milliseconds of every start.
HEAVY = ("elftools", "multiprocessing", "socket", "subprocess", "platform", "secrets",
         "logging", "importlib.resources", "llvmlite.binding", "popek.gdb", "popek.isa.disasm",
         "popek.net.endpoint", "popek.user.container.isolation")

# Prints the modules imported when the guest's first instruction would run, and stops.
UNTIL_FIRST_INSTRUCTION = """
import json, os, sys
from popek.engine.engine import Engine

def first_instruction(self, *args, **kwargs):
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
    os._exit(0)

Engine.run = first_instruction
from popek.cli import main
main(sys.argv[1:])
"""

# Runs the whole command, then prints the modules imported.
WHOLE_RUN = """
import json, sys
from popek.cli import main
status = main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
sys.exit(status)
"""


def imported(probe: str, args: list[str], **env: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    return set(json.loads(result.stderr.decode().splitlines()[-1]))


def heavy_in(modules: set[str]) -> list[str]:
    return [name for name in HEAVY if name in modules]


def test_popek_exec_of_a_short_program_imports_none_of_the_heavy_modules():
    modules = imported(WHOLE_RUN, ["exec", str(HELLO)])
    assert "popek.user.process" in modules  # (it did run)
    assert heavy_in(modules) == []


def test_popek_run_reaches_the_first_instruction_without_the_heavy_modules(tmp_path: Path):
    modules = imported(UNTIL_FIRST_INSTRUCTION, ["run"],
                       **{image_cache.ENV_VAR: str(tmp_path)})
    assert "popek.machine.virt" in modules
    assert heavy_in(modules) == []


def test_the_popek_command_freezes_its_imports_and_collects_afterwards():
    """The ``popek`` command's imports are frozen out of the garbage collector's view, and
    the collector runs again for what the guest's run makes."""
    probe = """
import gc, json, sys
from popek.engine.engine import Engine
from popek.cli import main

def first_instruction(self, *args, **kwargs):
    print(json.dumps([gc.isenabled(), gc.get_freeze_count(), gc.get_threshold()]))
    sys.exit(0)

Engine.run = first_instruction
main(sys.argv[1:], whole_process=True)
"""
    result = subprocess.run([sys.executable, "-c", probe, "exec", str(HELLO)],
                            capture_output=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    enabled, frozen, thresholds = json.loads(result.stdout.decode().splitlines()[-1])
    assert enabled and tuple(thresholds) == GC_THRESHOLDS
    assert frozen > 10_000  # (the modules of popek and the standard library: ~21,000)


def test_a_debugged_exec_still_gets_its_debugger(tmp_path: Path):
    """The gdb stub is imported where --gdb asks for it (here: an address it refuses)."""
    result = subprocess.run([sys.executable, "-m", "popek", "exec", "--gdb", "nowhere",
                             str(HELLO)], capture_output=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr


# -- the cache of decompressed images --------------------------------------------------------

def xz_image(tmp_path: Path, content: bytes, name: str = "Image.xz") -> Path:
    path = tmp_path / name
    path.write_bytes(lzma.compress(content))
    return path


def test_the_second_read_of_a_compressed_image_comes_from_the_cache(tmp_path: Path,
                                                                    monkeypatch):
    cache = ImageCache(tmp_path / "cache")
    content = os.urandom(1 << 16) * 4
    path = xz_image(tmp_path, content)
    assert read_image(path, "kernel", 1 << 20, cache=cache) == content
    assert cache.entry(path.read_bytes()).is_file()

    def no_decompression(*args):
        raise AssertionError("decompressed although the cache holds the image")
    monkeypatch.setattr(loader, "_decompressed", no_decompression)
    assert read_image(path, "kernel", 1 << 20, cache=cache) == content
    # The same bytes under another name are the same entry.
    copy = tmp_path / "copy.xz"
    copy.write_bytes(path.read_bytes())
    assert read_image(copy, "kernel", 1 << 20, cache=cache) == content


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "empty", "bad magic"])
def test_a_damaged_entry_is_ignored_and_written_again(tmp_path: Path, damage: str):
    cache = ImageCache(tmp_path / "cache")
    content = b"a kernel" * 10_000
    path = xz_image(tmp_path, content)
    read_image(path, "kernel", 1 << 20, cache=cache)
    entry = cache.entry(path.read_bytes())
    data = bytearray(entry.read_bytes())
    if damage == "flipped byte":
        data[-100] ^= 1
    elif damage == "truncated":
        del data[-1:]
    elif damage == "empty":
        data.clear()
    else:
        data[0] ^= 1
    entry.write_bytes(bytes(data))
    assert cache.get(path.read_bytes()) is None
    assert read_image(path, "kernel", 1 << 20, cache=cache) == content
    assert cache.get(path.read_bytes()) == content  # rewritten whole
    assert entry.stat().st_size == HEADER.size + len(content)


def test_a_cached_image_larger_than_ram_is_still_refused(tmp_path: Path):
    cache = ImageCache(tmp_path / "cache")
    path = xz_image(tmp_path, bytes(1 << 20))
    read_image(path, "initrd", 2 << 20, cache=cache)
    with pytest.raises(ImageError, match="larger than"):
        read_image(path, "initrd", 1 << 19, cache=cache)


def test_an_unwritable_cache_costs_only_the_decompression(tmp_path: Path):
    blocker = tmp_path / "a file"
    blocker.write_bytes(b"")
    cache = ImageCache(blocker / "cache")  # cannot be made: its parent is a file
    path = xz_image(tmp_path, b"x" * 5000)
    assert read_image(path, "kernel", 1 << 20, cache=cache) == b"x" * 5000


def test_the_least_recently_used_entries_go_beyond_the_bound(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(image_cache, "MAX_BYTES", 3 * (HEADER.size + 1000))
    cache = ImageCache(tmp_path)
    contents = [bytes([n]) * 1000 for n in range(5)]
    for n, content in enumerate(contents[:3]):
        cache.put(lzma.compress(content), content)
        os.utime(cache.entry(lzma.compress(content)), (n, n))  # written in this order
    assert cache.get(lzma.compress(contents[0])) == contents[0]  # used now: the newest
    for content in contents[3:]:
        cache.put(lzma.compress(content), content)
    kept = {n for n, content in enumerate(contents) if cache.get(lzma.compress(content))}
    assert kept == {0, 3, 4}


def _read_many(root: str, path: str, rounds: int) -> None:
    cache = ImageCache(Path(root))
    expected = lzma.decompress(Path(path).read_bytes())
    for _ in range(rounds):
        assert read_image(Path(path), "kernel", 1 << 22, cache=cache) == expected
        with contextlib.suppress(FileNotFoundError):  # (the others write it again)
            os.unlink(cache.entry(Path(path).read_bytes()))


def test_concurrent_runs_share_entries_safely(tmp_path: Path):
    path = xz_image(tmp_path, os.urandom(1 << 20))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_read_many, args=(str(tmp_path / "cache"), str(path), 20))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0] * 4
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_a_boot_of_the_bundled_linux_keeps_its_kernel_and_initramfs(tmp_path: Path,
                                                                    monkeypatch):
    """What the machine places in RAM is the same whether the cache held the images."""
    config = MachineConfig(kernel=images.KERNEL, initrd=images.INITRD, mem=256 << 20)
    cache = ImageCache(tmp_path)
    first = VirtMachine(config, lambda data: None, image_cache=cache)
    assert len(list(tmp_path.iterdir())) == 2  # the kernel and the initramfs
    monkeypatch.setattr(loader, "_decompressed", lambda *args: pytest.fail("decompressed"))
    second = VirtMachine(config, lambda data: None, image_cache=cache)
    kernel = lzma.decompress(images.KERNEL.read_bytes())
    initrd = gzip.decompress(images.INITRD.read_bytes())
    for machine in (first, second):
        assert machine.mem.read(RAM_BASE + 0x200000, len(kernel)) == kernel
        at = machine.mem.ram.find(initrd[:4096])
        assert at > 0 and machine.mem.read(RAM_BASE + at, len(initrd)) == initrd
