"""Dirty logs and write watches see every write to guest RAM, whoever writes it.

Each writer (the stores of every tier, the SBI firmware, the image loader, the process
VM's loader and system calls; device DMA and the page walker are tested beside their
devices) writes after a log starts, and the log must name exactly the pages written:
none missing, none extra. A page a hart has cached for writing when the log starts or
is taken must be seen again at its next write, on every tier.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rvasm import RAM_BASE, assemble

from popek.cpu.causes import ECALL_S
from popek.cpu.hart import Hart
from popek.cpu.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from popek.cpu.state import CTL_WFI
from popek.engine import engine as engine_module
from popek.engine.engine import TIERS
from popek.firmware.sbi import Ext
from popek.machine.config import MachineConfig
from popek.machine.loader import load_kernel
from popek.machine.virt import VirtMachine
from tests.vmm_guests import guest

REPO = Path(__file__).resolve().parents[1]
HANDLER = RAM_BASE + 0x3000
DATA = RAM_BASE + 0x4000
DATA_PAGE = (DATA - RAM_BASE) >> PAGE_SHIFT
MTVEC, MSTATUS = 0x305, 0x300
A0, A1, A2, A6, A7 = 10, 11, 12, 16, 17

# What each kind of store does to the address in a0, where a0 points, and the pages
# (first page, count) it writes.
STORES = {
    "sd": ("sd t0, 8(a0)", DATA, [(DATA_PAGE, 1)]),
    "sb": ("sb t0, 0(a0)", DATA + 0xFFF, [(DATA_PAGE, 1)]),
    "fsd": ("fcvt.d.l ft0, t0\n fsd ft0, 16(a0)", DATA, [(DATA_PAGE, 1)]),
    "amoadd.d": ("amoadd.d t1, t0, (a0)", DATA, [(DATA_PAGE, 1)]),
    "sc.d": ("lr.d t1, (a0)\n sc.d t2, t0, (a0)", DATA, [(DATA_PAGE, 1)]),
    "c.sw": ("c.sw a1, 4(a0)", DATA, [(DATA_PAGE, 1)]),
    "page-crossing sd": ("sd t0, 0(a0)", DATA + PAGE_SIZE - 4, [(DATA_PAGE, 2)]),
    # Beside the code it runs: the page stays watched, so every store takes the slow path.
    "sd beside code": ("sd t0, 0(a0)", RAM_BASE + 0x800, [(0, 1)]),
}


def pages(runs: list[tuple[int, int]]) -> set[int]:
    return {page for first, count in runs for page in range(first, first + count)}


@pytest.fixture
def eager_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "HOT_AFTER", 2)
    monkeypatch.setattr(engine_module, "NATIVE_AFTER", 2)
    monkeypatch.setattr(engine_module, "PATCHED_NATIVE_AFTER", 4)


def loop_storing(tier: str, store: str) -> Hart:
    """A hart whose program stores with ``store`` eight times, then traps to a WFI."""
    source = f"""# rvc
        li s0, 8
    1:  addi t0, t0, 1
        addi a1, a1, 3
        {store}
        addi s0, s0, -1
        bnez s0, 1b
        ebreak
    """
    mem = PhysicalMemory(RAM_BASE, 1 << 16)
    mem.write(RAM_BASE, assemble(source))
    mem.write(HANDLER, bytes.fromhex("73005010"))  # wfi
    hart = Hart(mem, engine=tier)
    hart.csr[MTVEC] = HANDLER
    hart.csr[MSTATUS] |= 1 << 13  # FP unit on
    return hart


def run_program(hart: Hart, target: int) -> None:
    hart.pc, hart.ctl[CTL_WFI], hart.x[A0] = RAM_BASE, 0, target
    for _ in range(1000):
        hart.run(50)
        hart.engine.finish_compiles()
        if hart.waiting:
            return
    raise AssertionError("the program did not finish")


def assert_loop_runs_on(hart: Hart, tier: str) -> None:
    loop = [b for b in hart.engine.blocks.values() if b.count > 2]
    assert loop, "the loop is not in the code cache"
    if tier == "jit":
        assert all(b.native is not None for b in loop), "the loop did not go native"
    elif tier == "translate":
        assert all(b.run.__code__.co_filename == "<popek block>" for b in loop)


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("tier", TIERS)
def test_every_kind_of_store_marks_its_page_on_every_tier(tier: str, kind: str,
                                                          eager_tiers: None) -> None:
    store, target, written = STORES[kind]
    hart = loop_storing(tier, store)
    for _ in range(6):  # hot: the blocks run on their tier, the page cached for writing
        run_program(hart, target)
    assert_loop_runs_on(hart, tier)
    log = hart.mem.dirty_log()
    run_program(hart, target)
    assert log.take() == written
    # The page was cached for writing again when the log was taken: the take evicted it,
    # so the native, inline or interpreted hit cannot write it unseen.
    run_program(hart, target)
    assert log.take() == written
    assert log.take() == []


def test_each_consumer_reads_and_resets_its_own_log() -> None:
    mem = PhysicalMemory(RAM_BASE, 1 << 16)
    store = Hart(mem).mmu.accessors["st64"]
    first = mem.dirty_log()
    store(RAM_BASE + 0x1000, 1)  # page 1 enters the write TLB, marked in the first log
    second = mem.dirty_log()
    store(RAM_BASE + 0x1000, 2)
    store(RAM_BASE + 0x2000, 3)
    assert first.take() == [(1, 2)]
    store(RAM_BASE + 0x2000, 4)
    assert second.take() == [(1, 2)]
    assert first.take() == [(2, 1)]
    assert second.take() == []
    first.close()
    store(RAM_BASE + 0x3000, 5)
    assert second.take() == [(3, 1)]


def test_dirty_runs_of_a_large_sparse_memory() -> None:
    mem = PhysicalMemory(RAM_BASE, 1 << 30, sparse=True)
    log = mem.dirty_log()
    last = (1 << 30) - PAGE_SIZE
    for addr, data in ((0, b"x"), (1000 * PAGE_SIZE - 1, b"yz" * 4097), (last, b"w")):
        mem.write(RAM_BASE + addr, data)
    assert log.take() == [(0, 1), (999, 4), (last >> PAGE_SHIFT, 1)]
    mem.write(RAM_BASE + 5 * PAGE_SIZE, b"")  # writes nothing
    assert log.take() == []


class Listener:
    """A write watcher that keeps watching for ``keep`` writes."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.heard: list[tuple[int, int, int]] = []

    def page_written(self, page: int, offset: int, size: int) -> bool:
        self.heard.append((page, offset, size))
        self.keep -= 1
        return self.keep > 0


