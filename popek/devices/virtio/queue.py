"""The split virtqueue (virtio 1.1 section 2.6), written once for every virtio device.

Everything in the rings and descriptor tables is written by the guest, so every value is
checked before it is used: a chain is walked and validated in full (indices, loop bound,
lengths, RAM bounds, indirect tables) before a device touches any of its buffers, so a bad
chain never leaves a half-done request behind. A broken ring raises :class:`VirtqueueError`,
which the transport turns into the DEVICE_NEEDS_RESET state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from popek.cpu.physmem import PhysicalMemory
from popek.devices.device import bits, pack_state, unpack_state

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768  # the largest power of two a 16-bit index can tell full from empty
MAX_CHAIN_BYTES = 1 << 32  # drivers must not build longer chains (so the used length fits)
STATE_VERSION = 1

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class VirtqueueError(Exception):
    """The guest broke the virtqueue protocol; the device must stop and ask for a reset."""


class Segment(NamedTuple):
    """One guest buffer of a chain, already checked to lie wholly in RAM."""

    addr: int
    length: int
    writable: bool


class Chain:
    """A validated descriptor chain: device-readable segments, then device-writable ones.

    Devices see the two halves as byte streams, so they need not care how the driver
    split a request into descriptors.
    """

    __slots__ = ("mem", "head", "segments", "readable_len", "writable_len")

    def __init__(self, mem: PhysicalMemory, head: int, segments: list[Segment]) -> None:
        self.mem = mem
        self.head = head
        self.segments = segments
        self.readable_len = sum(s.length for s in segments if not s.writable)
        self.writable_len = sum(s.length for s in segments if s.writable)

    def _pieces(self, writable: bool, offset: int, n: int) -> list[tuple[int, int]]:
        """(guest address, length) runs covering ``n`` bytes at ``offset`` of one stream."""
        pieces = []
        for seg in self.segments:
            if seg.writable != writable or n <= 0:
                continue
            if offset >= seg.length:
                offset -= seg.length
                continue
            take = min(seg.length - offset, n)
            pieces.append((seg.addr + offset, take))
            offset = 0
            n -= take
        return pieces

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of the device-readable stream from ``offset`` (short at its end)."""
        return b"".join(self.mem.read(a, k) for a, k in self._pieces(False, offset, n))

    def write(self, offset: int, data: bytes) -> int:
        """Scatter ``data`` into the device-writable stream at ``offset``; bytes that fitted."""
        done = 0
        for addr, k in self._pieces(True, offset, len(data)):
            self.mem.write(addr, data[done:done + k])
            done += k
        return done


@dataclass
class QueueState:
    """What a snapshot carries to resume a queue mid-stream."""

    num: int = field(metadata=bits(32))
    ready: bool = False
    broken: bool = False  # the guest broke the protocol: serve nothing until reset
    desc_addr: int = field(default=0, metadata=bits(64))
    driver_addr: int = field(default=0, metadata=bits(64))
    device_addr: int = field(default=0, metadata=bits(64))
    event_idx: bool = False
    indirect: bool = False
    last_avail_idx: int = field(default=0, metadata=bits(16))
    # the device's own copy, so scribbles on the used ring change nothing
    used_idx: int = field(default=0, metadata=bits(16))
    # used index when the driver was last considered for a signal
    signalled_used: int = field(default=0, metadata=bits(16))


