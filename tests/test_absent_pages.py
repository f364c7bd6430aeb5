"""Absent pages come back on first touch, whoever touches them; swap-out loses nothing.

A guest's RAM is swapped out (written to a swap file and dropped) in the middle of a
program, on every tier, and the program carries on: it must end exactly as the same
program on a hart whose RAM never left (memory and registers), fetching its code, its
data and a far function from the file as it goes. Devices reading and writing RAM by
DMA, loaders and snapshots meet absent pages too, and a swap file that cannot take the
pages leaves the guest resident.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from rvasm import RAM_BASE, assemble

from popek.cpu.hart import Hart
from popek.cpu.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from popek.cpu.state import CTL_WFI
from popek.devices.virtio import VirtioBlk
from popek.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from popek.engine import engine as engine_module
from popek.engine.engine import TIERS
from popek.vmm.swap import PAGEMAP, SwapError, SwapFile, Swapper
from tests.test_virtio import DATA, RAM_SIZE, SECTOR, Driver

DATA_OFF, FAR_OFF, HANDLER_OFF = 0x20000, 0x60000, 0x80000  # pages 32.., 96, 128
MTVEC = 0x305
PROGRAM = f"""
        li a0, {RAM_BASE + DATA_OFF}
        li s0, 16
    1:  ld t0, 0(a0)        # each of 16 data pages: a running sum, and a marker
        add t0, t0, a1
        addi a1, a1, 7
        sd t0, 0(a0)
        sd a1, 2040(a0)
        li t1, 4096
        add a0, a0, t1
        addi s0, s0, -1
        bnez s0, 1b
        li t2, {RAM_BASE + FAR_OFF}
        jalr ra, t2, 0      # a function on a page of its own
        ebreak
    .org {FAR_OFF}
        addi a2, a2, 1
        mul a3, a2, a1
        ret
    .org {HANDLER_OFF}
        wfi
