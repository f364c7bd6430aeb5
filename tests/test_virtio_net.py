"""virtio-net driven as a guest driver would, with a real socket as its cable.

Each test lays out the receive and transmit rings in guest RAM, pokes the transport's
registers, and plays the network from the other end of a socket pair speaking QEMU's
stream framing (4-byte big-endian length, frame). Host events reach the device as they
do in a machine: through the runner's event sources. Expected values come from the
virtio 1.1 layout, not from the device.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import termios
from collections.abc import Iterator

import pytest

from popek.cpu.physmem import PhysicalMemory
from popek.devices.virtio import VirtioMMIO
from popek.devices.virtio.mmio import (
    INT_CONFIG,
    INT_VRING,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    Reg,
)
from popek.devices.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VirtioNet,
    default_mac,
)
from popek.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from popek.machine.runner import EventSources
from popek.net.pcap import PcapWriter
from popek.net.stream import RECV_CHUNK, StreamBackend

RAM = 0x8000_0000
RAM_SIZE = 2 << 20
NUM = 32
RINGS = {0: RAM + 0x1000, 1: RAM + 0x4000}  # per queue: descriptors, +0x1000 avail, +0x2000 used
DATA = RAM + 0x10000
MAC = "52:54:00:ab:cd:ef"
FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MAC \
    | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CSUM
HDR = 12
RX, TX = 0, 1


def eth(payload: bytes, ethertype: int = 0x88B5) -> bytes:
    """An Ethernet frame from MAC to broadcast (0x88b5: the local experimental type)."""
    return b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + struct.pack(">H", ethertype) \
        + payload


class NetDriver:
    """A minimal virtio-net guest driver with a receive and a transmit queue."""

    def __init__(self, features: int = FEATURES) -> None:
        self.mem = PhysicalMemory(RAM, RAM_SIZE)
        self.peer, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backend = StreamBackend(ours)
        self.events = EventSources()
        self.levels: list[bool] = []
        self.net = VirtioNet(self.backend, MAC, self.events)
        self.dev = VirtioMMIO(self.mem, self.net, self.levels.append)
        self.net.attach(self.dev)
        self.heap = DATA
        self.start(features)

    def start(self, features: int) -> None:
        self.features = features
        self.wr(Reg.STATUS, 0)
        self.next_desc = {RX: 0, TX: 0}
        self.avail_idx = {RX: 0, TX: 0}
        self.seen_used = {RX: 0, TX: 0}
        for base in RINGS.values():
            self.mem.write(base, bytes(0x3000))
        for status in (STATUS_ACKNOWLEDGE, STATUS_DRIVER):
            self.wr(Reg.STATUS, self.rd(Reg.STATUS) | status)
        for sel in (0, 1):
            self.wr(Reg.DRIVER_FEATURES_SEL, sel)
            self.wr(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.rd(Reg.STATUS) & STATUS_FEATURES_OK
        for index, base in RINGS.items():
            self.wr(Reg.QUEUE_SEL, index)
            self.wr(Reg.QUEUE_NUM, NUM)
            for reg, addr in ((Reg.QUEUE_DESC_LOW, base), (Reg.QUEUE_DRIVER_LOW, base + 0x1000),
                              (Reg.QUEUE_DEVICE_LOW, base + 0x2000)):
                self.wr(reg, addr & 0xFFFF_FFFF)
                self.wr(reg + 4, addr >> 32)
            self.wr(Reg.QUEUE_READY, 1)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                | STATUS_DRIVER_OK)

    def close(self) -> None:
        self.peer.close()
        self.backend.close()
        self.events.close()

    # registers and memory
    def rd(self, reg: int) -> int:
        return self.dev.read(reg, 4)

    def wr(self, reg: int, value: int) -> None:
        self.dev.write(reg, 4, value)

    def put(self, data: bytes) -> int:
        addr = self.heap
        self.mem.write(addr, data)
        self.heap += (len(data) + 15) & ~15
        return addr

    def u16(self, addr: int) -> int:
        return struct.unpack("<H", self.mem.read(addr, 2))[0]

    # rings
    def chain(self, queue: int, segments: list[tuple[int, int, bool]]) -> int:
        """Put a chain in the queue's descriptor table and make it available; its head."""
        desc = RINGS[queue]
        indices = [(self.next_desc[queue] + i) % NUM for i in range(len(segments))]
        self.next_desc[queue] = (self.next_desc[queue] + len(segments)) % NUM
        for i, (addr, length, writable) in enumerate(segments):
            last = i + 1 == len(segments)
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(desc + 16 * indices[i], struct.pack(
                "<QIHH", addr, length, flags, 0 if last else indices[i + 1]))
        avail = desc + 0x1000
        self.mem.write(avail + 4 + 2 * (self.avail_idx[queue] % NUM),
                       struct.pack("<H", indices[0]))
        self.avail_idx[queue] = (self.avail_idx[queue] + 1) & 0xFFFF
        self.mem.write(avail + 2, struct.pack("<H", self.avail_idx[queue]))
        return indices[0]

    def kick(self, queue: int) -> None:
        self.wr(Reg.QUEUE_NOTIFY, queue)

    def used_idx(self, queue: int) -> int:
        return self.u16(RINGS[queue] + 0x2000 + 2)

    def take_used(self, queue: int) -> list[tuple[int, int]]:
        """(head, length) of every used entry the device added since the last call."""
        used = RINGS[queue] + 0x2000
        entries = []
        while self.seen_used[queue] != self.used_idx(queue):
            entries.append(struct.unpack("<II", self.mem.read(
                used + 4 + 8 * (self.seen_used[queue] % NUM), 8)))
            self.seen_used[queue] = (self.seen_used[queue] + 1) & 0xFFFF
        return entries

    def ack(self) -> None:
        self.wr(Reg.INTERRUPT_ACK, self.rd(Reg.INTERRUPT_STATUS))

    # the network
    def post_rx(self, size: int, count: int = 1) -> list[tuple[int, int]]:
        """Make ``count`` receive buffers of ``size`` bytes available; (head, address)."""
        posted = []
        for _ in range(count):
            addr = self.put(b"\xee" * size)
            posted.append((self.chain(RX, [(addr, size, True)]), addr))
        self.kick(RX)
        return posted

    def transmit(self, frame: bytes, split: int = HDR) -> int:
        """Send one frame, header and frame in two descriptors (as Linux does); its head."""
        whole = bytes(HDR) + frame
        head = self.chain(TX, [(self.put(whole[:split]), split, False),
                               (self.put(whole[split:]), len(whole) - split, False)])
        self.kick(TX)
        return head

    def send_from_host(self, *frames: bytes) -> None:
        self.peer.sendall(b"".join(struct.pack(">I", len(f)) + f for f in frames))

    def host_events(self) -> None:
        """What the runner does between slices: handle every ready host descriptor."""
        self.events.dispatch(0)

    def read_from_host(self, n: int) -> list[bytes]:
        """The next ``n`` frames the peer receives."""
        self.peer.settimeout(5)
        frames = []
        buf = b""
        while len(frames) < n:
            while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
                buf += self.peer.recv(1 << 20)
            size = struct.unpack(">I", buf[:4])[0]
            frames.append(buf[4:4 + size])
            buf = buf[4 + size:]
        return frames

    def received(self, posted: list[tuple[int, int]], used: list[tuple[int, int]]) -> bytes:
        """The header and bytes of a frame the device wrote into used receive buffers."""
        addrs = dict(posted)
        return b"".join(self.mem.read(addrs[head], length) for head, length in used)