class Virtqueue:
    """Device side of one split virtqueue: pop available chains, push used ones.

    The transport fills in ``s.num`` and the three area addresses, then calls :meth:`enable`.
    """

    def __init__(self, mem: PhysicalMemory, num_max: int) -> None:
        if not 0 < num_max <= MAX_QUEUE_SIZE or num_max & (num_max - 1):
            raise ValueError(f"queue size {num_max} is not a power of two up to 32768")
        self.mem = mem
        self.num_max = num_max
        self.reset()

    def reset(self) -> None:
        self.s = QueueState(num=self.num_max)
        self._desc_off = self._avail_off = self._used_off = 0

    # -- setup ----------------------------------------------------------------------------
    def _ram_offset(self, addr: int, length: int, what: str) -> int:
        off = addr - self.mem.base
        if off < 0 or off + length > self.mem.size:
            raise VirtqueueError(f"{what} at {addr:#x}+{length:#x} is outside guest RAM")
        return off

    def enable(self, *, event_idx: bool, indirect: bool) -> None:
        """Start serving the queue; checked once here so ring accesses cannot fault later."""
        s = self.s
        s.ready, s.event_idx, s.indirect = True, event_idx, indirect
        if not 0 < s.num <= self.num_max or s.num & (s.num - 1):
            raise VirtqueueError(f"queue size {s.num} is not a power of two <= {self.num_max}")
        extra = 2 if event_idx else 0  # used_event / avail_event after the rings
        self._desc_off = self._ram_offset(s.desc_addr, DESC_SIZE * s.num, "descriptor table")
        self._avail_off = self._ram_offset(s.driver_addr, 4 + 2 * s.num + extra,
                                           "available ring")
        self._used_off = self._ram_offset(s.device_addr, 4 + USED_ELEM_SIZE * s.num + extra,
                                          "used ring")

    # -- guest memory ---------------------------------------------------------------------
    def _u16(self, off: int) -> int:
        if self.mem.absent_pages:
            self.mem.make_present(off, 2)
        return _U16.unpack_from(self.mem.ram, off)[0]

    def _put_u16(self, off: int, value: int) -> None:
        self.mem.write(self.mem.base + off, _U16.pack(value))

    # -- the device's side of the protocol ------------------------------------------------
    def pop(self) -> Chain | None:
        """The next available chain, fully validated, or None when the driver offered none."""
        s = self.s
        if not s.ready or s.broken:
            return None
        pending = (self._u16(self._avail_off + 2) - s.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > s.num:
            raise VirtqueueError(f"driver made {pending} buffers available on a ring of {s.num}")
        head = self._u16(self._avail_off + 4 + 2 * (s.last_avail_idx % s.num))
        chain = Chain(self.mem, head, self._walk(head))
        s.last_avail_idx = (s.last_avail_idx + 1) & 0xFFFF
        if s.event_idx:  # avail_event: notify me again once you pass what I have seen
            self._put_u16(self._used_off + 4 + USED_ELEM_SIZE * s.num, s.last_avail_idx)
        return chain

    def _walk(self, head: int) -> list[Segment]:
        ram = self.mem.ram
        table, entries = self._desc_off, self.s.num
        in_indirect = False
        segments: list[Segment] = []
        total = steps = 0
        index = head
        while True:
            if index >= entries:
                raise VirtqueueError(f"descriptor index {index} outside a table of {entries}")
            steps += 1
            if steps > entries:  # a chain can visit each entry once, so this is a loop
                raise VirtqueueError(f"descriptor chain from {head} loops")
            if self.mem.absent_pages:
                self.mem.make_present(table + DESC_SIZE * index, DESC_SIZE)
            addr, length, flags, nxt = _DESC.unpack_from(ram, table + DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.s.indirect:
                    raise VirtqueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor chained with NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.num_max:
                    raise VirtqueueError(f"indirect table of {length} bytes")
                table = self._ram_offset(addr, length, "indirect table")
                entries, in_indirect, index, steps = length // DESC_SIZE, True, 0, 0
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if segments and segments[-1].writable and not writable:
                raise VirtqueueError("device-readable buffer after a device-writable one")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtqueueError("descriptor chain longer than 4 GiB")
            if length:
                self._ram_offset(addr, length, "buffer")
            segments.append(Segment(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return segments
            index = nxt

    def rewind(self, count: int) -> None:
        """Take back the last ``count`` popped chains, unused (a device that found too
        little room for a whole packet leaves the buffers for later)."""
        self.s.last_avail_idx = (self.s.last_avail_idx - count) & 0xFFFF

    def request_kick(self) -> None:
        """Ask the driver to notify the device when it makes the next buffer available,
        even though it has not used all the earlier ones (with the event index, a driver
        only notifies for buffers past ``avail_event``); without the event index it
        always notifies, since this device never sets VIRTQ_USED_F_NO_NOTIFY."""
        s = self.s
        if s.ready and not s.broken and s.event_idx:
            self._put_u16(self._used_off + 4 + USED_ELEM_SIZE * s.num,
                          self._u16(self._avail_off + 2))

    def push_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, ``written`` bytes having been stored in it."""
        s = self.s
        self.mem.write(s.device_addr + 4 + USED_ELEM_SIZE * (s.used_idx % s.num),
                       _USED_ELEM.pack(head, written))
        s.used_idx = (s.used_idx + 1) & 0xFFFF
        self._put_u16(self._used_off + 2, s.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the used entries pushed since the last call should interrupt the driver."""
        s = self.s
        old, new = s.signalled_used, s.used_idx
        s.signalled_used = new
        if not s.ready or old == new:
            return False
        if not s.event_idx:
            return not self._u16(self._avail_off) & VIRTQ_AVAIL_F_NO_INTERRUPT
        used_event = self._u16(self._avail_off + 4 + 2 * s.num)
        # Did the used index step past used_event on its way from old to new?
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF

    # -- snapshots ------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return pack_state(STATE_VERSION, self.s)

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a saved queue; a ready queue is re-checked against this VM's RAM."""
        saved = unpack_state(QueueState, STATE_VERSION, state)
        self.reset()
        self.s = saved
        if saved.ready:
            try:
                self.enable(event_idx=saved.event_idx, indirect=saved.indirect)
            except VirtqueueError:
                saved.broken = True
