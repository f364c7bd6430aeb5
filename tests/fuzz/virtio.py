"""Fuzz target: the virtio-mmio transport, the split virtqueue and each device's requests.

The guest's driver is the attacker: it writes the registers, the descriptor tables, the
rings and the request buffers. The input is a program for a fake driver, a list of
fixed-size records (register writes and reads, bytes poked into RAM, a whole device
set-up, descriptors, offers, notifications), so the fuzzer can both follow the protocol
and break it anywhere. Acceptable outcomes are served requests, device status bytes,
or DEVICE_NEEDS_RESET; the checks after every record:

- nothing raises out of ``VirtioMMIO.read``/``write``;
- a device writes guest RAM only in a used ring or in the device-writable buffers of the
  chains it popped (every DMA write goes through ``PhysicalMemory.write``, which is
  watched, and which itself refuses anything outside RAM);
- the interrupt line follows InterruptStatus, and a recorded error means
  DEVICE_NEEDS_RESET;
- at the end, the transport's state survives JSON (as in a snapshot) and a reload.

A device with a host side (virtio-net: a stream socket speaking QEMU's framing, see
``virtio_net``) also meets the host: records send it bytes (whole frames of any size, or
raw bytes that break the framing) and drain what it sent, and between records its host
events are dispatched, as the machine runner does, under the same checks. Whatever the
guest's transmit chains hold, the host receives whole frames of legal length.

Each device type is one entry of ``DEVICES``: a context manager that builds the backend
(and cleans up after it). A new device needs only an entry here and a seed or two.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from popek.cpu.physmem import PhysicalMemory
from popek.devices.virtio import VirtioBlk, VirtioMMIO, VirtioRng
from popek.devices.virtio.blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from popek.devices.virtio.console import VirtioConsole
from popek.devices.virtio.mmio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    Reg,
)
from popek.devices.virtio.queue import (
    DESC_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
)
from popek.machine.runner import EventSources
from popek.net.backend import MAX_FRAME, MIN_FRAME
from popek.net.stream import LENGTH
from tests.fuzz.harness import MemFile, Target, read_records

RAM_BASE = 0x8000_0000
RAM_SIZE = 0x10000
DISK_SECTORS = 64
_disk = MemFile("fuzz-disk")


Device = tuple[Any, socket.socket | None]  # the backend, and the host's end of its host side


@contextmanager
def _blk(readonly: bool, events: EventSources) -> Iterator[Device]:
    _disk.set(bytes(range(256)) * (DISK_SECTORS * SECTOR_SIZE // 256))  # the same disk each run
    dev = VirtioBlk(_disk.path, readonly=readonly)
    try:
        yield dev, None
    finally:
        dev.close()


@contextmanager
def _rng(readonly: bool, events: EventSources) -> Iterator[Device]:
    yield VirtioRng(), None


@contextmanager
def _console(readonly: bool, events: EventSources) -> Iterator[Device]:
    """The agent's port, with bytes from the host waiting for the guest's buffers."""
    port = VirtioConsole()
    port.send(b"from the host" * (64 if readonly else 1))
    yield port, None


# name -> a context manager giving a fresh backend; the flag is a fuzzed choice of shape.
# (virtio-net, with its host side, is a target of its own: tests/fuzz/virtio_net.py.)
DEVICES: dict[str, Callable[[bool, EventSources], Any]] = {"blk": _blk, "console": _console,
                                                          "rng": _rng}

# The records. Addresses below RAM_SIZE mean RAM_BASE + address (easy for the fuzzer to
# hit RAM); anything else is taken as it is.
REG_WRITE = struct.Struct("<HBQ")  # offset, size, value
REG_READ = struct.Struct("<HB")  # offset, size
RAM_WRITE = struct.Struct("<HB")  # RAM offset, length; then that many bytes
SETUP = struct.Struct("<QBHQQQ")  # driver features, queue, size, desc, driver, device areas
DESC = struct.Struct("<QHQIHH")  # table, index, addr, len, flags, next
OFFER = struct.Struct("<BHH")  # queue, head, how far to move the available index (0: 1)
NOTIFY = struct.Struct("<I")  # the value written to QueueNotify
RECORDS = (REG_WRITE, REG_READ, RAM_WRITE, SETUP, DESC, OFFER, NOTIFY)
# For a device with a host side, one more: the host sends, how (bit 0: the bytes raw,
# else framed as one frame; bit 1: the frame padded to 32 times the length given) and a
# length, then that many bytes; a length of 0 drains what the device sent instead.
HOST = struct.Struct("<BH")
RAW_BYTES, PADDED = 1, 2


def _addr(value: int) -> int:
    return RAM_BASE + value if value < RAM_SIZE else value


class FakeDriver:
    """Runs the records against one transport and checks it after each."""

    def __init__(self, backend: Any, events: EventSources,
                 host: socket.socket | None) -> None:
        self.mem = PhysicalMemory(RAM_BASE, RAM_SIZE)
        self.levels: list[bool] = [False]
        self.dev = VirtioMMIO(self.mem, backend, self.levels.append)
        self.events = events
        self.host = host
        self.wire = bytearray()  # what the device sent the host, not yet parsed
        self.records = RECORDS if host is None else (*RECORDS, HOST)
        self.avail_idx = [0] * len(self.dev.queues)
        self.writes: list[tuple[int, int]] = []
        self.popped: list[Chain] = []
        self.watching = False
        driver_write = self.mem.write

        def watched_write(pa: int, data: bytes) -> None:
            driver_write(pa, data)  # raises BusError outside RAM: a finding if it escapes
            if self.watching:
                self.writes.append((pa, len(data)))

        self.mem.write = watched_write  # type: ignore[method-assign]
        for queue in self.dev.queues:
            self._watch_pops(queue)
        if hasattr(backend, "attach"):
            backend.attach(self.dev)

    def _watch_pops(self, queue: Any) -> None:
        pop = queue.pop

        def watched_pop() -> Chain | None:
            chain = pop()
            if chain is not None:
                self.popped.append(chain)
            return chain

        queue.pop = watched_pop

    # -- the device's side, watched -------------------------------------------------------
    def device_write(self, offset: int, size: int, value: int) -> None:
        self.watched(lambda: self.dev.write(offset, size, value))

    def watched(self, action: Callable[[], None]) -> None:
        """Run what makes the device work (a register write, a host event), then check."""
        self.writes.clear()
        self.popped.clear()
        self.watching = True
        try:
            action()
        finally:
            self.watching = False
        self._check_writes()
        self._check_status()

    # -- the host's side ------------------------------------------------------------------
    def host_send(self, how: int, data: bytes, length: int) -> None:
        if not how & RAW_BYTES:
            frame = data.ljust(32 * length, b"\0") if how & PADDED else data
            data = LENGTH.pack(len(frame)) + frame
        try:  # what does not fit in the socket now is lost, as on a cut cable
            self.host.send(data)
        except BlockingIOError:
            pass

    def host_drain(self) -> None:
        """Read what the device sent: whole frames of legal length, QEMU-framed."""
        while True:
            try:
                data = self.host.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            self.wire += data
        while len(self.wire) >= LENGTH.size:
            size = LENGTH.unpack_from(self.wire)[0]
            assert MIN_FRAME <= size <= MAX_FRAME, f"the NIC sent a frame of {size} bytes"
            if len(self.wire) < LENGTH.size + size:
                break
            del self.wire[:LENGTH.size + size]

    def device_read(self, offset: int, size: int) -> None:
        value = self.dev.read(offset, size)
        assert isinstance(value, int) and 0 <= value < 1 << (8 * size), (offset, size, value)

    def _check_writes(self) -> None:
        allowed = [(s.addr, s.addr + s.length) for chain in self.popped
                   for s in chain.segments if s.writable]
        for queue in self.dev.queues:
            if queue.s.ready:
                used = 4 + USED_ELEM_SIZE * queue.s.num + 2
                allowed.append((queue.s.device_addr, queue.s.device_addr + used))
        for pa, n in self.writes:
            assert any(lo <= pa and pa + n <= hi for lo, hi in allowed), \
                f"device wrote {n} bytes at {pa:#x}, outside its used rings and buffers"

    def _check_status(self) -> None:
        s = self.dev.s
        assert self.levels[-1] == (s.interrupt_status != 0), (self.levels[-1], s)
        assert s.error is None or s.status & STATUS_DEVICE_NEEDS_RESET, s

    # -- the driver's side ----------------------------------------------------------------
    def setup(self, features: int, index: int, num: int, desc: int, driver: int,
              device: int) -> None:
        """The initialisation sequence of virtio 1.1 section 3.1.1, with fuzzed values."""
        for status in (0, STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER):
            self.device_write(Reg.STATUS, 4, status)
        for sel in (0, 1):
            self.device_write(Reg.DRIVER_FEATURES_SEL, 4, sel)
            self.device_write(Reg.DRIVER_FEATURES, 4, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.device_write(Reg.STATUS, 4, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        self.device_write(Reg.QUEUE_SEL, 4, index)
        self.device_write(Reg.QUEUE_NUM, 4, num)
        for low, addr in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, driver),
                          (Reg.QUEUE_DEVICE_LOW, device)):
            self.device_write(low, 4, addr & 0xFFFF_FFFF)
            self.device_write(low + 4, 4, addr >> 32)
        self.device_write(Reg.QUEUE_READY, 4, 1)
        self.device_write(Reg.STATUS, 4, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                          | STATUS_DRIVER_OK)
        if index < len(self.avail_idx):
            self.avail_idx[index] = 0

    def offer(self, index: int, head: int, advance: int) -> None:
        """Put ``head`` in the available ring where the queue's driver area says."""
        if index >= len(self.dev.queues):
            return
        s = self.dev.queues[index].s
        idx = self.avail_idx[index]
        slot = s.driver_addr + 4 + 2 * (idx % max(s.num, 1))
        idx = self.avail_idx[index] = (idx + (advance or 1)) & 0xFFFF
        for pa, data in ((slot, struct.pack("<H", head)), (s.driver_addr + 2,
                                                          struct.pack("<H", idx))):
            if self.mem.ram_offset(pa) is not None and self.mem.ram_offset(pa + 1) is not None:
                self.mem.write(pa, data)

    def run(self, data: bytes) -> None:
        for record, fields, tail in read_records(data, self.records, (RAM_WRITE, HOST)):
            if record is REG_WRITE:
                offset, size, value = fields
                self.device_write(offset & 0x1FF, _size(size), value & ((1 << 8 * _size(size)) - 1))
            elif record is REG_READ:
                self.device_read(fields[0] & 0x1FF, _size(fields[1]))
            elif record is RAM_WRITE:
                offset = fields[0] % RAM_SIZE
                self.mem.write(RAM_BASE + offset, tail[:RAM_SIZE - offset])
            elif record is SETUP:
                features, index, num, desc, driver, device = fields
                self.setup(features, index, num, _addr(desc), _addr(driver), _addr(device))
            elif record is DESC:
                table, index, addr, length, flags, nxt = fields
                pa = _addr(table) + DESC_SIZE * index
                if self.mem.ram_offset(pa) is not None and \
                        self.mem.ram_offset(pa + DESC_SIZE - 1) is not None:
                    self.mem.write(pa, struct.pack("<QIHH", _addr(addr), length, flags, nxt))
            elif record is OFFER:
                self.offer(*fields)
            elif record is NOTIFY:
                self.device_write(Reg.QUEUE_NOTIFY, 4, fields[0])
            else:
                how, length = fields
                if length:
                    self.host_send(how, tail, length)
                else:
                    self.host_drain()
            if self.host is not None:  # the runner looks at the host's side between slices
                self.watched(lambda: self.events.dispatch(0))
        if self.host is not None:
            self.host_drain()

    def check_state_round_trip(self) -> None:
        """What a snapshot does with the transport: JSON, then a reload, gives it back."""
        state = json.loads(json.dumps(self.dev.save_state()))
        self.dev.reset()
        self.dev.load_state(state)
        assert self.dev.save_state() == state