def test_a_watched_page_is_written_only_after_its_watcher_hears() -> None:
    mem = PhysicalMemory(RAM_BASE, 1 << 16)
    hart = Hart(mem)
    store = hart.mmu.accessors["st32"]
    vpn = (RAM_BASE + 0x1000) >> PAGE_SHIFT
    store(RAM_BASE + 0x1010, 1)
    assert hart.mmu.tlb_w[vpn] == 0x1000  # cached for writing before the watch
    first, second = Listener(keep=2), Listener(keep=5)
    mem.watch(0x1000, first)
    mem.watch(0x2000, second)
    store(RAM_BASE + 0x1010, 2)
    assert vpn not in hart.mmu.tlb_w
    mem.write(RAM_BASE + 0x1FFE, b"abcd")  # the end of one watched page, start of the next
    assert first.heard == [(0x1000, 0x10, 4), (0x1000, 0xFFE, 2)]  # and it lets go
    assert second.heard == [(0x2000, 0, 2)]
    store(RAM_BASE + 0x1010, 3)
    assert len(first.heard) == 2 and hart.mmu.tlb_w[vpn] == 0x1000  # cached again
    store(RAM_BASE + 0x2004, 4)
    assert second.heard[1:] == [(0x2000, 4, 4)]
    assert mem.read(RAM_BASE + 0x1FFE, 10) == b"abcd\0\0\4\0\0\0"


def _machine(name: str, **config) -> VirtMachine:
    return VirtMachine(MachineConfig(kernel=guest(name), **{"mem": 32 << 20, "rng": False,
                                                            **config}), lambda data: None)


def test_sbi_console_read_marks_the_pages_it_fills() -> None:
    machine = _machine("hello")
    hart = machine.harts[0]
    machine.feed_input(b"typed")
    buffer = RAM_BASE + 0x10_0FFE  # across two pages
    hart.x[A0], hart.x[A1], hart.x[A2] = 5, buffer & 0xFFFF_FFFF, buffer >> 32
    hart.x[A6], hart.x[A7] = 1, Ext.DBCN  # console_read
    log = machine.mem.dirty_log()
    hart.on_trap(ECALL_S, 0, hart.pc)
    assert hart.x[A0] == 0 and machine.mem.read(buffer, 5) == b"typed"
    assert log.take() == [(0x100, 2)]