@pytest.fixture
def drv() -> Iterator[NetDriver]:
    driver = NetDriver()
    yield driver
    driver.close()


def assert_needs_reset(drv: NetDriver) -> None:
    assert drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert drv.rd(Reg.INTERRUPT_STATUS) & INT_CONFIG
    assert drv.dev.s.error


# -- identity ------------------------------------------------------------------------------
def test_registers_and_config_space_describe_a_network_card(drv: NetDriver) -> None:
    assert drv.rd(Reg.DEVICE_ID) == 1
    drv.wr(Reg.DEVICE_FEATURES_SEL, 0)
    features = drv.rd(Reg.DEVICE_FEATURES)
    assert features & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS) \
        == VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS
    assert bytes(drv.dev.read(Reg.CONFIG + i, 1) for i in range(6)).hex(":") == MAC
    assert drv.dev.read(Reg.CONFIG + 6, 2) == 1  # VIRTIO_NET_S_LINK_UP
    for queue in (RX, TX):
        drv.wr(Reg.QUEUE_SEL, queue)
        assert drv.rd(Reg.QUEUE_NUM_MAX) == 256


def test_default_macs_count_up_from_qemus() -> None:
    assert [default_mac(i) for i in range(3)] == \
        ["52:54:00:12:34:56", "52:54:00:12:34:57", "52:54:00:12:34:58"]


