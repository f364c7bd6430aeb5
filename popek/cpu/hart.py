"""One RISC-V hart: state, memory path, CSR file, trap unit and an execution engine.

The hart is what the machine (system emulation) and the process VM (user-mode
emulation) share: the same state, decoder and engines. They differ only in how
addresses are translated and in who handles traps (``on_trap``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from popek.cpu import cmo
from popek.cpu import trap as trap_unit
from popek.cpu.csr import CsrFile
from popek.cpu.mmu import Mmu, Translate
from popek.cpu.physmem import PhysicalMemory
from popek.cpu.state import CTL_WFI, PRIV_M, HartState

MIP = 0x344
MIE = 0x304
TIMEBASE_HZ = 10_000_000

TrapHandler = Callable[[int, int, int], int]


def host_clock() -> Callable[[], int]:
    """A 10 MHz counter that follows host time from now."""
    start = time.monotonic_ns()
    return lambda: (time.monotonic_ns() - start) // 100


class Hart(HartState):
    """A hart attached to physical memory; starts in M-mode at ``pc`` 0 with satp bare."""

    def __init__(self, mem: PhysicalMemory, hartid: int = 0, *,
                 translate: Translate | None = None,
                 clock: Callable[[], int] | None = None, engine: str | None = None) -> None:
        super().__init__(hartid)
        self.mem = mem
        self.time: Callable[[], int] = clock or host_clock()
        self.priv = PRIV_M
        self.mmu = Mmu(self, mem, translate)
        self.csrs = CsrFile(self)
        self.csrs.reset()
        # Who receives traps: by default the architectural trap unit; the process VM
        # installs its own (system calls and signals).
        self.on_trap: TrapHandler = lambda cause, tval, pc: trap_unit.take_trap(
            self, cause, tval, pc)
        from popek.engine.engine import DEFAULT_TIER, Engine

        self.engine = Engine(self, engine or DEFAULT_TIER)

    # -- running ------------------------------------------------------------------------
    def run(self, budget: int, spins: bool = False) -> int:
        """Run about ``budget`` instructions; returns how many retired. ``spins``: stop
        early if the hart spins (``engine.spun``), as other harts could use the time."""
        self.wake_if_interrupted()
        return self.engine.run(budget, spins=spins)

    def step(self, interrupts: bool = True) -> int:
        """Execute exactly one instruction (or take one trap); returns 1 if it retired.
        ``interrupts`` False leaves pending interrupts pending (a debugger's step)."""
        self.wake_if_interrupted()
        return self.engine.run(1, single=True, interrupts=interrupts)

    @property
    def waiting(self) -> bool:
        return bool(self.ctl[CTL_WFI])

    def wake_if_interrupted(self) -> None:
        """WFI ends when any enabled interrupt is pending, even if globally masked."""
        if self.ctl[CTL_WFI] and self.csr[MIP] & self.csr[MIE]:
            self.ctl[CTL_WFI] = 0

    def set_interrupt(self, bit: int, level: bool) -> None:
        """Drive an interrupt line into mip (devices: timer, software, external)."""
        if level:
            self.csr[MIP] |= 1 << bit
        else:
            self.csr[MIP] &= ~(1 << bit) & ((1 << 64) - 1)

    # -- services the instruction semantics call ----------------------------------------
    def mret(self) -> int:
        self.reservation = None
        return trap_unit.mret(self)

    def sret(self) -> int:
        self.reservation = None
        return trap_unit.sret(self)

    def wfi(self) -> None:
        trap_unit.wfi(self)

    def sfence_vma(self, vaddr: int | None, asid: int | None) -> None:
        trap_unit.sfence_vma(self, vaddr, asid)

    def cbo(self, kind: int, addr: int) -> None:
        cmo.operate(self, kind, addr)

    def fence_i(self) -> None:
        """Nothing to do: decoded code is dropped at every store that overlaps it (the
        engine watches its pages, see Engine.page_written), which is stronger than fence.i
        asks. Flushing here would throw away the whole code cache each time Linux maps an
        executable page."""