"""


@pytest.fixture
def eager_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "HOT_AFTER", 2)
    monkeypatch.setattr(engine_module, "NATIVE_AFTER", 2)
    monkeypatch.setattr(engine_module, "PATCHED_NATIVE_AFTER", 4)


@pytest.fixture(scope="module")
def program() -> bytes:
    return assemble(PROGRAM)


def swap_file(path: Path) -> SwapFile:
    return SwapFile(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))


def hart_running(tier: str, program: bytes) -> Hart:
    mem = PhysicalMemory(RAM_BASE, 1 << 20)
    mem.write(RAM_BASE, program)
    hart = Hart(mem, engine=tier)
    hart.csr[MTVEC] = RAM_BASE + HANDLER_OFF
    return hart


def run_rounds(hart: Hart, rounds: int) -> None:
    for _ in range(rounds):
        hart.pc, hart.ctl[CTL_WFI] = RAM_BASE, 0
        for _ in range(1000):
            hart.run(50)
            hart.engine.finish_compiles()
            if hart.waiting:
                break
        else:
            raise AssertionError("the program did not finish")


def absent(mem: PhysicalMemory) -> set[int]:
    return {p for first, count in mem.absent_runs() for p in range(first, first + count)}


def page(off: int) -> int:
    return off >> PAGE_SHIFT


@pytest.mark.parametrize("tier", TIERS)
def test_a_program_swapped_out_midway_ends_as_one_never_swapped(
        tier: str, program: bytes, eager_tiers: None, tmp_path: Path) -> None:
    swapped, resident = hart_running(tier, program), hart_running(tier, program)
    run_rounds(swapped, 6)  # hot: its blocks on their tier, its pages in every TLB
    run_rounds(resident, 6)
    if tier == "jit":
        assert any(b.native is not None for b in swapped.engine.blocks.values())
    mem = swapped.mem
    before = zlib.crc32(mem.ram)
    swapper, file = Swapper(mem, None), swap_file(tmp_path / "swap")
    assert swapper.swap_out(file) == len([0, *range(32, 48), 96, 128]) * PAGE_SIZE
    assert absent(mem) == {0, *range(page(DATA_OFF), page(DATA_OFF) + 16),
                           page(FAR_OFF), page(HANDLER_OFF)}
    assert not any(mem.ram[:])  # dropped: the host holds none of it

    run_rounds(swapped, 3)
    run_rounds(resident, 3)
    assert page(FAR_OFF) not in absent(mem)  # fetched by executing it
    assert bytes(mem.ram) == bytes(resident.mem.ram)
    assert list(swapped.x) == list(resident.x)

    swapper.swap_out(file)  # again: the pages the file holds unchanged are not written again
    swapper.swap_in()
    assert mem.absent_pages == 0
    assert bytes(mem.ram) == bytes(resident.mem.ram) != before
    swapper.close()
    file.close()


def test_dma_reads_and_writes_absent_pages(tmp_path: Path) -> None:
    """The device reads its rings, descriptors, request and payload from absent pages and
    scatters a read into part of an absent page: the rest of that page is kept."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * (8 * SECTOR // 256))
    device = VirtioBlk(image, serial="swapped")
    drv = Driver(device).start()
    swapper, file = Swapper(drv.mem, None), swap_file(tmp_path / "swap")
    payload = os.urandom(SECTOR)
    out = [(drv.put(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 3)), 16, False),
           (drv.put(payload), SECTOR, False), (drv.buffer(1), 1, True)]
    buf = DATA + 0x5000 + 100  # inside a page full of a pattern
    drv.mem.write(DATA + 0x5000, b"\x5a" * PAGE_SIZE)
    read = [(drv.put(struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)), 16, False),
            (buf, SECTOR, True), (drv.buffer(1), 1, True)]
    drv.offer(drv.chain(out))
    drv.offer(drv.chain(read))
    before = bytes(drv.mem.ram)
    assert swapper.swap_out(file) > 0
    drv.kick()
    assert drv.mem.read(out[2][0], 1)[0] == VIRTIO_BLK_S_OK
    assert drv.mem.read(read[2][0], 1)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes()[3 * SECTOR:4 * SECTOR] == payload
    page_now = drv.mem.read(DATA + 0x5000, PAGE_SIZE)
    assert page_now == b"\x5a" * 100 + bytes(range(256)) * 2 + b"\x5a" * (PAGE_SIZE - 612)
    assert drv.used_idx() == 2
    swapper.swap_in()
    after = bytes(drv.mem.ram)
    changed = {off >> PAGE_SHIFT for off in range(0, RAM_SIZE, PAGE_SIZE)
               if before[off:off + PAGE_SIZE] != after[off:off + PAGE_SIZE]}
    # the used ring, the data page, and the page of both status bytes: nothing else moved
    assert changed == {page(addr - RAM_BASE) for addr in (drv.used_ring, buf, out[2][0])}
    swapper.close()
    file.close()
    device.close()


def test_discarding_an_absent_page_forgets_it_as_zeros(tmp_path: Path) -> None:
    mem = PhysicalMemory(RAM_BASE, 1 << 20)
    mem.write(RAM_BASE, b"\xff" * (4 * PAGE_SIZE))
    swapper, file = Swapper(mem, None), swap_file(tmp_path / "swap")
    swapper.swap_out(file)
    mem.discard(PAGE_SIZE, PAGE_SIZE)  # a balloon inflating over a swapped-out page
    assert absent(mem) == {0, 2, 3}
    assert mem.read(RAM_BASE, 3 * PAGE_SIZE) == b"\xff" * PAGE_SIZE + bytes(PAGE_SIZE) + \
        b"\xff" * PAGE_SIZE
    swapper.close()
    file.close()