# -- transmit ------------------------------------------------------------------------------
def test_transmitted_frames_reach_the_peer_in_stream_framing(drv: NetDriver) -> None:
    frames = [eth(b"first"), eth(bytes(range(256)) * 4)]
    heads = [drv.transmit(frame) for frame in frames]
    assert drv.read_from_host(2) == frames
    assert drv.take_used(TX) == [(heads[0], 0), (heads[1], 0)]
    assert drv.rd(Reg.INTERRUPT_STATUS) & INT_VRING and drv.levels[-1] is True
    assert drv.net.counters.tx_frames == 2


def test_announce_broadcasts_a_rarp_from_the_mac(drv: NetDriver) -> None:
    drv.net.announce()  # as a guest that migrated here does
    frame = drv.read_from_host(1)[0]
    mac = bytes.fromhex(MAC.replace(":", ""))
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x80\x35"  # RARP
    assert struct.unpack(">HHBBH", frame[14:22]) == (1, 0x0800, 6, 4, 3)
    assert frame[22:28] == mac and frame[32:38] == mac


def test_a_header_split_across_descriptors_is_read_as_one_stream(drv: NetDriver) -> None:
    frame = eth(b"split")
    drv.transmit(frame, split=5)
    assert drv.read_from_host(1) == [frame]


def test_runt_and_oversized_guest_frames_are_dropped_and_counted(drv: NetDriver) -> None:
    drv.transmit(b"short")  # less than an Ethernet header
    drv.transmit(eth(bytes(70_000)))  # more than any Ethernet frame
    good = eth(b"after them")
    drv.transmit(good)
    assert drv.read_from_host(1) == [good]
    assert len(drv.take_used(TX)) == 3  # every buffer went back to the guest
    c = drv.net.counters
    assert (c.tx_runts, c.tx_oversized, c.tx_frames) == (1, 1, 1)


def test_full_socket_holds_transmit_buffers_until_it_drains(drv: NetDriver) -> None:
    """Flow control: frames the socket cannot take wait in the guest's ring, not in popek,
    and the device waits for the socket to drain instead of dropping them."""
    frame = eth(bytes(60_000))
    for _ in range(16):  # a megabyte: far more than a socket buffer holds
        drv.transmit(frame)
    taken = len(drv.take_used(TX))
    assert taken < 16
    assert watched(drv)[1] is not None  # waits to write
    expected = (struct.pack(">I", len(frame)) + frame) * 16
    got = bytearray()
    drv.peer.setblocking(False)
    for _ in range(10_000):
        if len(got) == len(expected):
            break
        try:
            got += drv.peer.recv(1 << 20)
        except BlockingIOError:
            drv.host_events()  # the socket drained: the device carries on
    assert got == expected
    assert taken + len(drv.take_used(TX)) == 16


def _ones_complement(data: bytes) -> int:
    """RFC 1071's checksum, word by word: the reference the device is checked against."""
    data += b"\0" * (len(data) & 1)
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _ipv4(proto: int, payload: bytes) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0,
                         socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2"))
    header = header[:10] + struct.pack(">H", ~_ones_complement(header) & 0xFFFF) + header[12:]
    return header + payload


def _partial(proto: int, l4: bytes, field: int) -> bytes:
    """An IPv4 frame as Linux hands it over with CHECKSUM_PARTIAL: the pseudo-header sum
    (folded, not inverted) in the transport checksum field."""
    pseudo = socket.inet_aton("10.0.2.15") + socket.inet_aton("10.0.2.2") \
        + struct.pack(">BBH", 0, proto, len(l4))
    l4 = l4[:field] + struct.pack(">H", _ones_complement(pseudo)) + l4[field + 2:]
    return b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + b"\x08\x00" + _ipv4(proto, l4)


