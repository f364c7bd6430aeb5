"""virtio-net (virtio 1.1 section 5.1): an Ethernet NIC whose cable is a host backend.

Two queues: the guest's transmit queue is served when the guest kicks it, the receive
queue when the host has a frame, which the backend's descriptor tells the machine
runner (Firecracker's pattern: host events drive the device). Receive buffers are
mergeable (``VIRTIO_NET_F_MRG_RXBUF``): a frame of up to 64 KiB spans as many of the
guest's small buffers as it needs, so passt's 65520-byte MTU works and a bulk transfer
costs a few large frames instead of many small ones.

Checksums are offloaded both ways, since Linux 6.1 on RISC-V checksums in generic C, at
about two instructions a byte: received frames are marked ``DATA_VALID``
(``VIRTIO_NET_F_GUEST_CSUM``), as nothing on a local socket can corrupt them (and a
hostile peer gains nothing, it chooses the payload anyway); the guest leaves transmitted
frames' TCP/UDP checksums to the device (``VIRTIO_NET_F_CSUM``), which completes them in
one big-integer operation before any peer sees the frame. On a 16 MiB download the
guest's verification alone was 45% of its instructions.

Flow control both ways: when the guest has no receive buffers, the device stops
reading the backend (the frame in hand waits, nothing else is buffered) and asks the
guest to kick when it posts some; when the backend's socket is full, the device stops
taking transmit buffers until it drains. A chain that breaks the protocol puts the
device in DEVICE_NEEDS_RESET (the transport's path); a runt or oversized frame, from
either side, is dropped and counted.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any

from popek.devices.device import HostEvents, check_version, unpack_fields
from popek.devices.virtio.mmio import VirtioMMIO
from popek.devices.virtio.queue import Virtqueue, VirtqueueError
from popek.net.backend import MAX_FRAME, MIN_FRAME, NetBackend

DEVICE_ID_NET = 1

VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2

RX, TX = 0, 1
QUEUE_SIZE = 256  # QEMU's default: 16 frames of 64 KiB in flight in the guest's 4 KiB buffers
RX_BATCH = 64  # frames taken from the host per event, so a flood cannot starve the harts
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HEADER = struct.Struct("<BBHHHHH")
DEFAULT_MAC = "52:54:00:12:34:56"  # QEMU's first NIC; the next ones count up
STATE_VERSION = 1


def complete_checksum(frame: memoryview, start: int, offset: int) -> bytearray | None:
    """``frame`` with the checksum the guest left to the device (NEEDS_CSUM): the 16-bit
    ones' complement sum of everything from ``start`` (which includes the pseudo-header
    sum Linux put in the field), inverted, stored at ``start + offset``; None if that
    lies outside the frame.

    Since 2**16 = 1 (mod 0xFFFF), the bytes read as one big number are congruent to the
    sum of their 16-bit words, so one big-integer remainder replaces the loop."""
    field = start + offset
    if offset < 0 or field + 2 > len(frame):
        return None
    data = bytes(frame[start:]) + b"\0" * ((len(frame) - start) & 1)
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):  # a nonzero multiple of 0xFFFF sums to 0xFFFF
        total = 0xFFFF
    out = bytearray(frame)
    # 0 would mean "no checksum" to UDP: send its equal, 0xFFFF (as Linux does).
    out[field:field + 2] = ((~total & 0xFFFF) or 0xFFFF).to_bytes(2, "big")
    return out


def default_mac(index: int) -> str:
    """The MAC QEMU gives NIC ``index`` when none is set."""
    value = int(DEFAULT_MAC.replace(":", ""), 16) + index
    return ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))


ETHERTYPE_RARP = 0x8035


@dataclass
class NetCounters:
    """What the NIC passed and dropped, both ways (visible in the device's state)."""

    rx_frames: int = 0
    rx_bytes: int = 0
    rx_runts: int = 0  # from the host, shorter than an Ethernet header
    rx_oversized: int = 0  # from the host, larger than MAX_FRAME or than the guest's buffer
    rx_not_ready: int = 0  # arrived while the guest's driver was not set up
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_runts: int = 0
    tx_oversized: int = 0
    tx_bad_checksum: int = 0  # asked for a checksum at a place outside the frame


class VirtioNet:
    """A virtio network device on one backend; :meth:`attach` it to its transport."""

    device_id = DEVICE_ID_NET
    features = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_MAC \
        | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, backend: NetBackend, mac: str, events: HostEvents) -> None:
        self.backend = backend
        self.events = events
        self.mac = mac
        # mac, status (the link is always up: the cable is the backend)
        self.config = bytes.fromhex(mac.replace(":", "")) + struct.pack("<H", VIRTIO_NET_S_LINK_UP)
        self.counters = NetCounters()
        self.transport: VirtioMMIO | None = None
        self._pending: bytes | None = None  # a host frame waiting for receive buffers
        self._rx_stalled = False  # the guest had no room: wait for its kick, not the host
        self._watched: int | None = None

    def attach(self, transport: VirtioMMIO) -> None:
        """Start serving: from now on the backend's descriptor is watched."""
        self.transport = transport
        self._rearm()

    def replugged(self) -> None:
        """The backend carries on over a new socket: watch that one."""
        self._rx_stalled = False
        self._rearm()

    def detach(self) -> None:
        """The machine is going away; the backend stays open for its owner."""
        if self._watched is not None:
            self.events.watch(self._watched, None)
        self._watched = None
        self.transport = None

    # -- the guest's kicks ----------------------------------------------------------------
    def process(self, index: int, queue: Virtqueue) -> None:
        if index == RX:  # new receive buffers
            self._rx_stalled = False
            self._receive(index, queue)
        else:
            self._transmit(index, queue)
        self._rearm()

    # -- host events ----------------------------------------------------------------------
    def _on_readable(self) -> None:
        self.transport.serve(RX, self._receive)
        self._rearm()

    def _on_writable(self) -> None:
        self.backend.flush()
        if self.backend.ready_to_send():
            self.transport.serve(TX, self._transmit)
        self._rearm()

    def _rearm(self) -> None:
        """Watch the backend for what the device can take now: frames unless the guest
        has no room for them, writability while a frame is held back."""
        if self.transport is None:
            return
        fd = self.backend.fileno()
        if fd != self._watched and self._watched is not None:
            self.events.watch(self._watched, None)
        self._watched = fd
        if fd is not None:
            self.events.watch(fd, None if self._rx_stalled else self._on_readable,
                              None if self.backend.ready_to_send() else self._on_writable)

    # -- receiving ------------------------------------------------------------------------
    def _receive(self, index: int, queue: Virtqueue) -> None:
        """Move frames from the host into the guest's buffers, a batch at a time."""
        live = self.transport.driver_ok and queue.s.ready
        c = self.counters
        for _ in range(RX_BATCH):
            frame, self._pending = self._pending, None
            if frame is None:
                frame = self.backend.receive()
                if frame is None:
                    return
            if not live:
                c.rx_not_ready += 1  # as a NIC without a driver: the frame is lost
            elif len(frame) < MIN_FRAME:
                c.rx_runts += 1
            elif len(frame) > MAX_FRAME:
                c.rx_oversized += 1
            elif not self._deliver(queue, frame):
                self._pending = frame
                self._rx_stalled = True
                queue.request_kick()
                return

    def _deliver(self, queue: Virtqueue, frame: bytes) -> bool:
        """Write ``frame`` into as many receive buffers as it needs (one without mergeable
        buffers); False, taking none, if the guest has too few."""
        features = self.transport.s.driver_features
        mergeable = features & VIRTIO_NET_F_MRG_RXBUF
        size = HEADER.size + len(frame)
        chains = []
        room = 0
        while room < size:
            chain = queue.pop()
            if chain is None:
                queue.rewind(len(chains))
                return False
            if chain.readable_len or chain.writable_len < HEADER.size:
                raise VirtqueueError("receive buffer is not one device-writable area of "
                                     f"at least {HEADER.size} bytes")
            chains.append(chain)
            room += chain.writable_len
            if not mergeable:
                break
        if room < size:  # a lone buffer too small: the frame is lost, the buffer kept
            queue.rewind(1)
            self.counters.rx_oversized += 1
            return True
        flags = VIRTIO_NET_HDR_F_DATA_VALID if features & VIRTIO_NET_F_GUEST_CSUM else 0
        data = memoryview(HEADER.pack(flags, 0, 0, 0, 0, 0, len(chains)) + frame)
        done = 0
        for chain in chains:
            written = chain.write(0, data[done:done + chain.writable_len])
            queue.push_used(chain.head, written)
            done += written
        self.counters.rx_frames += 1
        self.counters.rx_bytes += len(frame)
        return True

    # -- transmitting ---------------------------------------------------------------------
    def _transmit(self, index: int, queue: Virtqueue) -> None:
        c = self.counters
        offload = self.transport.s.driver_features & VIRTIO_NET_F_CSUM
        while self.backend.ready_to_send():
            chain = queue.pop()
            if chain is None:
                return
            size = chain.readable_len - HEADER.size
            if size < 0:
                raise VirtqueueError("transmit buffer shorter than the virtio-net header")
            if size < MIN_FRAME:
                c.tx_runts += 1
            elif size > MAX_FRAME:
                c.tx_oversized += 1
            else:
                packet = chain.read(0, chain.readable_len)
                flags, _, _, _, start, offset, _ = HEADER.unpack_from(packet)
                frame = memoryview(packet)[HEADER.size:]
                if offload and flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    frame = complete_checksum(frame, start, offset)
                if frame is None:
                    c.tx_bad_checksum += 1
                else:
                    self.backend.send(frame)
                    c.tx_frames += 1
                    c.tx_bytes += size
            queue.push_used(chain.head, 0)

    def announce(self) -> None:
        """Tell the network this MAC is here now (the guest moved: a live migration), as
        QEMU's announce-self does: a broadcast RARP request from the MAC, so that a
        learning switch sends the guest's frames to its new port. A full socket drops it."""
        mac = bytes.fromhex(self.mac.replace(":", ""))
        rarp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
        frame = (b"\xff" * 6 + mac + struct.pack(">H", ETHERTYPE_RARP) + rarp).ljust(60, b"\0")
        if self.backend.ready_to_send():
            self.backend.send(frame)
            self.counters.tx_frames += 1
            self.counters.tx_bytes += len(frame)

    # -- reporting and snapshots ----------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {**asdict(self.counters), "host_dropped": self.backend.dropped}

    def save_state(self) -> dict[str, Any]:
        """Counters and identity; a frame in flight is not kept (networks lose frames)."""
        return {"version": STATE_VERSION, "mac": self.mac, "counters": asdict(self.counters)}

    def load_state(self, state: dict[str, Any]) -> None:
        check_version(state, STATE_VERSION)
        if state["mac"] != self.mac:
            raise ValueError(f"snapshot NIC has MAC {state['mac']}, this one {self.mac}")
        self.counters = unpack_fields(NetCounters, state["counters"])
        self._pending = None
        self._rx_stalled = False
        self._rearm()
