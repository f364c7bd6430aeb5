"""virtio-mmio, split virtqueue, virtio-blk and virtio-rng, driven as a guest driver would.

Each test builds descriptor tables and rings in guest RAM and pokes the transport's
registers; expected values come from the virtio 1.1 layout, not from the device.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.cpu.physmem import PhysicalMemory
from popek.devices.virtio import ImageNotFoundError, VirtioBlk, VirtioMMIO, VirtioRng
from popek.devices.virtio.blk import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from popek.devices.virtio.mmio import (
    INT_CONFIG,
    INT_VRING,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    Reg,
)
from popek.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Virtqueue,
)

RAM = 0x8000_0000
RAM_SIZE = 1 << 20
DESC = RAM + 0x1000
AVAIL = RAM + 0x2000
USED = RAM + 0x3000
INDIRECT = RAM + 0x4000
DATA = RAM + 0x10000
NUM = 16
SECTOR = 512
ALL_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX


class Raises(list):
    """What a device tells its interrupt line, as the PLIC hears it: each raise (a new
    request, even while high) and each fall from high; a line driven low while low
    (the device updating it with nothing to say) is no event."""

    def __call__(self, level: bool) -> None:
        if level or (self and self[-1]):
            self.append(level)


class Driver:
    """A minimal guest virtio driver working on one queue, written from the spec."""

    def __init__(self, backend: Any, mem: PhysicalMemory | None = None,
                 dev: VirtioMMIO | None = None, queue: int = 0) -> None:
        """``queue``: the queue this driver works (its rings 16 KiB further per index)."""
        self.mem = mem or PhysicalMemory(RAM, RAM_SIZE)
        self.levels = Raises()
        self.dev = dev or VirtioMMIO(self.mem, backend, self.levels)
        self.queue = queue
        self.desc, self.avail, self.used_ring = (ring + queue * 0x4000
                                                 for ring in (DESC, AVAIL, USED))
        self.next_desc = 0
        self.avail_idx = 0
        self.heap = DATA

    # registers
    def rd(self, reg: int) -> int:
        return self.dev.read(reg, 4)

    def wr(self, reg: int, value: int) -> None:
        self.dev.write(reg, 4, value)

    def device_features(self) -> int:
        self.wr(Reg.DEVICE_FEATURES_SEL, 0)
        low = self.rd(Reg.DEVICE_FEATURES)
        self.wr(Reg.DEVICE_FEATURES_SEL, 1)
        return low | self.rd(Reg.DEVICE_FEATURES) << 32

    def negotiate(self, features: int) -> bool:
        self.wr(Reg.STATUS, 0)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.wr(Reg.DRIVER_FEATURES_SEL, sel)
            self.wr(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return bool(self.rd(Reg.STATUS) & STATUS_FEATURES_OK)

    def start(self, features: int = ALL_FEATURES, num: int = NUM) -> Driver:
        """Negotiate, lay the ring out in RAM and set DRIVER_OK, as Linux's probe does."""
        assert self.negotiate(features)
        self.setup_queue(num)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                | STATUS_DRIVER_OK)
        return self

    def setup_queue(self, num: int = NUM) -> None:
        """Lay this driver's queue out in RAM and make it ready."""
        self.wr(Reg.QUEUE_SEL, self.queue)
        self.wr(Reg.QUEUE_NUM, num)
        for low, addr in ((Reg.QUEUE_DESC_LOW, self.desc), (Reg.QUEUE_DRIVER_LOW, self.avail),
                          (Reg.QUEUE_DEVICE_LOW, self.used_ring)):
            self.wr(low, addr & 0xFFFF_FFFF)
            self.wr(low + 4, addr >> 32)
        self.wr(Reg.QUEUE_READY, 1)
        self.num = num

    # guest memory
    def put(self, data: bytes) -> int:
        addr = self.heap
        self.mem.write(addr, data)
        self.heap += (len(data) + 15) & ~15
        return addr

    def buffer(self, n: int) -> int:
        return self.put(b"\xee" * n)

    def u16(self, addr: int) -> int:
        return struct.unpack("<H", self.mem.read(addr, 2))[0]

    def set_desc(self, table: int, index: int, addr: int, length: int, flags: int,
                 nxt: int = 0) -> None:
        self.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, segments: list[tuple[int, int, bool]]) -> int:
        """Put a direct chain in the descriptor table; its head index."""
        indices = [(self.next_desc + i) % self.num for i in range(len(segments))]
        self.next_desc = (self.next_desc + len(segments)) % self.num
        for i, (addr, length, writable) in enumerate(segments):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | \
                (VIRTQ_DESC_F_NEXT if i + 1 < len(segments) else 0)
            nxt = indices[i + 1] if i + 1 < len(segments) else 0
            self.set_desc(self.desc, indices[i], addr, length, flags, nxt)
        return indices[0]

    def indirect_chain(self, segments: list[tuple[int, int, bool]], table: int = INDIRECT) -> int:
        """One ring descriptor pointing at an indirect table holding the whole chain."""
        for i, (addr, length, writable) in enumerate(segments):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | \
                (VIRTQ_DESC_F_NEXT if i + 1 < len(segments) else 0)
            self.set_desc(table, i, addr, length, flags, i + 1)
        head = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.num
        self.set_desc(self.desc, head, table, 16 * len(segments), VIRTQ_DESC_F_INDIRECT)
        return head

    def offer(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def kick(self) -> None:
        self.wr(Reg.QUEUE_NOTIFY, self.queue)

    def submit(self, segments: list[tuple[int, int, bool]]) -> int:
        head = self.chain(segments)
        self.offer(head)
        self.kick()
        return head

    def used_idx(self) -> int:
        return self.u16(self.used_ring + 2)

    def used(self, i: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.used_ring + 4 + 8 * (i % self.num), 8))

    def ack(self) -> None:
        self.wr(Reg.INTERRUPT_ACK, self.rd(Reg.INTERRUPT_STATUS))

    # block requests
    def blk(self, kind: int, sector: int, *, out: bytes = b"", data_in: int = 0) -> tuple[int, int]:
        """Submit one request; (status byte, used length)."""
        segs = [(self.put(struct.pack("<IIQ", kind, 0, sector)), 16, False)]
        if out:
            segs.append((self.put(out), len(out), False))
        if data_in:
            self.last_in = self.buffer(data_in)
            segs.append((self.last_in, data_in, True))
        status = self.buffer(1)
        segs.append((status, 1, True))
        before = self.used_idx()
        self.submit(segs)
        assert self.used_idx() == (before + 1) & 0xFFFF
        return self.mem.read(status, 1)[0], self.used(before)[1]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (64 * SECTOR // 256))  # 64 sectors
    return path


@pytest.fixture
def blk(image: Path) -> Iterator[Driver]:
    device = VirtioBlk(image, serial="popek-serial-0001")
    yield Driver(device).start()
    device.close()


def assert_broken(drv: Driver, ram_before: bytes) -> None:
    """The device stopped and said so, and wrote nothing into the guest."""
    assert drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert drv.rd(Reg.INTERRUPT_STATUS) & INT_CONFIG
    assert drv.levels[-1] is True
    assert bytes(drv.mem.ram) == ram_before
    assert drv.dev.s.error


# -- transport -----------------------------------------------------------------------------
def test_registers_identify_a_version_2_virtio_mmio_block_device(blk: Driver) -> None:
    assert blk.rd(Reg.MAGIC_VALUE) == 0x74726976
    assert blk.rd(Reg.VERSION) == 2
    assert blk.rd(Reg.DEVICE_ID) == 2
    assert blk.rd(Reg.VENDOR_ID) == 0x554D4551
    features = blk.device_features()
    assert features & VIRTIO_F_VERSION_1
    assert features & (VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE) \
        == VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
    assert not features & VIRTIO_BLK_F_RO
    blk.wr(Reg.QUEUE_SEL, 0)
    assert blk.rd(Reg.QUEUE_NUM_MAX) == 256
    assert blk.rd(Reg.QUEUE_READY) == 1
    blk.wr(Reg.QUEUE_SEL, 1)
    assert blk.rd(Reg.QUEUE_NUM_MAX) == 0  # only one queue exists
    assert blk.rd(Reg.SHM_LEN_LOW) == blk.rd(Reg.SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_a_driver_without_version_1_is_accepted_as_qemu_accepts_xv6s(blk: Driver) -> None:
    assert blk.negotiate(VIRTIO_BLK_F_FLUSH)
    assert blk.dev.s.driver_features == VIRTIO_BLK_F_FLUSH


def test_config_space_holds_capacity_seg_max_and_block_size(blk: Driver) -> None:
    assert blk.dev.read(Reg.CONFIG, 4) == 64 and blk.dev.read(Reg.CONFIG + 4, 4) == 0
    assert blk.dev.read(Reg.CONFIG, 8) == 64
    assert blk.dev.read(Reg.CONFIG + 12, 4) == 254
    assert blk.dev.read(Reg.CONFIG + 20, 4) == 512
    assert blk.dev.read(Reg.CONFIG + 0x80, 4) == 0  # past the end of config


def test_feature_negotiation_refuses_unoffered_bits(blk: Driver) -> None:
    assert not blk.negotiate(VIRTIO_F_VERSION_1 | 1 << 34)  # packed ring: not offered
    assert blk.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH)
    blk.wr(Reg.DRIVER_FEATURES_SEL, 0)
    blk.wr(Reg.DRIVER_FEATURES, 0)  # frozen once FEATURES_OK is set
    assert blk.dev.s.driver_features == VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH


def test_interrupt_is_level_triggered_until_acknowledged(blk: Driver) -> None:
    blk.blk(VIRTIO_BLK_T_FLUSH, 0)
    assert blk.rd(Reg.INTERRUPT_STATUS) == INT_VRING and blk.levels == [True]
    blk.ack()
    assert blk.rd(Reg.INTERRUPT_STATUS) == 0 and blk.levels == [True, False]


def test_status_zero_resets_device_and_queues(blk: Driver) -> None:
    blk.blk(VIRTIO_BLK_T_FLUSH, 0)
    blk.wr(Reg.STATUS, 0)
    assert blk.rd(Reg.STATUS) == 0 and blk.rd(Reg.INTERRUPT_STATUS) == 0
    assert blk.levels[-1] is False
    assert blk.rd(Reg.QUEUE_READY) == 0
    queue = blk.dev.queues[0].s
    assert (queue.last_avail_idx, queue.used_idx, queue.desc_addr) == (0, 0, 0)


def test_driver_can_stop_a_queue(blk: Driver) -> None:
    blk.wr(Reg.QUEUE_READY, 0)
    assert blk.rd(Reg.QUEUE_READY) == 0
    blk.offer(blk.chain([(blk.put(bytes(16)), 16, False), (blk.buffer(1), 1, True)]))
    blk.kick()
    assert blk.used_idx() == 0


def test_config_generation_is_stable(blk: Driver) -> None:
    assert blk.rd(Reg.CONFIG_GENERATION) == blk.rd(Reg.CONFIG_GENERATION) == 0


def test_a_live_queue_layout_cannot_be_changed(blk: Driver) -> None:
    blk.wr(Reg.QUEUE_DESC_LOW, 0x1234)
    blk.wr(Reg.QUEUE_NUM, 2)
    assert blk.dev.queues[0].s.desc_addr == DESC and blk.dev.queues[0].s.num == NUM


# -- virtio-blk ----------------------------------------------------------------------------
def test_blk_write_then_read_round_trip_reaches_the_file_after_flush(blk: Driver,
                                                                     image: Path) -> None:
    payload = os.urandom(3 * SECTOR)
    assert blk.blk(VIRTIO_BLK_T_OUT, 5, out=payload) == (VIRTIO_BLK_S_OK, 1)
    assert blk.blk(VIRTIO_BLK_T_IN, 5, data_in=3 * SECTOR) == (VIRTIO_BLK_S_OK, 3 * SECTOR + 1)
    assert blk.mem.read(blk.last_in, 3 * SECTOR) == payload
    assert blk.blk(VIRTIO_BLK_T_FLUSH, 0) == (VIRTIO_BLK_S_OK, 1)
    disk = image.read_bytes()
    assert disk[5 * SECTOR:8 * SECTOR] == payload
    assert disk[:5 * SECTOR] == (bytes(range(256)) * 10)  # neighbours untouched


def test_blk_read_scatters_across_many_segments(blk: Driver, image: Path) -> None:
    header = blk.put(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2))
    parts = [blk.buffer(n) for n in (100, 412, 512)]
    status = blk.buffer(1)
    blk.submit([(header, 16, False), (parts[0], 100, True), (parts[1], 412, True),
                (parts[2], 512, True), (status, 1, True)])
    got = b"".join(blk.mem.read(a, n) for a, n in zip(parts, (100, 412, 512), strict=True))
    assert got == image.read_bytes()[2 * SECTOR:4 * SECTOR]
    assert blk.mem.read(status, 1)[0] == VIRTIO_BLK_S_OK