@pytest.mark.parametrize(("proto", "field", "payload"), [
    (17, 6, b"an even udp payload!"), (17, 6, b"odd"), (6, 16, bytes(range(256)) * 200)])
def test_checksums_left_to_the_device_are_completed(drv: NetDriver, tmp_path,
                                                    proto: int, field: int,
                                                    payload: bytes) -> None:
    header = struct.pack(">HHHH", 5000, 5001, 8 + len(payload), 0) if proto == 17 else \
        struct.pack(">HHIIBBHHH", 5000, 80, 1, 0, 0x50, 0x18, 512, 0, 0)
    partial = _partial(proto, header + payload, field)
    whole = bytes(HDR) + partial
    hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 14 + 20, field, 0)  # NEEDS_CSUM
    drv.chain(TX, [(drv.put(hdr), HDR, False), (drv.put(whole[HDR:]), len(partial), False)])
    drv.kick(TX)
    sent = drv.read_from_host(1)[0]
    pseudo = sent[26:34] + struct.pack(">BBH", 0, proto, len(sent) - 34)
    assert _ones_complement(pseudo + sent[34:]) == 0xFFFF  # the receiver's check passes
    assert sent[:34 + field] == partial[:34 + field]  # nothing else changed
    assert sent[34 + field + 2:] == partial[34 + field + 2:]
    pcap = tmp_path / "tx.pcap"
    writer = PcapWriter(os.open(pcap, os.O_WRONLY | os.O_CREAT, 0o644))
    writer.write(sent)
    writer.close()
    dump = subprocess.run(["tcpdump", "-nn", "-vv", "-r", str(pcap)], capture_output=True,
                          text=True, check=True).stdout
    assert ("[udp sum ok]" if proto == 17 else " (correct),") in dump, dump  # it checked


def test_a_checksum_placed_outside_the_frame_drops_it(drv: NetDriver) -> None:
    frame = eth(bytes(40))
    hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 14, 100, 0)  # the field lies past the end
    drv.chain(TX, [(drv.put(hdr + frame), HDR + len(frame), False)])
    drv.kick(TX)
    good = eth(b"next")
    drv.transmit(good)
    assert drv.read_from_host(1) == [good]
    assert drv.net.counters.tx_bad_checksum == 1


# -- receive -------------------------------------------------------------------------------
@pytest.mark.parametrize("guest_csum", [True, False])
def test_received_frame_lands_in_a_buffer_behind_its_header(guest_csum: bool) -> None:
    drv = NetDriver(FEATURES | (VIRTIO_NET_F_GUEST_CSUM if guest_csum else 0))
    posted = drv.post_rx(2048, 4)
    frame = eth(b"from the host")
    drv.send_from_host(frame)
    drv.host_events()
    used = drv.take_used(RX)
    assert used == [(posted[0][0], HDR + len(frame))]
    data = drv.received(posted, used)
    flags = VIRTIO_NET_HDR_F_DATA_VALID if guest_csum else 0  # only if the driver asked
    assert data[:HDR] == struct.pack("<BBHHHHH", flags, 0, 0, 0, 0, 0, 1)  # one buffer
    assert data[HDR:] == frame
    assert drv.rd(Reg.INTERRUPT_STATUS) & INT_VRING
    drv.close()