def _size(code: int) -> int:
    return (4, 4, 1, 2, 8, 4, 3, 4)[code % 8]


def one(data: bytes, devices: dict[str, Callable[[bool, EventSources], Any]] = DEVICES) -> None:
    """The first byte picks the device of ``devices`` and its shape; the rest is the
    driver's program."""
    if len(data) < 1:
        return
    names = sorted(devices)
    events = EventSources()
    with devices[names[data[0] % len(names)]](bool(data[0] & 0x80), events) as (backend, host):
        driver = FakeDriver(backend, events, host)
        driver.run(data[1:])
        driver.check_state_round_trip()


# -- seeds: well-formed requests, which the fuzzer then bends ---------------------------
_ALL_FEATURES = (1 << 32) | (1 << 28) | (1 << 29)
_DESC, _AVAIL, _USED, _INDIRECT, _DATA = 0x1000, 0x2000, 0x3000, 0x4000, 0x8000


def _record(record: struct.Struct, *fields: int, tail: bytes = b"") -> bytes:
    return bytes([(*RECORDS, HOST).index(record)]) + record.pack(*fields) + tail


def _program(chain: list[tuple[int, int, int]], *, indirect: bool = False,
             ram: tuple[tuple[int, bytes], ...] = (), features: int = _ALL_FEATURES) -> bytes:
    """Set up queue 0, put ``chain`` ((addr, len, flags) from RAM offsets) in, and kick."""
    out = _record(SETUP, features, 0, 16, _DESC, _AVAIL, _USED)
    for offset, data in ram:
        out += _record(RAM_WRITE, offset, len(data), tail=data)
    return out + _chain(0, chain, _DESC, indirect=indirect)