def test_blk_read_marks_exactly_the_pages_the_device_writes(blk: Driver, image: Path) -> None:
    """DMA is a writer like any other: a dirty log (migration, diff snapshots) sees the
    data the device scattered, its status byte and the used ring, and nothing else."""
    header = blk.put(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    buf, status = DATA + 0x3F00, DATA + 0x6000  # the data crosses into a second page
    head = blk.chain([(header, 16, False), (buf, 2 * SECTOR, True), (status, 1, True)])
    blk.offer(head)
    log = blk.mem.dirty_log()
    blk.kick()
    assert blk.mem.read(buf, 2 * SECTOR) == image.read_bytes()[:2 * SECTOR]
    page = (DATA - RAM) >> 12
    assert log.take() == [((USED - RAM) >> 12, 1), (page + 3, 2), (page + 6, 1)]


def test_blk_header_split_across_descriptors_is_accepted(blk: Driver, image: Path) -> None:
    header = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)
    a, b = blk.put(header[:6]), blk.put(header[6:])
    buf, status = blk.buffer(SECTOR), blk.buffer(1)
    blk.submit([(a, 6, False), (b, 10, False), (buf, SECTOR, True), (status, 1, True)])
    assert blk.mem.read(buf, SECTOR) == image.read_bytes()[SECTOR:2 * SECTOR]