def test_a_64k_frame_spans_mergeable_buffers(drv: NetDriver) -> None:
    posted = drv.post_rx(4096, 20)
    frame = eth(random.Random(1).randbytes(65_000))
    drv.send_from_host(frame)
    drv.host_events()
    used = drv.take_used(RX)
    buffers = -(-(HDR + len(frame)) // 4096)
    assert len(used) == buffers == 16
    assert [length for _, length in used[:-1]] == [4096] * (buffers - 1)
    data = drv.received(posted, used)
    assert struct.unpack_from("<H", data, 10)[0] == buffers  # num_buffers
    assert data[HDR:] == frame


def test_without_mergeable_buffers_a_frame_too_big_for_one_is_dropped(drv: NetDriver) -> None:
    drv.start(FEATURES & ~VIRTIO_NET_F_MRG_RXBUF)
    posted = drv.post_rx(1526, 2)
    small = eth(b"fits")
    drv.send_from_host(eth(bytes(3000)), small)
    drv.host_events()
    used = drv.take_used(RX)
    assert used == [(posted[0][0], HDR + len(small))]  # the buffer was kept for the next
    assert drv.received(posted, used)[HDR:] == small
    assert drv.net.counters.rx_oversized == 1


def test_with_no_receive_buffers_the_device_stops_reading_the_host(drv: NetDriver) -> None:
    """Flow control: the descriptor is no longer watched (so the runner cannot spin on
    it); the guest's kick for new buffers resumes delivery, in order, nothing lost."""
    frames = [eth(bytes([i]) * 100) for i in range(10)]
    drv.send_from_host(*frames)
    posted = drv.post_rx(2048, 3)
    drv.host_events()
    used = drv.take_used(RX)
    assert len(used) == 3
    assert watched(drv)[0] is None
    avail_event = drv.u16(RINGS[RX] + 0x2000 + 4 + 8 * NUM)
    assert avail_event == drv.avail_idx[RX]  # "kick me for the next buffer you add"
    posted += drv.post_rx(2048, 7)  # the kick resumes delivery
    used += drv.take_used(RX)
    assert [drv.received(posted, [u])[HDR:] for u in used] == frames
    assert watched(drv)[0] is not None


def test_a_flood_fills_the_guests_buffers_and_waits_in_the_socket(drv: NetDriver) -> None:
    posted = drv.post_rx(2048, 8)
    drv.peer.setblocking(False)
    frame = eth(bytes(1400))
    sent = 0
    for _ in range(3):  # fill the socket, let the device read, fill what it freed again
        with contextlib.suppress(BlockingIOError):
            while True:
                drv.peer.send(struct.pack(">I", len(frame)) + frame)
                sent += 1
        drv.host_events()
    assert len(drv.take_used(RX)) == 8 < sent
    # popek holds at most one read of the socket; the rest waits in the kernel.
    assert len(drv.backend._in) <= RECV_CHUNK + 4 + len(frame)
    unread = array.array("i", [0])
    fcntl.ioctl(drv.backend.fileno(), termios.FIONREAD, unread)
    assert unread[0] > 0
    assert drv.received(posted, drv.take_used(RX)) == b""  # nothing more was written


def test_runt_and_oversized_host_frames_are_dropped_and_counted(drv: NetDriver) -> None:
    posted = drv.post_rx(2048, 4)
    good = eth(b"still in step")
    drv.peer.sendall(struct.pack(">I", 5) + b"runt!")
    drv.peer.sendall(struct.pack(">I", 70_000) + bytes(70_000))  # skipped, never buffered
    drv.send_from_host(good)
    for _ in range(3):
        drv.host_events()
    used = drv.take_used(RX)
    assert [drv.received(posted, [u])[HDR:] for u in used] == [good]
    assert drv.net.stats()["rx_runts"] == 1 and drv.net.stats()["host_dropped"] == 1


def test_frames_before_the_driver_is_ready_are_lost_as_on_a_real_nic(drv: NetDriver) -> None:
    drv.wr(Reg.STATUS, 0)
    drv.send_from_host(eth(b"too early"))
    drv.host_events()
    assert drv.net.counters.rx_not_ready == 1
    drv.start(FEATURES)
    posted = drv.post_rx(2048, 2)
    drv.host_events()
    assert drv.take_used(RX) == []
    later = eth(b"now")
    drv.send_from_host(later)
    drv.host_events()
    assert drv.received(posted, drv.take_used(RX))[HDR:] == later


# -- a hostile guest -----------------------------------------------------------------------
@pytest.mark.parametrize("segments", [
    [(DATA, 2048, False)],  # a receive buffer the device may not write
    [(DATA, 8, True)],  # too small for the header
    [(RAM + RAM_SIZE - 100, 2048, True)],  # runs off the end of RAM
])
def test_malformed_receive_buffers_need_a_reset(drv: NetDriver, segments) -> None:
    drv.chain(RX, segments)
    drv.kick(RX)
    drv.send_from_host(eth(b"x"))
    drv.host_events()
    assert_needs_reset(drv)
    drv.send_from_host(eth(b"y"))
    drv.host_events()  # the broken device drops what comes, raising nothing
    assert drv.net.counters.rx_not_ready >= 1


def test_malformed_transmit_chains_need_a_reset(drv: NetDriver) -> None:
    drv.chain(TX, [(drv.put(bytes(8)), 8, False)])  # shorter than the header
    drv.kick(TX)
    assert_needs_reset(drv)
    drv.start(FEATURES)
    desc = RINGS[TX]
    drv.mem.write(desc, struct.pack("<QIHH", DATA, 100, VIRTQ_DESC_F_NEXT, 0))  # a loop
    drv.mem.write(desc + 0x1000 + 4, struct.pack("<H", 0))
    drv.mem.write(desc + 0x1000 + 2, struct.pack("<H", 1))
    drv.kick(TX)
    assert_needs_reset(drv)
    drv.start(FEATURES)  # a reset brings it back
    frame = eth(b"after the reset")
    drv.transmit(frame)
    assert drv.read_from_host(1) == [frame]


def test_random_rings_and_frames_never_raise() -> None:
    rng = random.Random(4321)
    drv = NetDriver()
    try:
        for round_ in range(300):
            for queue, base in RINGS.items():
                table = bytearray(rng.randbytes(16 * NUM))
                for i in range(NUM):  # half the addresses into RAM, so chains get far
                    if rng.random() < 0.5:
                        struct.pack_into("<QI", table, 16 * i, RAM + rng.randrange(RAM_SIZE),
                                         rng.randrange(1 << 13))
                        struct.pack_into("<H", table, 16 * i + 14, rng.randrange(NUM + 2))
                drv.mem.write(base, bytes(table))
                drv.mem.write(base + 0x1002, rng.randbytes(2 + 2 * NUM))
                drv.kick(queue)
            size = rng.choice([0, 3, 14, 60, 1514, 9000, 65_000])
            drv.send_from_host(rng.randbytes(size))
            drv.host_events()
            if drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET or round_ % 50 == 0:
                drv.start(FEATURES if rng.random() < 0.5 else FEATURES & ~VIRTIO_NET_F_MRG_RXBUF)
        frame = eth(b"alive")
        drv.start(FEATURES)
        drv.transmit(frame)
        got = b""  # whatever the garbage sent, then this frame
        drv.peer.setblocking(False)
        for _ in range(10_000):
            if got.endswith(frame):
                break
            try:
                got += drv.peer.recv(1 << 20)
            except BlockingIOError:
                drv.host_events()
        assert got.endswith(struct.pack(">I", len(frame)) + frame)
    finally:
        drv.close()


# -- snapshots -----------------------------------------------------------------------------
def test_state_round_trips_and_refuses_another_nics(drv: NetDriver) -> None:
    drv.transmit(eth(b"counted"))
    state = json.loads(json.dumps(drv.dev.save_state()))
    assert state["backend"]["mac"] == MAC and state["backend"]["counters"]["tx_frames"] == 1
    other = NetDriver()
    try:
        other.dev.load_state(state)
        assert other.net.counters.tx_frames == 1
        assert other.dev.save_state() == state
        stranger = VirtioNet(other.backend, "52:54:00:00:00:01", other.events)
        with pytest.raises(ValueError, match="MAC"):
            VirtioMMIO(other.mem, stranger, other.levels.append).load_state(state)
    finally:
        other.close()


@pytest.mark.parametrize("counters", [{"rx_not_ready": "3"}, {"tx_frames": True},
                                      {"rx_bytes": None}, {"rx_frames": 1.5}, "none"])
def test_state_with_counters_that_are_not_counts_is_refused(drv: NetDriver,
                                                           counters: object) -> None:
    """Found by the snapshot fuzz target: such a snapshot restored, and the first frame
    then raised TypeError in the worker."""
    state = json.loads(json.dumps(drv.dev.save_state()))
    good = state["backend"]["counters"]
    state["backend"]["counters"] = {**good, **counters} if isinstance(counters, dict) \
        else counters
    with pytest.raises(ValueError, match="NetCounters"):
        drv.dev.load_state(state)


def watched(drv: NetDriver) -> tuple:
    """(readable, writable) handlers the device has registered for its backend."""
    return drv.events._handlers.get(drv.backend.fileno(), (None, None))