def _chain(queue: int, chain: list[tuple[int, int, int]], table: int, *,
           indirect: bool = False) -> bytes:
    """``chain`` in the descriptor table at ``table`` (from its first entry), offered on
    ``queue`` and kicked."""
    out = b""
    inner = _INDIRECT if indirect else table
    for i, (addr, length, flags) in enumerate(chain):
        more = VIRTQ_DESC_F_NEXT if i + 1 < len(chain) else 0
        out += _record(DESC, inner, i, addr, length, flags | more, i + 1)
    if indirect:
        out += _record(DESC, table, 0, _INDIRECT, DESC_SIZE * len(chain), VIRTQ_DESC_F_INDIRECT, 0)
    return out + _record(OFFER, queue, 0, 1) + _record(NOTIFY, queue)


def _blk_request(kind: int, sector: int, data_len: int, *, indirect: bool = False) -> bytes:
    header = struct.pack("<IIQ", kind, 0, sector)
    data_flags = 0 if kind == VIRTIO_BLK_T_OUT else VIRTQ_DESC_F_WRITE
    chain = [(_DATA, 16, 0), (_DATA + 0x100, data_len, data_flags),
             (_DATA + 0x100 + data_len, 1, VIRTQ_DESC_F_WRITE)]
    return _program(chain, indirect=indirect, ram=((_DATA, header),))


