"""Snapshot files: one guest, whole (harts, firmware, devices, RAM), in one versioned file.

Layout, integers little-endian::

    0           preamble: magic, format version, offsets and sizes, CRC-32 of the metadata,
                CRC-32 of the preamble itself
    4096        guest RAM, exactly as large as the guest's RAM; zero pages are holes of a
                sparse file, so the file costs only what the guest used
    4096 + RAM  metadata, JSON: machine configuration (disk paths included), the state of
                harts, firmware and devices, and the runs of non-zero pages with a CRC-32
                of each

A diff snapshot (Firecracker's, ``popek vm snapshot --diff BASE``) stores only the pages
written since its base snapshot, as the base's dirty log names them
(:meth:`PhysicalMemory.dirty_log`), and records the base (its path and the CRC of its
metadata); a restore maps the base (itself perhaps a diff, up to :data:`MAX_CHAIN`
deep) and lays the diff's pages over it. Holes in a diff mean "as in the base".

RAM sits page-aligned at a fixed offset so a restore can map it copy-on-write
(``MAP_PRIVATE``): a restored guest reads pages from the page cache on first touch and
copies one only when it writes it, so many clones of one snapshot share every page
they leave alone. Files are written beside their final name and renamed into place:
a failed save leaves no half file, and clones mapping an older file keep its inode.

Everything is checked before a machine is built (size, versions, every checksum), so a
truncated, corrupt or newer-format file is refused with :class:`SnapshotError` and
nothing else happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popek.cpu.physmem import PAGE_SIZE, PhysicalMemory
from popek.machine.config import (
    CONFIG_VERSION,
    MAX_RAM,
    ConfigError,
    MachineConfig,
    config_from_json,
    config_to_json,
)
from popek.machine.virt import RAM_BASE, VirtMachine

MAGIC = b"POPEKSNP"
FORMAT_VERSION = 1
MEM_OFFSET = 4096
# magic, version, metadata CRC, metadata length, RAM size, file size; then the preamble's CRC
_HEAD = struct.Struct("<8sIIQQQ")
_CRC = struct.Struct("<I")
_SCAN = 256 * PAGE_SIZE  # scan RAM a MiB at a time; most of an idle guest's RAM is zero
_ZERO_SCAN = bytes(_SCAN)
_ZERO_PAGE = bytes(PAGE_SIZE)
# Bounds on the metadata, so a forged header cannot make a reader (the VMM checks a file
# before its worker does) allocate without limit: device state, plus the page list at
# its longest (every other page stored: one [first, count, crc] run per two pages).
_META_BASE = 16 << 20
_META_PER_PAGE = 24
MAX_CHAIN = 16  # diff snapshots on diff snapshots on a full one


class SnapshotError(Exception):
    """A snapshot that cannot be written or restored; the message says why, in one line."""


@dataclass
class SavedSnapshot:
    """What a save produced (the API reports it)."""

    path: Path
    file_bytes: int  # apparent size
    ram_bytes: int  # non-zero RAM actually stored
    seconds: float
    meta_crc: int = 0  # what a diff snapshot of this one records, to know it again


@dataclass(frozen=True)
class Base:
    """The snapshot a diff snapshot holds the changes since."""

    path: str
    meta_crc: int


@dataclass
class Snapshot:
    """A checked snapshot file, its RAM mapped copy-on-write, ready to become a machine."""

    path: Path
    meta: dict[str, Any]
    config: MachineConfig
    memory: PhysicalMemory
    opener: Callable[..., int] = os.open  # for the machine's disks

    def machine(self, console_out: Callable[[bytes], None], **board: Any) -> VirtMachine:
        """The saved machine, carrying on where it stopped (disks reopened); its NICs need
        ``board``'s ``nets`` and ``events``, as for a booted VirtMachine."""
        try:
            return VirtMachine(self.config, console_out, memory=self.memory,
                               state=self.meta["machine"], opener=self.opener, **board)
        except ConfigError as err:
            raise SnapshotError(f"{self.path}: bad machine configuration: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise SnapshotError(f"{self.path}: machine state does not fit: {err}") from None


class NewFile:
    """A snapshot file being written: beside its final name, owner-only (it holds the
    guest's memory), renamed into place when the ``with`` block succeeds, removed when it
    fails. The block gets the descriptor (a VMM hands it to the worker that writes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.partial: str | None = None
        self.fd = -1

    def __enter__(self) -> int:
        try:
            self.fd, self.partial = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        except OSError as err:
            raise SnapshotError(f"cannot write {self.path}: {err.strerror}") from None
        return self.fd

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        os.close(self.fd)
        try:
            if kind is None:
                os.replace(self.partial, self.path)
        except OSError as err:
            raise SnapshotError(f"cannot write {self.path}: {err.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)


def save(path: Path, machine: VirtMachine, extra: dict[str, Any] | None = None) -> SavedSnapshot:
    """Write ``machine`` (stopped between slices by the caller) to ``path``."""
    with NewFile(path) as fd:
        return write(fd, Path(path), machine, extra)


def write(fd: int, path: Path, machine: VirtMachine, extra: dict[str, Any] | None = None,
          base: Base | None = None, written: list[tuple[int, int]] = ()) -> SavedSnapshot:
    """Write ``machine`` into the new, empty file ``fd`` (``path`` names it in messages);
    with ``base``, only the runs of pages ``written`` since that snapshot (a diff).

    Disks are flushed first, so the image files on the host match what the saved guest
    believes it wrote; their paths are recorded, their contents are not copied.
    """
    start = time.monotonic()
    try:
        for disk in machine.disks:
            os.fsync(disk.fd)
        runs, stored = _write_ram(fd, machine.mem, None if base is None else written)
        meta = json.dumps({
            **({"base": {"path": base.path, "meta_crc": base.meta_crc}} if base else {}),
            "created": time.time(),
            "config": config_to_json(machine.config),
            "config_version": CONFIG_VERSION,
            "machine": machine.save_state(),
            "pages": runs,
            **(extra or {}),
        }, separators=(",", ":")).encode()
        ram = machine.mem.size
        file_size = MEM_OFFSET + ram + len(meta)
        os.pwrite(fd, meta, MEM_OFFSET + ram)
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, zlib.crc32(meta), len(meta), ram, file_size)
        os.pwrite(fd, head + _CRC.pack(zlib.crc32(head)), 0)
        os.ftruncate(fd, file_size)
        os.fsync(fd)
    except OSError as err:
        raise SnapshotError(f"cannot write {path}: {err.strerror}") from None
    return SavedSnapshot(path, file_size, stored, time.monotonic() - start, zlib.crc32(meta))


def _write_ram(fd: int, mem: PhysicalMemory,
               only: list[tuple[int, int]] | None) -> tuple[list[list[int]], int]:
    """Store the non-zero runs of pages (or, for a diff, the runs ``only``, zero or not);
    returns [[first page, pages, CRC-32]...], bytes."""
    runs: list[list[int]] = []
    stored = 0
    mem.make_present(0, mem.size)  # a swapped-out guest's pages are read back first
    with memoryview(mem.ram) as ram:
        for first, count in nonzero_runs(mem) if only is None else only:
            data = ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            os.pwrite(fd, data, MEM_OFFSET + first * PAGE_SIZE)
            runs.append([first, count, zlib.crc32(data)])
            stored += len(data)
            data.release()
    return runs, stored


def nonzero_runs(mem: PhysicalMemory) -> Iterator[tuple[int, int]]:
    """(first page, count) of each maximal run of pages holding a non-zero byte.

    Comparing slices reads untouched anonymous pages through the shared zero page, so
    the scan costs no host memory.
    """
    ram = mem.ram
    first = None
    for chunk in range(0, mem.size, _SCAN):
        end = min(chunk + _SCAN, mem.size)
        if first is None and ram[chunk:end] == _ZERO_SCAN[:end - chunk]:
            continue
        for off in range(chunk, end, PAGE_SIZE):
            zero = ram[off:off + PAGE_SIZE] == _ZERO_PAGE
            if first is None and not zero:
                first = off // PAGE_SIZE
            elif first is not None and zero:
                yield first, off // PAGE_SIZE - first
                first = None
    if first is not None:
        yield first, mem.size // PAGE_SIZE - first


def load(path: Path, opener: Callable[..., int] = os.open, depth: int = 0) -> Snapshot:
    """Check ``path`` completely and map its RAM; raises SnapshotError, changing nothing.
    ``opener`` opens the snapshot (and its base) and the disks it names, as os.open does."""
    path = Path(path)
    fd = _open(path, opener)
    try:
        meta, ram_size, _ = _read_checked_meta(path, fd)
        config = _config(path, meta)
        if config.mem != ram_size:
            raise SnapshotError(f"{path}: RAM of {ram_size} bytes, configuration says "
                                f"{config.mem}")
        if not isinstance(meta.get("machine"), dict):  # a machine without it would boot
            raise SnapshotError(f"{path}: no machine state (corrupt file)")
        console_bytes = meta.get("console_bytes", 0)  # what the guest had printed (VMM's)
        if type(console_bytes) is not int or console_bytes < 0:
            raise SnapshotError(f"{path}: console byte count {console_bytes!r:.40} "
                                "(corrupt file)")
        base = _base_of(path, meta, depth)
        memory = PhysicalMemory(RAM_BASE, ram_size, backing=(fd, MEM_OFFSET))
        try:
            runs = _check_pages(path, memory, meta.get("pages"))
            if base is None:
                _check_holes(path, fd, memory, runs)
            else:
                memory = _laid_over(path, base, config, memory, runs, opener, depth)
        except SnapshotError:
            memory.ram.close()
            raise
    finally:
        os.close(fd)  # the mapping keeps the file
    return Snapshot(path, meta, config, memory, opener)


def _base_of(path: Path, meta: dict[str, Any], depth: int) -> Base | None:
    base = meta.get("base")
    if base is None:
        return None
    if not (isinstance(base, dict) and isinstance(base.get("path"), str)
            and isinstance(base.get("meta_crc"), int) and os.path.isabs(base["path"])):
        raise SnapshotError(f"{path}: malformed base snapshot record (corrupt file)")
    if depth >= MAX_CHAIN:
        raise SnapshotError(f"{path}: more than {MAX_CHAIN} diff snapshots on one another")
    return Base(base["path"], base["meta_crc"])


def _laid_over(path: Path, base: Base, config: MachineConfig, diff: PhysicalMemory,
               runs: list[tuple[int, int]], opener: Callable[..., int],
               depth: int) -> PhysicalMemory:
    """The base's RAM with the diff's (checked) pages over it."""
    under = load(Path(base.path), opener, depth + 1)
    fd = _open(Path(base.path), opener)
    try:
        crc = _read_checked_meta(Path(base.path), fd)[2]
    finally:
        os.close(fd)
    if crc != base.meta_crc or under.config != config:
        under.memory.ram.close()
        raise SnapshotError(f"{path}: its base {base.path} is not the snapshot it was "
                            "taken after (replaced since?)")
    for first, end in runs:
        under.memory.ram[first * PAGE_SIZE:end * PAGE_SIZE] = \
            diff.ram[first * PAGE_SIZE:end * PAGE_SIZE]
    diff.ram.close()
    return under.memory


def chain(path: Path, check: Callable[[Path], object] = lambda _: None) -> list[Path]:
    """``path`` and the snapshots under it, if it is a diff: what a restore opens. Each
    base passes ``check`` (the VMM's path policy) before it is opened."""
    paths = [Path(path)]
    while True:
        fd = _open(paths[-1])
        try:
            base = _base_of(paths[-1], _read_checked_meta(paths[-1], fd)[0], len(paths) - 1)
        finally:
            os.close(fd)
        if base is None:
            return paths
        check(Path(base.path))
        paths.append(Path(base.path))


def read_config(path: Path) -> MachineConfig:
    """The machine configuration ``path`` records, checked as :func:`load` checks it but
    without mapping RAM: the VMM checks the host paths in it before a worker opens them."""
    path = Path(path)
    fd = _open(path)
    try:
        return _config(path, _read_checked_meta(path, fd)[0])
    finally:
        os.close(fd)


def _open(path: Path, opener: Callable[..., int] = os.open) -> int:
    """A descriptor of ``path``, which must be a regular file (``O_NONBLOCK``: a FIFO put
    in its place cannot stall the caller, the VMM included)."""
    try:
        fd = opener(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise SnapshotError(f"cannot open snapshot {path}: {err.strerror}") from None
    except ValueError:  # a NUL in the path, which no file name holds
        raise SnapshotError(f"cannot open snapshot {str(path)!r}: not a file name") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(f"{path} is not a popek snapshot (not a regular file)")
    return fd


def _config(path: Path, meta: dict[str, Any]) -> MachineConfig:
    config = meta.get("config")
    if isinstance(config, dict) and "agent" not in config:
        # Saved before machines had the agent's port: the machine it holds has none.
        config = {**config, "agent": False}
    try:
        return config_from_json(config, meta.get("config_version", 1))
    except (ConfigError, TypeError) as err:
        raise SnapshotError(f"{path}: bad machine configuration: {err}") from None


def _read_checked_meta(path: Path, fd: int) -> tuple[dict[str, Any], int, int]:
    """The metadata, the RAM size and the metadata's CRC (a diff snapshot's record of
    its base)."""
    head = os.pread(fd, _HEAD.size + _CRC.size, 0)
    if len(head) < 12 or head[:8] != MAGIC:
        raise SnapshotError(f"{path} is not a popek snapshot")
    version = int.from_bytes(head[8:12], "little")
    if version > FORMAT_VERSION:
        raise SnapshotError(f"{path}: snapshot format {version} is newer than this popek "
                            f"reads (up to {FORMAT_VERSION}); restore it with a newer popek")
    if version != FORMAT_VERSION or len(head) < _HEAD.size + _CRC.size:
        raise SnapshotError(f"{path}: unknown snapshot format {version} or truncated header")
    if zlib.crc32(head[:_HEAD.size]) != _CRC.unpack_from(head, _HEAD.size)[0]:
        raise SnapshotError(f"{path}: header checksum mismatch (corrupt file)")
    _, _, meta_crc, meta_len, ram_size, file_size = _HEAD.unpack_from(head)
    actual = os.fstat(fd).st_size
    if actual != file_size:
        kind = "truncated" if actual < file_size else "has trailing bytes"
        raise SnapshotError(f"{path}: {kind}: {actual} bytes, the header says {file_size}")
    if ram_size % PAGE_SIZE or file_size != MEM_OFFSET + ram_size + meta_len:
        raise SnapshotError(f"{path}: inconsistent header (corrupt file)")
    if ram_size > MAX_RAM or meta_len > _META_BASE + ram_size // PAGE_SIZE * _META_PER_PAGE:
        raise SnapshotError(f"{path}: sizes in the header beyond what a snapshot can need "
                            "(corrupt file)")
    raw = os.pread(fd, meta_len, MEM_OFFSET + ram_size)
    if zlib.crc32(raw) != meta_crc:
        raise SnapshotError(f"{path}: metadata checksum mismatch (corrupt file)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise SnapshotError(f"{path}: metadata is not JSON (corrupt file)") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{path}: metadata is not an object (corrupt file)")
    return meta, ram_size, meta_crc


def _check_pages(path: Path, memory: PhysicalMemory, runs: Any) -> list[tuple[int, int]]:
    """Every stored run of pages must match its checksum (reads, never copies, the pages).

    Returns the runs as sorted (first page, end page) pairs."""
    if not isinstance(runs, list):
        raise SnapshotError(f"{path}: no page list (corrupt file)")
    pages = memory.size // PAGE_SIZE
    with memoryview(memory.ram) as ram:
        for run in runs:
            if not (isinstance(run, list) and len(run) == 3
                    and all(isinstance(v, int) for v in run)):
                raise SnapshotError(f"{path}: malformed page run {run!r} (corrupt file)")
            first, count, crc = run
            if not (0 <= first and 0 < count and first + count <= pages):
                raise SnapshotError(f"{path}: page run {run!r} outside RAM (corrupt file)")
            data = ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            ok = zlib.crc32(data) == crc
            data.release()
            if not ok:
                raise SnapshotError(f"{path}: RAM pages {first}..{first + count - 1} fail "
                                    f"their checksum (corrupt file)")
    return sorted((first, first + count) for first, count, _ in runs)


def _check_holes(path: Path, fd: int, memory: PhysicalMemory,
                 runs: list[tuple[int, int]]) -> None:
    """Pages outside the stored runs must be zero. The file system's map of where data
    lies (SEEK_DATA) finds the few places to look; any data there is read and checked."""
    gaps, page = [], 0
    for first, end in runs + [(memory.size // PAGE_SIZE, 0)]:
        if first > page:
            gaps.append((page * PAGE_SIZE, first * PAGE_SIZE))
        page = max(page, end)
    for start, end in gaps:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, MEM_OFFSET + pos, os.SEEK_DATA) - MEM_OFFSET
            except OSError:  # ENXIO: no data from here to the end of the file
                break
            if data >= end:
                break
            stop = min(end, os.lseek(fd, MEM_OFFSET + data, os.SEEK_HOLE) - MEM_OFFSET)
            for off in range(data - data % PAGE_SIZE, stop, _SCAN):
                n = min(_SCAN, stop - off)
                if memory.ram[off:off + n] != _ZERO_SCAN[:n]:
                    raise SnapshotError(f"{path}: data at RAM offset {off:#x} where the "
                                        "snapshot holds zero pages (corrupt file)")
            pos = stop