def test_a_full_swap_file_leaves_the_guest_resident() -> None:
    mem = PhysicalMemory(RAM_BASE, 1 << 20)
    mem.write(RAM_BASE, os.urandom(8 * PAGE_SIZE))
    checksum = zlib.crc32(mem.ram)
    swapper, file = Swapper(mem, None), SwapFile(os.open("/dev/full", os.O_RDWR))
    with pytest.raises(SwapError, match="^cannot swap out: .*No space left on device$"):
        swapper.swap_out(file)
    assert mem.absent_pages == 0 and zlib.crc32(mem.ram) == checksum
    swapper.close()
    file.close()


def test_restored_ram_writes_only_the_pages_copied_since(tmp_path: Path) -> None:
    """RAM mapped copy-on-write from a snapshot: its unchanged pages are dropped (they
    read the snapshot again), the pages the guest changed go to the file."""
    snap = tmp_path / "ram"
    snap.write_bytes(os.urandom(RAM_SIZE))
    fd = os.open(snap, os.O_RDONLY)
    mem = PhysicalMemory(RAM_BASE, RAM_SIZE, backing=(fd, 0))
    os.close(fd)
    assert mem.read(RAM_BASE, RAM_SIZE) == snap.read_bytes()  # every page read once
    mem.write(RAM_BASE + 5 * PAGE_SIZE + 8, b"changed")
    mem.discard(9 * PAGE_SIZE, 2 * PAGE_SIZE)  # zeros, not the snapshot's bytes
    checksum = zlib.crc32(mem.ram)
    pagemap = os.open(PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    swapper, file = Swapper(mem, pagemap), swap_file(tmp_path / "swap")
    assert swapper.swap_out(file) == 3 * PAGE_SIZE
    assert absent(mem) == {5, 9, 10}
    assert os.stat(tmp_path / "swap").st_blocks * 512 <= 4 * PAGE_SIZE
    assert zlib.crc32(mem.read(RAM_BASE, RAM_SIZE)) == checksum
    swapper.close()
    file.close()
    os.close(pagemap)


class RecordingSource:
    """A page source holding pages in memory (as a post-copy migration's would hold what
    the source VMM sent), recording what it was asked for."""

    def __init__(self, mem: PhysicalMemory) -> None:
        self.pages = bytes(mem.ram)
        self.asked: list[tuple[int, int]] = []

    def fetch(self, runs: list[tuple[int, int]], ram: memoryview) -> None:
        self.asked += runs
        for first, count in runs:
            start, end = first << PAGE_SHIFT, (first + count) << PAGE_SHIFT
            ram[start:end] = self.pages[start:end]


def test_a_write_fetches_only_the_absent_pages_it_overwrites_in_part() -> None:
    mem = PhysicalMemory(RAM_BASE, 1 << 20)
    mem.write(RAM_BASE, bytes(range(256)) * (64 * PAGE_SIZE // 256))
    source = RecordingSource(mem)
    mem.mark_absent([(0, 64)], source)
    mem.write(RAM_BASE + 40 * PAGE_SIZE, b"\1" * (3 * PAGE_SIZE))  # three whole pages
    assert source.asked == [] and mem.absent_pages == 61
    mem.write(RAM_BASE + 10 * PAGE_SIZE - 8, b"\2" * (PAGE_SIZE + 16))  # 9 and 11 in part
    # page 9 and the readahead after it, less page 10 (forgotten); then page 11 is back
    assert source.asked == [(9, 1), (11, 14)]
    assert mem.read(RAM_BASE + 9 * PAGE_SIZE, 3 * PAGE_SIZE) == \
        source.pages[9 * PAGE_SIZE:10 * PAGE_SIZE - 8] + b"\2" * (PAGE_SIZE + 16) + \
        source.pages[11 * PAGE_SIZE + 8:12 * PAGE_SIZE]
    assert mem.read(RAM_BASE + 40 * PAGE_SIZE, 3 * PAGE_SIZE) == b"\1" * (3 * PAGE_SIZE)