def _console_program() -> bytes:
    features = (1 << 32) | (1 << 1)  # VERSION_1, MULTIPORT
    rings = [(0x1000 + 0x400 * q, 0x2000 + 0x100 * q, 0x3000 + 0x200 * q) for q in range(4)]
    out = _record(SETUP, features, 0, 16, *rings[0])  # resets, sets queue 0 up, DRIVER_OK
    for queue in (1, 2, 3):  # the other queues, register by register
        out += _record(REG_WRITE, Reg.QUEUE_SEL, 0, queue) + \
            _record(REG_WRITE, Reg.QUEUE_NUM, 0, 16)
        for reg, addr in zip((Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW),
                             rings[queue], strict=True):
            out += _record(REG_WRITE, reg, 0, RAM_BASE + addr)
        out += _record(REG_WRITE, Reg.QUEUE_READY, 0, 1)
    messages = struct.pack("<IHH", 0xFFFF_FFFF, 0, 1) + struct.pack("<IHH", 0, 3, 1)
    out += _record(RAM_WRITE, _DATA, len(messages), tail=messages)
    out += _chain(2, [(_DATA + 0x100, 256, VIRTQ_DESC_F_WRITE)], 0x1800)
    out += _chain(3, [(_DATA, 8, 0)], 0x1C00)  # DEVICE_READY
    out += _record(DESC, 0x1C00, 1, _DATA + 8, 8, 0, 0)  # PORT_READY, head 1
    out += _record(OFFER, 3, 1, 1) + _record(NOTIFY, 3)
    return out + _chain(0, [(_DATA + 0x400, 128, VIRTQ_DESC_F_WRITE)], 0x1000)


def seeds() -> dict[str, bytes]:
    blk, rng = bytes([sorted(DEVICES).index("blk")]), bytes([sorted(DEVICES).index("rng")])
    console = bytes([sorted(DEVICES).index("console")])
    return {
        "blk-read": blk + _blk_request(VIRTIO_BLK_T_IN, 2, 2 * SECTOR_SIZE),
        "blk-write": blk + _blk_request(VIRTIO_BLK_T_OUT, 60, SECTOR_SIZE),
        "blk-write-readonly": bytes([blk[0] | 0x80]) + _blk_request(VIRTIO_BLK_T_OUT, 1, 512),
        "blk-get-id-indirect": blk + _blk_request(VIRTIO_BLK_T_GET_ID, 0, 20, indirect=True),
        # The multiport handshake (DEVICE_READY then PORT_READY on the control transmit
        # queue, a buffer for the answers), then a receive buffer for the host's bytes.
        "console": console + _console_program(),
        "rng": rng + _program([(_DATA, 64, VIRTQ_DESC_F_WRITE)]),
        "rng-indirect": rng + _program([(_DATA, 32, VIRTQ_DESC_F_WRITE),
                                        (_DATA + 64, 32, VIRTQ_DESC_F_WRITE)], indirect=True),
    }


TARGET = Target(one=one, ci_runs=3_000, max_len=1024, seeds=seeds)