def test_loading_kernel_initrd_and_device_tree_marks_exactly_their_pages(
        tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(bytes(range(1, 256)) * 100)
    machine = _machine("hello", initrd=initrd)
    log = machine.mem.dirty_log()
    machine.boot()
    mem = machine.mem
    dtb = machine.harts[0].x[A1]
    dtb_size = int.from_bytes(mem.read(dtb + 4, 4), "big")  # the FDT header's totalsize
    initrd_at = mem.ram.find(initrd.read_bytes())
    expected = [(seg.addr - RAM_BASE, len(seg.data))
                for seg in load_kernel(machine.config.kernel, RAM_BASE, mem.size).segments]
    expected += [(dtb - RAM_BASE, dtb_size), (initrd_at, initrd.stat().st_size)]
    assert pages(log.take()) == {page for off, n in expected
                                 for page in range(off >> PAGE_SHIFT,
                                                   ((off + n - 1) >> PAGE_SHIFT) + 1)}


EXEC_PROBE = r"""
import json, os, sys
from popek.user.process import ExecOptions, Process
from popek.user.syscalls import dispatch

p = Process(ExecOptions())
log = p.mem.dirty_log()
p.execve(sys.argv[1], [b"probe"], [])
loaded = log.take()
vmas = [[v.start, v.end] for v in p.space.vmas]

def call(nr, *args):
    for i, value in enumerate(args):
        p.hart.x[10 + i] = value & ((1 << 64) - 1)
    p.hart.x[17] = nr
    p.hart.pc = dispatch(p, p.hart.pc) - 4
    return p.hart.x[10]

buffer = call(222, 0, 3 * 4096, 3, 0x22, -1, 0)  # mmap three anonymous read-write pages
mapped = log.take()
r, w = os.pipe()
os.write(w, b"0123456789")
got = call(63, r, buffer + 4096 + 8, 10)  # read() into the middle page
print(json.dumps({"loaded": loaded, "vmas": vmas,
                  "buffer": buffer, "mapped": mapped, "read": log.take(), "got": got}))
"""


def test_exec_loader_and_system_calls_mark_the_pages_they_write() -> None:
    program = REPO / "images" / "programs" / "hello-static"
    result = subprocess.run([sys.executable, "-c", EXEC_PROBE, str(program)],
                            capture_output=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    # Mapping zeroes whole pages, and the loader and the initial stack write into them.
    assert pages(out["loaded"]) == {page for start, end in out["vmas"]
                                    for page in range(start >> PAGE_SHIFT, end >> PAGE_SHIFT)}
    first = out["buffer"] >> PAGE_SHIFT
    assert out["mapped"] == [[first, 3]]
    assert out["got"] == 10 and out["read"] == [[first + 1, 1]]


def _symbol(elf: Path, name: str) -> int:
    nm = subprocess.run(["riscv64-linux-gnu-nm", str(elf)], capture_output=True, text=True,
                        check=True).stdout
    return next(int(line.split()[0], 16) for line in nm.splitlines() if line.endswith(f" {name}"))


@pytest.mark.parametrize("tier", TIERS)
def test_a_log_names_exactly_the_pages_two_running_harts_change(tier: str,
                                                                 eager_tiers: None) -> None:
    out = bytearray()
    machine = VirtMachine(MachineConfig(kernel=guest("dirtier"), mem=32 << 20, rng=False,
                                        cpus=2, engine=tier), out.extend)
    for _ in range(1000):
        if b"ready" in out:
            break
        machine.run_slice()
    for _ in range(10):  # both harts' loops reach their tier
        machine.run_slice()
        for hart in machine.harts:
            hart.engine.finish_compiles()
    if tier == "jit":
        assert all(any(b.native for b in h.engine.blocks.values()) for h in machine.harts)
    area = (_symbol(guest("dirtier"), "area") - RAM_BASE) >> PAGE_SHIFT
    ram = machine.mem.ram
    log = machine.mem.dirty_log()
    seen = set()
    for _ in range(6):
        before = bytes(ram)
        machine.run_slice()
        dirty = pages(log.take())
        changed = {p for p in range(len(ram) >> PAGE_SHIFT)
                   if ram[p << PAGE_SHIFT:(p + 1) << PAGE_SHIFT]
                   != before[p << PAGE_SHIFT:(p + 1) << PAGE_SHIFT]}
        assert dirty == changed
        seen |= dirty
    assert seen <= set(range(area, area + 256))
    assert {p % 2 for p in seen} == {0, 1}, "both harts wrote"