def test_blk_read_only_device_rejects_writes_with_ioerr(image: Path) -> None:
    before = image.read_bytes()
    device = VirtioBlk(image, readonly=True)
    drv = Driver(device).start(ALL_FEATURES | VIRTIO_BLK_F_RO)
    assert drv.device_features() & VIRTIO_BLK_F_RO
    assert drv.blk(VIRTIO_BLK_T_OUT, 0, out=b"\0" * SECTOR)[0] == VIRTIO_BLK_S_IOERR
    assert drv.blk(VIRTIO_BLK_T_IN, 0, data_in=SECTOR)[0] == VIRTIO_BLK_S_OK
    assert drv.blk(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    device.close()
    assert image.read_bytes() == before


def test_blk_get_id_returns_the_serial_nul_padded(blk: Driver) -> None:
    assert blk.blk(VIRTIO_BLK_T_GET_ID, 0, data_in=20) == (VIRTIO_BLK_S_OK, 21)
    assert blk.mem.read(blk.last_in, 20) == b"popek-serial-0001\0\0\0"


@pytest.mark.parametrize("sector, nbytes", [(64, SECTOR), (63, 2 * SECTOR), (0, 100),
                                            (1 << 63, SECTOR), ((1 << 64) - 1, SECTOR)])
def test_blk_out_of_range_or_partial_sectors_fail_with_ioerr(blk: Driver, image: Path,
                                                             sector: int, nbytes: int) -> None:
    before = image.read_bytes()
    assert blk.blk(VIRTIO_BLK_T_IN, sector, data_in=nbytes) == (VIRTIO_BLK_S_IOERR, 1)
    assert blk.mem.read(blk.last_in, nbytes) == b"\xee" * nbytes
    assert blk.blk(VIRTIO_BLK_T_OUT, sector, out=b"x" * nbytes) == (VIRTIO_BLK_S_IOERR, 1)
    assert image.read_bytes() == before
    assert not blk.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_blk_unknown_request_type_is_unsupported(blk: Driver) -> None:
    assert blk.blk(11, 0, data_in=16)[0] == VIRTIO_BLK_S_UNSUPP  # DISCARD: not offered


def test_blk_host_io_failures_become_ioerr(image: Path, tmp_path: Path) -> None:
    device = VirtioBlk(image)
    drv = Driver(device).start()
    os.truncate(image, 8 * SECTOR)  # the image shrank under the device: short read
    assert drv.blk(VIRTIO_BLK_T_IN, 10, data_in=SECTOR) == (VIRTIO_BLK_S_IOERR, 1)
    device.close()
    device.fd = os.open(tmp_path, os.O_RDONLY)  # reads now fail with EISDIR
    assert drv.blk(VIRTIO_BLK_T_IN, 0, data_in=SECTOR) == (VIRTIO_BLK_S_IOERR, 1)
    assert not drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    device.close()


def test_blk_missing_image_raises_a_one_line_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(FileNotFoundError) as info:
        VirtioBlk(missing)
    assert isinstance(info.value, ImageNotFoundError)
    assert str(info.value) == f"disk image not found: {missing}"
    with pytest.raises(IsADirectoryError):
        VirtioBlk(tmp_path, readonly=True)


def test_blk_request_without_status_byte_breaks_the_queue(blk: Driver) -> None:
    header = blk.put(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    blk.offer(blk.chain([(header, 16, False)]))
    avail_event = USED + 4 + 8 * NUM - RAM
    ram = bytearray(blk.mem.ram)
    ram[avail_event:avail_event + 2] = struct.pack("<H", 1)  # the chain itself was consumed
    blk.kick()
    assert_broken(blk, bytes(ram))
    assert blk.used_idx() == 0


# -- virtio-rng ----------------------------------------------------------------------------
def test_rng_fills_writable_buffers_with_random_bytes() -> None:
    drv = Driver(VirtioRng()).start()
    assert drv.rd(Reg.DEVICE_ID) == 4
    a, b = drv.buffer(64), drv.buffer(64)
    drv.submit([(a, 64, True)])
    drv.submit([(b, 64, True)])
    assert drv.used_idx() == 2 and drv.used(0)[1] == drv.used(1)[1] == 64
    assert drv.mem.read(a, 64) != drv.mem.read(b, 64)
    assert drv.mem.read(a, 64) != b"\xee" * 64


# -- queue mechanics -----------------------------------------------------------------------
def test_indirect_table_carries_a_whole_request(blk: Driver, image: Path) -> None:
    header = blk.put(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 3))
    buf, status = blk.buffer(2 * SECTOR), blk.buffer(1)
    blk.offer(blk.indirect_chain([(header, 16, False), (buf, 2 * SECTOR, True),
                                  (status, 1, True)]))
    blk.kick()
    assert blk.used(0) == (0, 2 * SECTOR + 1)
    assert blk.mem.read(buf, 2 * SECTOR) == image.read_bytes()[3 * SECTOR:5 * SECTOR]
    assert blk.mem.read(status, 1)[0] == VIRTIO_BLK_S_OK


def test_direct_descriptors_may_end_in_an_indirect_table(blk: Driver, image: Path) -> None:
    header = blk.put(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 7))
    buf, status = blk.buffer(SECTOR), blk.buffer(1)
    blk.set_desc(INDIRECT, 0, buf, SECTOR, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    blk.set_desc(INDIRECT, 1, status, 1, VIRTQ_DESC_F_WRITE)
    blk.set_desc(DESC, 0, header, 16, VIRTQ_DESC_F_NEXT, 1)
    blk.set_desc(DESC, 1, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)
    blk.offer(0)
    blk.kick()
    assert blk.mem.read(buf, SECTOR) == image.read_bytes()[7 * SECTOR:8 * SECTOR]
    assert blk.mem.read(status, 1)[0] == VIRTIO_BLK_S_OK


def test_event_idx_suppresses_interrupts_until_used_event_is_reached(blk: Driver) -> None:
    used_event = AVAIL + 4 + 2 * NUM
    blk.mem.write(used_event, struct.pack("<H", 2))  # wake me when entry 2 is used
    blk.blk(VIRTIO_BLK_T_FLUSH, 0)
    blk.blk(VIRTIO_BLK_T_FLUSH, 0)
    assert blk.rd(Reg.INTERRUPT_STATUS) == 0 and blk.levels == []
    blk.blk(VIRTIO_BLK_T_FLUSH, 0)
    assert blk.rd(Reg.INTERRUPT_STATUS) == INT_VRING and blk.levels == [True]
    # avail_event tells the driver the device has seen every buffer offered so far.
    assert blk.u16(USED + 4 + 8 * NUM) == 3


def test_event_idx_notifies_when_a_batch_steps_over_used_event(blk: Driver) -> None:
    blk.mem.write(AVAIL + 4 + 2 * NUM, struct.pack("<H", 1))
    for _ in range(3):
        blk.offer(blk.chain([(blk.put(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0)), 16,
                              False), (blk.buffer(1), 1, True)]))
    blk.kick()  # used idx goes 0 -> 3 in one go, passing entry 1
    assert blk.used_idx() == 3 and blk.rd(Reg.INTERRUPT_STATUS) == INT_VRING


