"""virtio-balloon driven by a synthetic guest driver written from the spec (virtio 1.1
section 5.5): pages given back are dropped from the host and read as zeros, the target
reaches the driver as a configuration change, statistics come back when asked for, free
page reports drop whole blocks, and hostile requests end in DEVICE_NEEDS_RESET."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

from popek.cpu.physmem import PhysicalMemory
from popek.devices.virtio.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_PAGE_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VirtioBalloon,
)
from popek.devices.virtio.mmio import (
    INT_CONFIG,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    Reg,
)
from tests.test_virtio import ALL_FEATURES, RAM, RAM_SIZE, Driver

FEATURES = (ALL_FEATURES | VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | VIRTIO_BALLOON_F_PAGE_REPORTING)
VICTIM = RAM + 0x60000  # pages the tests hand over, clear of the driver's rings and heap
_libc = ctypes.CDLL(None, use_errno=True)


class Balloon:
    """The four queues' drivers on one device: inflate, deflate, stats, reporting."""

    def __init__(self, features: int = FEATURES) -> None:
        self.mem = PhysicalMemory(RAM, RAM_SIZE)
        self.device = VirtioBalloon(self.mem)
        self.inflate = Driver(self.device, mem=self.mem)
        self.device.attach(self.inflate.dev)
        self.inflate.negotiate(features)
        self.inflate.setup_queue()
        self.queues = [self.inflate] + [
            Driver(None, mem=self.inflate.mem, dev=self.inflate.dev, queue=q) for q in (1, 2, 3)]
        for driver in self.queues[1:]:
            driver.setup_queue()
        self.inflate.wr(Reg.STATUS, self.inflate.rd(Reg.STATUS) | STATUS_DRIVER_OK)

    def pfns(self, q: int, pages: list[int]) -> None:
        data = b"".join(struct.pack("<I", page >> 12) for page in pages)
        self.queues[q].submit([(self.queues[q].put(data), len(data), False)])

    def broken(self) -> bool:
        return bool(self.inflate.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET)


def _resident(balloon: Balloon, addr: int) -> bool:
    """Whether the host holds the RAM page at ``addr`` (mincore, through the mapping)."""
    vec = (ctypes.c_ubyte * 1)()
    base = ctypes.addressof(ctypes.c_char.from_buffer(balloon.mem.ram)) + addr - RAM
    assert _libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(4096), vec) == 0
    return bool(vec[0] & 1)


def test_target_reaches_the_driver_as_a_configuration_change() -> None:
    b = Balloon()
    b.device.set_target(100)
    assert b.inflate.rd(Reg.INTERRUPT_STATUS) & INT_CONFIG
    assert b.inflate.dev.read(Reg.CONFIG, 4) == 100
    generation = b.inflate.rd(Reg.CONFIG_GENERATION)
    b.device.set_target(7)
    assert b.inflate.rd(Reg.CONFIG_GENERATION) != generation
    b.inflate.dev.write(Reg.CONFIG + 4, 4, 7)  # the driver says it holds 7 pages
    assert b.device.report()["actual_bytes"] == 7 * 4096


def test_inflated_pages_are_dropped_and_read_as_zeros_after_deflate() -> None:
    b = Balloon()
    pages = [VICTIM + i * 4096 for i in range(4)]
    for page in pages:
        b.mem.write(page, b"\x5a" * 4096)
    assert _resident(b, pages[0])
    b.pfns(0, pages)
    assert b.device.report()["inflated_bytes"] == 4 * 4096
    assert not any(_resident(b, page) for page in pages)
    b.pfns(1, pages[:2])
    assert b.device.report()["inflated_bytes"] == 2 * 4096
    assert b.mem.read(pages[0], 4096) == bytes(4096)
    assert not b.broken()


def test_statistics_come_back_when_the_host_asks() -> None:
    b = Balloon()
    stats = b.queues[2]
    entries = struct.pack("<HQ", 4, 50 << 20) + struct.pack("<HQ", 6, 60 << 20)
    buffer = stats.put(entries)
    stats.submit([(buffer, len(entries), False)])
    assert b.device.report()["guest"] == {"free_memory": 50 << 20,
                                          "available_memory": 60 << 20}
    assert stats.used_idx() == 0  # the device keeps the buffer until it wants more
    b.device.request_stats()
    assert stats.used_idx() == 1


def test_free_page_reports_drop_whole_blocks() -> None:
    b = Balloon()
    b.mem.write(VICTIM, b"\x11" * 8192)
    report = b.queues[3]
    report.submit([(VICTIM, 8192, True)])
    assert report.used_idx() == 1
    assert b.device.report()["reported_bytes"] == 8192
    assert not _resident(b, VICTIM)
    assert b.mem.read(VICTIM, 8192) == bytes(8192)


@pytest.mark.parametrize("queue, request_", [
    (0, [RAM + RAM_SIZE]),                       # a page number past the end of RAM
    (0, [0x1000_0000]),                          # the UART's page, not RAM
    (1, [RAM - 4096]),                           # deflating a page below RAM
    (0, [VICTIM] * (RAM_SIZE // 4096 + 1)),      # more pages than RAM holds
])
def test_hostile_page_lists_get_the_device_error_status(queue: int, request_: list[int]) -> None:
    b = Balloon()
    b.mem.write(VICTIM, b"\x77" * 4096)
    b.pfns(queue, [VICTIM, *request_])
    assert b.broken()
    assert b.mem.read(VICTIM, 4096) == b"\x77" * 4096  # checked whole before any drop


def test_malformed_statistics_and_reports_get_the_device_error_status() -> None:
    b = Balloon()
    b.queues[2].submit([(b.queues[2].put(b"\0" * 7), 7, False)])  # not 10-byte entries
    assert b.broken()
    b = Balloon()
    b.queues[3].submit([(VICTIM + 100, 4096, True)])  # not page aligned
    assert b.broken()


def test_without_statistics_the_reporting_queue_moves_down() -> None:
    b = Balloon(ALL_FEATURES | VIRTIO_BALLOON_F_PAGE_REPORTING)
    b.queues[2].submit([(VICTIM, 4096, True)])  # queue 2 is the reporting queue now
    assert b.device.report()["reported_bytes"] == 4096 and not b.broken()


def test_state_survives_a_snapshot() -> None:
    b = Balloon()
    b.device.set_target(3)
    b.pfns(0, [VICTIM])
    clone = VirtioBalloon(b.mem)
    clone.load_state(b.device.save_state())
    assert clone.report() == b.device.report()
    assert clone.inflated == b.device.inflated


def test_pages_of_a_restored_guest_read_as_zeros_once_given_back(tmp_path: Path) -> None:
    # A restored guest's RAM maps its snapshot copy-on-write: dropping a page would show
    # the snapshot's bytes again, so they must read as zeros instead.
    image = tmp_path / "ram"
    image.write_bytes(b"\x42" * RAM_SIZE)
    fd = os.open(image, os.O_RDONLY)
    try:
        mem = PhysicalMemory(RAM, RAM_SIZE, backing=(fd, 0))
    finally:
        os.close(fd)
    device = VirtioBalloon(mem)
    driver = Driver(device, mem=mem)
    device.attach(driver.dev)
    driver.start(FEATURES)
    data = struct.pack("<I", VICTIM >> 12)
    driver.submit([(driver.put(data), len(data), False)])
    assert mem.read(VICTIM, 4096) == bytes(4096)
    assert mem.read(VICTIM + 4096, 4) == b"\x42" * 4
    assert image.read_bytes() == b"\x42" * RAM_SIZE  # the snapshot never changes
