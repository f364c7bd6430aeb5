"""Fuzz target: the snapshot reader (``popek.vmm.snapshot.read_config`` as the VMM checks a
snapshot, then ``load`` and ``Snapshot.machine`` as its worker restores it).

A snapshot file may be truncated, corrupt, from another version or forged; whatever it
holds, restoring it ends in :class:`SnapshotError` or in a machine that works, never in
another exception, and never in an allocation that a length field asked for. "Works"
means what a guest may do next does not raise either: read and write every device's
registers, and run a slice of instructions.

Checksums guard nearly every byte of a real file, so mutating files blindly would only
ever test the checksums. The first byte of an input therefore says how to read the rest
(``flags & 3``):

- raw: the rest is the file, as it is;
- sealed: the rest is the metadata JSON, a NUL, then the bytes of the RAM runs the
  metadata lists;
- edit: the rest is a list of edits to a real snapshot's metadata, each a path into the
  JSON tree and a new value (or a deletion), so that every field of every device's
  saved state meets wrong types and values while the JSON stays valid.

For sealed and edit inputs the target builds the file around the metadata: header, sizes
and (flag 4) page checksums are right, flag 8 drops leftover RAM bytes into a hole, and
bits 4..7 extend the metadata with a sparse hole of 2^(20 + n) bytes, a length field far
beyond any real snapshot's (the file really is that long).

The real snapshot is made at start-up from a tiny bare-metal guest with a disk and a NIC
(whose host end, in the worker, is a socket with a silent peer). Host
paths in the metadata (which the VMM opens for a restore) that are not the target's own
are replaced by harmless ones: the target must not open host files that a mutation
happened to name.
"""

from __future__ import annotations

import copy
import functools
import json
import zlib
from typing import Any

from popek.cpu.physmem import PAGE_SIZE
from popek.devices.virtio import SLOT_BASE
from popek.devices.virtio.mmio import Reg
from popek.machine import virt
from popek.machine.config import BIOS_NAMES
from popek.machine.loader import ImageError
from popek.machine.runner import EventSources
from popek.machine.virt import VirtMachine
from popek.vmm.hostfiles import HostFiles
from popek.vmm.snapshot import (
    _CRC,
    _HEAD,
    FORMAT_VERSION,
    MAGIC,
    MEM_OFFSET,
    SnapshotError,
    read_config,
)
from tests.fuzz.harness import JsonEdits, MemFile, Target, idle_snapshot, worker

RAW, SEALED, EDIT = 0, 1, 2
FIX_PAGE_CRCS, STRAY_BYTES = 4, 8
META_HOLE_SHIFT = 4
BASE_RAM = 16 << 20
DISK_BYTES = 64 << 10
MAX_SEALED_RAM = 1 << 40
_file = MemFile("fuzz-snapshot")
_disk = MemFile("fuzz-snapshot-disk")
# What a host path in the metadata becomes, picked by its length.
_HARMLESS_PATHS = (str(_disk.path), "/nonexistent/popek-fuzz-disk", "/", "relative/disk.img",
                   "/dev/null")


def one(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    if flags & 3 == RAW:
        _file.set(body)
    elif flags & 3 == SEALED:
        meta_bytes, _, ram = body.partition(b"\0")
        _seal(flags, meta_bytes, ram)
    else:
        meta, ram = _base()
        meta = copy.deepcopy(meta)
        meta = JsonEdits(body).apply(meta)
        _seal(flags | FIX_PAGE_CRCS, json.dumps(meta).encode(), ram)
    spec = {"restore": str(_file.path)}
    try:  # the VMM reads the configuration, opens the files and NICs it names ...
        nics = len(read_config(_file.path).nics)
        files = HostFiles.for_spec(spec)
    except (SnapshotError, ImageError):  # (ImageError: a disk it names cannot be opened)
        return
    # ... then a worker restores: load, read what the metadata says, build the machine
    with worker({**spec, "files": files}, nics) as restoring:
        try:
            machine = restoring._build()
        except SnapshotError:
            return
        finally:
            files.close()
        _probe(machine, restoring.runner.sources)
        for disk in machine.disks:
            disk.close()


# -- what a guest can do to a restored machine ------------------------------------------
_PROBES = [  # (base, offsets read, (offset, value) written)
    (virt.UART_BASE, range(0, 8), [(1, 0x0F), (0, 0x41), (2, 0x07)]),
    (virt.CLINT_BASE, [0, 4, 0x4000, 0x4004, 0xBFF8, 0xBFFC], [(0x4000, 0), (0, 1)]),
    (virt.PLIC_BASE, [4 * n for n in range(16)] + [0x1000, 0x1004, 0x2000, 0x2004, 0x2080,
                                                    0x20_0000, 0x20_0004, 0x20_1004],
     [(0x20_0004, 10), (0x20_1004, 1), (0x2000, 0xFFFF_FFFF)]),
    (virt.RTC_BASE, range(0, 0x20, 4), [(0x10, 1)]),
    (SLOT_BASE, [*range(0, 0x100, 4), 0x100],
     [(Reg.QUEUE_NOTIFY, 0), (Reg.INTERRUPT_ACK, 3)]),
]


def _probe(machine: VirtMachine, sources: EventSources) -> None:
    """Every register a guest might touch, a slice of the guest's own code, then the host
    events its devices wait for."""
    for base, reads, writes in _PROBES:
        if machine.mem.device_at(base) is None:
            continue  # a machine without virtio devices: the guest gets an access fault
        for offset in reads:
            value = machine.mem.load(base + offset, 4)
            assert type(value) is int and 0 <= value < 1 << 32, (hex(base + offset), value)
        for offset, value in writes:
            machine.mem.store(base + offset, 4, value)
    machine.run_slice()
    sources.dispatch(0)
    json.dumps(machine.save_state())  # a restored machine can be saved again


# -- building files ---------------------------------------------------------------------
def _seal(flags: int, meta_bytes: bytes, ram: bytes) -> None:
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, RecursionError):  # the reader must refuse it: leave it as it is
        meta = None
    ram_size = BASE_RAM
    pieces: list[tuple[int, bytes]] = []
    if isinstance(meta, dict):
        config = meta.get("config")
        if isinstance(config, dict):
            mem = config.get("mem")
            if type(mem) is int and 0 <= mem <= MAX_SEALED_RAM and mem % PAGE_SIZE == 0:
                ram_size = mem
            _harmless_paths(config)
        ram = _place_runs(meta.get("pages"), ram, ram_size, pieces, flags & FIX_PAGE_CRCS)
        meta_bytes = json.dumps(meta).encode()  # nests no deeper than what loads() read
    if flags & STRAY_BYTES and ram and len(ram) <= ram_size:
        pieces.append(((ram_size - len(ram)) & ~(PAGE_SIZE - 1), ram))
    # With a hole the checksum covers only the bytes given: the reader must not have
    # allocated the whole length before it finds out.
    hole = flags >> META_HOLE_SHIFT
    meta_len = len(meta_bytes) + (1 << (20 + hole) if hole else 0)
    file_size = MEM_OFFSET + ram_size + meta_len
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, zlib.crc32(meta_bytes), meta_len, ram_size,
                      file_size)
    _file.set(head + _CRC.pack(zlib.crc32(head)), file_size)
    for offset, chunk in pieces:
        _file.put(MEM_OFFSET + offset, chunk)
    _file.put(MEM_OFFSET + ram_size, meta_bytes)