def test_no_interrupt_flag_is_honoured_without_event_idx(image: Path) -> None:
    drv = Driver(VirtioBlk(image)).start(VIRTIO_F_VERSION_1)
    drv.mem.write(AVAIL, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT))
    drv.blk(VIRTIO_BLK_T_FLUSH, 0)
    assert drv.rd(Reg.INTERRUPT_STATUS) == 0
    drv.mem.write(AVAIL, struct.pack("<H", 0))
    drv.blk(VIRTIO_BLK_T_FLUSH, 0)
    assert drv.rd(Reg.INTERRUPT_STATUS) == INT_VRING


def test_used_and_available_indices_wrap_at_65536(blk: Driver) -> None:
    queue = blk.dev.queues[0].s
    queue.last_avail_idx = queue.used_idx = queue.signalled_used = 0xFFFF
    blk.avail_idx = 0xFFFF
    blk.mem.write(USED + 2, struct.pack("<H", 0xFFFF))
    blk.mem.write(AVAIL + 4 + 2 * NUM, struct.pack("<H", 0xFFFF))
    assert blk.blk(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    assert blk.used_idx() == 0 and blk.rd(Reg.INTERRUPT_STATUS) == INT_VRING


# -- hostile guests ------------------------------------------------------------------------
def _hostile(blk: Driver, build) -> None:
    """Lay out a bad chain with ``build(drv) -> head``, offer it, check the device stops."""
    head = build(blk)
    blk.offer(head)
    ram = bytes(blk.mem.ram)
    blk.kick()  # must not raise
    assert_broken(blk, ram)
    blk.kick()  # a broken queue stays stopped
    assert bytes(blk.mem.ram) == ram


def _loop(d: Driver) -> int:
    d.set_desc(DESC, 0, DATA, 16, VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(DESC, 1, DATA, 16, VIRTQ_DESC_F_NEXT, 0)
    return 0


def _self_loop(d: Driver) -> int:
    d.set_desc(DESC, 3, DATA, 16, VIRTQ_DESC_F_NEXT, 3)
    return 3


def _next_out_of_table(d: Driver) -> int:
    d.set_desc(DESC, 0, DATA, 16, VIRTQ_DESC_F_NEXT, NUM)
    return 0


def _head_out_of_table(d: Driver) -> int:
    return 0xFFFF


def _huge_length(d: Driver) -> int:
    d.set_desc(DESC, 0, DATA, 16, VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(DESC, 1, DATA, 0xFFFF_FFFF, VIRTQ_DESC_F_WRITE)
    return 0


def _outside_ram(d: Driver) -> int:
    d.set_desc(DESC, 0, DATA, 16, VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(DESC, 1, 0x1000_0000, SECTOR, VIRTQ_DESC_F_WRITE)  # the UART, not RAM
    return 0


def _straddles_end_of_ram(d: Driver) -> int:
    d.set_desc(DESC, 0, RAM + RAM_SIZE - 8, 16, VIRTQ_DESC_F_WRITE)
    return 0


def _address_wraps(d: Driver) -> int:
    d.set_desc(DESC, 0, (1 << 64) - 8, 16, VIRTQ_DESC_F_WRITE)
    return 0


def _readable_after_writable(d: Driver) -> int:
    d.set_desc(DESC, 0, DATA, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(DESC, 1, DATA, 16, 0)
    return 0


def _nested_indirect(d: Driver) -> int:
    d.set_desc(INDIRECT, 0, INDIRECT + 0x100, 32, VIRTQ_DESC_F_INDIRECT)
    d.set_desc(DESC, 0, INDIRECT, 16, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_loop(d: Driver) -> int:
    d.set_desc(INDIRECT, 0, DATA, 16, VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(INDIRECT, 1, DATA, 16, VIRTQ_DESC_F_NEXT, 0)
    d.set_desc(DESC, 0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_next_out_of_table(d: Driver) -> int:
    d.set_desc(INDIRECT, 0, DATA, 16, VIRTQ_DESC_F_NEXT, 2)
    d.set_desc(DESC, 0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_bad_size(d: Driver) -> int:
    d.set_desc(DESC, 0, INDIRECT, 24, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_empty(d: Driver) -> int:
    d.set_desc(DESC, 0, INDIRECT, 0, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_too_big(d: Driver) -> int:
    d.set_desc(DESC, 0, RAM, 16 * 4096, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_outside_ram(d: Driver) -> int:
    d.set_desc(DESC, 0, 0x1000, 32, VIRTQ_DESC_F_INDIRECT)
    return 0


def _indirect_with_next(d: Driver) -> int:
    d.set_desc(INDIRECT, 0, DATA, 16, 0)
    d.set_desc(DESC, 0, INDIRECT, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    d.set_desc(DESC, 1, DATA, 1, VIRTQ_DESC_F_WRITE)
    return 0


@pytest.mark.parametrize("build", [
    _loop, _self_loop, _next_out_of_table, _head_out_of_table, _huge_length,
    _outside_ram, _straddles_end_of_ram, _address_wraps,
    _readable_after_writable, _nested_indirect, _indirect_loop, _indirect_next_out_of_table,
    _indirect_bad_size, _indirect_empty, _indirect_too_big, _indirect_outside_ram,
    _indirect_with_next,
])
def test_hostile_chain_puts_device_in_needs_reset_without_touching_ram(blk: Driver,
                                                                       build) -> None:
    _hostile(blk, build)


def test_indirect_descriptor_needs_the_feature(image: Path) -> None:
    drv = Driver(VirtioBlk(image)).start(VIRTIO_F_VERSION_1)
    header = drv.put(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    status = drv.buffer(1)
    drv.set_desc(INDIRECT, 0, header, 16, VIRTQ_DESC_F_NEXT, 1)
    drv.set_desc(INDIRECT, 1, status, 1, VIRTQ_DESC_F_WRITE)
    _hostile(drv, lambda d: d.set_desc(DESC, 0, INDIRECT, 32, VIRTQ_DESC_F_INDIRECT) or 0)


def test_chain_longer_than_4_gib_in_total_breaks_the_queue(image: Path) -> None:
    big = 1 << 32  # sparse: only the pages the test touches are ever backed
    drv = Driver(VirtioBlk(image), PhysicalMemory(RAM, big, sparse=True)).start()
    for i in range(17):  # 17 buffers of 256 MiB each, all inside RAM
        drv.set_desc(INDIRECT, i, RAM + (i << 28) // 2, 1 << 28, VIRTQ_DESC_F_NEXT, i + 1)
    drv.set_desc(DESC, 0, INDIRECT, 16 * 17, VIRTQ_DESC_F_INDIRECT)
    drv.offer(0)
    drv.kick()
    assert drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert "4 GiB" in drv.dev.s.error
    assert drv.used_idx() == 0


def test_available_index_jumping_past_the_ring_size_breaks_the_queue(blk: Driver) -> None:
    blk.mem.write(AVAIL + 2, struct.pack("<H", NUM + 1))
    ram = bytes(blk.mem.ram)
    blk.kick()
    assert_broken(blk, ram)


@pytest.mark.parametrize("num, desc", [(NUM, RAM + RAM_SIZE - 16), (NUM, 0x1000),
                                       (3, DESC), (0, DESC), (512, DESC)])
def test_bad_ring_layout_is_refused_when_the_queue_is_enabled(image: Path, num: int,
                                                              desc: int) -> None:
    drv = Driver(VirtioBlk(image))
    assert drv.negotiate(ALL_FEATURES)
    drv.wr(Reg.QUEUE_NUM, num)
    drv.wr(Reg.QUEUE_DESC_LOW, desc & 0xFFFF_FFFF)
    drv.wr(Reg.QUEUE_DRIVER_LOW, AVAIL & 0xFFFF_FFFF)
    drv.wr(Reg.QUEUE_DEVICE_LOW, USED & 0xFFFF_FFFF)
    drv.wr(Reg.QUEUE_READY, 1)
    assert drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert drv.rd(Reg.INTERRUPT_STATUS) == 0  # DRIVER_OK not yet set: no config interrupt
    drv.kick()
    assert drv.used_idx() == 0


def test_device_recovers_after_reset_from_needs_reset(blk: Driver) -> None:
    _hostile(blk, _loop)
    blk.next_desc, blk.avail_idx = 0, 0
    for addr in (DESC, AVAIL, USED):
        blk.mem.write(addr, bytes(0x1000))
    blk.start()
    assert not blk.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert blk.blk(VIRTIO_BLK_T_FLUSH, 0) == (VIRTIO_BLK_S_OK, 1)


def test_needs_reset_survives_driver_status_writes(blk: Driver) -> None:
    _hostile(blk, _loop)
    blk.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
           | STATUS_DRIVER_OK)
    assert blk.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET


def test_registers_ignore_odd_sizes_and_unknown_offsets(blk: Driver) -> None:
    assert blk.dev.read(Reg.MAGIC_VALUE, 1) == 0
    assert blk.dev.read(Reg.MAGIC_VALUE + 2, 4) == 0
    assert blk.dev.read(0x0F0, 4) == 0
    blk.dev.write(Reg.STATUS, 1, 0)  # not a reset: byte writes are ignored
    blk.dev.write(Reg.CONFIG, 8, 0xFFFF)
    blk.wr(Reg.QUEUE_NOTIFY, 7)  # no such queue
    assert blk.rd(Reg.STATUS) & STATUS_DRIVER_OK
    assert blk.dev.read(Reg.CONFIG, 8) == 64


def test_random_rings_never_raise(image: Path) -> None:
    rng = random.Random(1234)
    for features in (ALL_FEATURES, VIRTIO_F_VERSION_1):
        device = VirtioBlk(image)
        drv = Driver(device).start(features)
        for _ in range(300):
            table = bytearray(rng.randbytes(16 * NUM))
            for i in range(NUM):  # aim half the addresses into RAM so chains get far
                if rng.random() < 0.5:
                    struct.pack_into("<Q", table, 16 * i, RAM + rng.randrange(RAM_SIZE))
                    struct.pack_into("<I", table, 16 * i + 8, rng.randrange(1 << 12))
                    struct.pack_into("<H", table, 16 * i + 14, rng.randrange(NUM + 2))
            drv.mem.write(DESC, bytes(table))
            drv.mem.write(INDIRECT, bytes(table))
            drv.mem.write(AVAIL + 2, rng.randbytes(2 + 2 * NUM))
            drv.kick()
            if drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET:
                drv.next_desc = drv.avail_idx = 0
                drv.start(features)
        device.close()


# -- snapshots -----------------------------------------------------------------------------
def test_save_and_load_state_resumes_a_queue_mid_stream(blk: Driver, image: Path) -> None:
    blk.mem.write(AVAIL + 4 + 2 * NUM, struct.pack("<H", 5))  # signal at entry 5
    for sector in (1, 2, 3):
        assert blk.blk(VIRTIO_BLK_T_IN, sector, data_in=SECTOR)[0] == VIRTIO_BLK_S_OK
    state = json.loads(json.dumps(blk.dev.save_state()))
    assert state["version"] == 1
    ram = bytes(blk.mem.ram)

    mem = PhysicalMemory(RAM, RAM_SIZE)
    mem.write(RAM, ram)
    device = VirtioBlk(image)
    levels = Raises()
    dev = VirtioMMIO(mem, device, levels)
    dev.load_state(state)
    assert dev.save_state() == state
    resumed = Driver(device, mem, dev)
    resumed.levels = levels
    resumed.num, resumed.next_desc, resumed.avail_idx, resumed.heap = \
        NUM, blk.next_desc, blk.avail_idx, blk.heap
    for sector in (4, 5, 6):
        assert resumed.blk(VIRTIO_BLK_T_IN, sector, data_in=SECTOR)[0] == VIRTIO_BLK_S_OK
        assert resumed.mem.read(resumed.last_in, SECTOR) == \
            image.read_bytes()[sector * SECTOR:(sector + 1) * SECTOR]
        # used_event = 5 is first passed by the sixth request (used idx 5 -> 6)
        assert resumed.rd(Reg.INTERRUPT_STATUS) == (INT_VRING if sector == 6 else 0)
    assert resumed.used_idx() == 6
    device.close()


def test_load_state_restores_a_raised_interrupt_line(blk: Driver, image: Path) -> None:
    blk.blk(VIRTIO_BLK_T_FLUSH, 0)
    state = blk.dev.save_state()
    levels = Raises()
    VirtioMMIO(blk.mem, VirtioBlk(image), levels).load_state(state)
    assert levels == [True]


def test_restored_ring_outside_ram_leaves_the_queue_broken(blk: Driver, image: Path) -> None:
    state = blk.dev.save_state()
    small = PhysicalMemory(RAM, 0x2000)  # the used ring at RAM + 0x3000 no longer exists
    dev = VirtioMMIO(small, VirtioBlk(image), lambda level: None)
    dev.load_state(state)
    assert dev.queues[0].s.broken
    dev.write(Reg.QUEUE_NOTIFY, 4, 0)  # ignored, and nothing raises


def test_rng_state_round_trips() -> None:
    drv = Driver(VirtioRng()).start()
    drv.submit([(drv.buffer(8), 8, True)])
    state = json.loads(json.dumps(drv.dev.save_state()))
    dev = VirtioMMIO(drv.mem, VirtioRng(), lambda level: None)
    dev.load_state(state)
    assert dev.save_state() == state


def test_queue_sizes_must_be_powers_of_two() -> None:
    mem = PhysicalMemory(RAM, RAM_SIZE)
    for bad in (0, 3, 65536):
        with pytest.raises(ValueError):
            Virtqueue(mem, bad)


def test_load_state_refuses_a_different_device_or_disk(blk: Driver, tmp_path: Path) -> None:
    state = blk.dev.save_state()
    with pytest.raises(ValueError):
        VirtioMMIO(blk.mem, VirtioRng(), lambda level: None).load_state(state)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SECTOR))
    with pytest.raises(ValueError):
        VirtioMMIO(blk.mem, VirtioBlk(other), lambda level: None).load_state(state)
    with pytest.raises(ValueError):
        blk.dev.load_state({**state, "version": 99})
