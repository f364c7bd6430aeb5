"""Trap causes and the exception that carries a synchronous trap out of an instruction.

A handler raises :class:`Trap` before it writes any architectural state, so the
engine's view of ``pc`` and registers is exactly the precise state the trap needs.
"""

from __future__ import annotations

# Synchronous exception causes (mcause with the interrupt bit clear).
INSN_MISALIGNED = 0
INSN_ACCESS = 1
ILLEGAL_INSN = 2
BREAKPOINT = 3
LOAD_MISALIGNED = 4
LOAD_ACCESS = 5
STORE_MISALIGNED = 6
STORE_ACCESS = 7
ECALL_U = 8
ECALL_S = 9
ECALL_M = 11
INSN_PAGE_FAULT = 12
LOAD_PAGE_FAULT = 13
STORE_PAGE_FAULT = 15

# Interrupt causes (mcause with the interrupt bit set); also the bit numbers in mip/mie.
IRQ_S_SOFT = 1
IRQ_M_SOFT = 3
IRQ_S_TIMER = 5
IRQ_M_TIMER = 7
IRQ_S_EXT = 9
IRQ_M_EXT = 11

INTERRUPT_BIT = 1 << 63

# Memory access kinds, used by translation, PMP and fault selection.
ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_EXEC = 2

PAGE_FAULT_FOR_ACCESS = (LOAD_PAGE_FAULT, STORE_PAGE_FAULT, INSN_PAGE_FAULT)
ACCESS_FAULT_FOR_ACCESS = (LOAD_ACCESS, STORE_ACCESS, INSN_ACCESS)
MISALIGNED_FOR_ACCESS = (LOAD_MISALIGNED, STORE_MISALIGNED, INSN_MISALIGNED)


class Trap(Exception):
    """A synchronous exception raised by an instruction.

    ``tval`` of ``None`` on an illegal instruction means "the faulting instruction's
    bits": the engine fills them in, since handlers do not carry the raw encoding.
    """

    __slots__ = ("cause", "tval")

    def __init__(self, cause: int, tval: int | None = 0) -> None:
        super().__init__(cause, tval)
        self.cause = cause
        self.tval = tval

    def __repr__(self) -> str:
        return f"Trap(cause={self.cause}, tval={self.tval!r})"


class DebugStop(Trap):
    """Not an architectural trap: a debugger stops the hart before this instruction.

    Raised like a trap (at a block start that holds a breakpoint, or by a watched write
    before it lands) so that every tier's precise-trap path leaves exactly the state
    before the instruction; the engine then returns instead of taking a trap.
    ``reason`` and ``addr`` say why, for the debugger's stop reply."""

    __slots__ = ("reason", "addr")

    def __init__(self, reason: str, addr: int) -> None:
        super().__init__(-1, 0)
        self.reason = reason
        self.addr = addr