def _harmless_paths(config: dict[str, Any]) -> None:
    """Host paths the VMM opens for a restore (disks; kernel, initrd and firmware for the
    guest's reboots) become the target's own or harmless ones."""
    places: list[tuple[Any, Any]] = [(config, "kernel"), (config, "initrd")]
    if config.get("bios") not in BIOS_NAMES:
        places.append((config, "bios"))
    disks = config.get("disks")
    if isinstance(disks, list):
        places += [(disk, "path") for disk in disks if isinstance(disk, dict)]
    ours = {*_HARMLESS_PATHS, _base()[0]["config"]["kernel"]}
    for holder, key in places:
        path = holder.get(key)
        # (A NUL in a path names no file: kept, the VMM must refuse it as it opens it.)
        if isinstance(path, str) and path not in ours and "\0" not in path:
            holder[key] = _HARMLESS_PATHS[len(path) % len(_HARMLESS_PATHS)]


def _place_runs(runs: Any, ram: bytes, ram_size: int, pieces: list[tuple[int, bytes]],
                fix_crcs: int) -> bytes:
    """Put the RAM bytes where the well-formed runs say; returns the bytes left over."""
    if not isinstance(runs, list):
        return ram
    for run in runs:
        if not (isinstance(run, list) and len(run) == 3 and all(type(v) is int for v in run)):
            continue
        first, count, _ = run
        if not (0 <= first and 0 < count and (first + count) * PAGE_SIZE <= ram_size):
            continue
        chunk, ram = ram[:count * PAGE_SIZE], ram[count * PAGE_SIZE:]
        pieces.append((first * PAGE_SIZE, chunk))
        if fix_crcs:
            run[2] = zlib.crc32(chunk.ljust(count * PAGE_SIZE, b"\0"))
    return ram




@functools.cache
def _base() -> tuple[dict[str, Any], bytes]:
    """A real snapshot's metadata and the bytes of its RAM runs; its guest has a disk and
    a NIC."""
    _disk.set(bytes(DISK_BYTES))
    raw = idle_snapshot(_disk.path, nic=True)
    meta = json.loads(raw[MEM_OFFSET + BASE_RAM:])
    ram = b"".join(raw[MEM_OFFSET + first * PAGE_SIZE:MEM_OFFSET + (first + count) * PAGE_SIZE]
                   for first, count, _ in meta["pages"])
    return meta, ram


def seeds() -> dict[str, bytes]:
    """The real snapshot sealed, one edit of it, and a raw file whose header claims no RAM."""
    meta, ram = _base()
    meta_bytes = json.dumps(meta).encode()
    empty = json.dumps(dict(meta, pages=[], config=dict(meta["config"], mem=0))).encode()
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, zlib.crc32(empty), len(empty), 0,
                      MEM_OFFSET + len(empty))
    raw_file = (head + _CRC.pack(zlib.crc32(head))).ljust(MEM_OFFSET, b"\0") + empty
    machine = list(meta).index("machine")
    return {
        "idle-sealed": bytes([SEALED]) + meta_bytes + b"\0" + ram,
        "idle-sealed-fixing-crcs": bytes([SEALED | FIX_PAGE_CRCS]) + meta_bytes + b"\0" + ram,
        "idle-edit-machine-version": bytes([EDIT, 0x80, machine, 0x80, 0, 4, 131]),
        "no-ram-raw": bytes([RAW]) + raw_file,
    }


TARGET = Target(one=one, ci_runs=1_500, max_len=1 << 17, seeds=seeds)
