"""Trap entry and return, interrupt selection, WFI and SFENCE.VMA (priv. spec 1.12).

These run on the slow path (once per trap, xRET or block boundary with interrupts
pending) and touch only the hart's flat CSR and control buffers, so every tier can
call them. The software TLB's entries were checked for one privilege, so when the
privilege changes the TLB switches to the new privilege's entries; when MPRV makes
M-mode data accesses follow an MPP that changes, it is flushed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.cpu.causes import (
    ILLEGAL_INSN,
    INTERRUPT_BIT,
    IRQ_M_EXT,
    IRQ_M_SOFT,
    IRQ_M_TIMER,
    IRQ_S_EXT,
    IRQ_S_SOFT,
    IRQ_S_TIMER,
    Trap,
)
from popek.cpu.csr import (
    MCAUSE,
    MEDELEG,
    MEPC,
    MIDELEG,
    MIE,
    MIP,
    MSTATUS,
    MSTATUS_MIE,
    MSTATUS_MPIE,
    MSTATUS_MPP,
    MSTATUS_MPP_SHIFT,
    MSTATUS_MPRV,
    MSTATUS_SIE,
    MSTATUS_SPIE,
    MSTATUS_SPP,
    MSTATUS_TSR,
    MSTATUS_TVM,
    MSTATUS_TW,
    MTVAL,
    MTVEC,
    SCAUSE,
    SEPC,
    STVAL,
    STVEC,
)
from popek.cpu.state import CTL_PRIV, CTL_WFI, PRIV_M, PRIV_S, PRIV_U, XLEN_MASK

if TYPE_CHECKING:
    from popek.cpu.hart import Hart

# Interrupts taken first come first; every M-level line outranks every S-level one.
PRIORITY = (IRQ_M_EXT, IRQ_M_SOFT, IRQ_M_TIMER, IRQ_S_EXT, IRQ_S_SOFT, IRQ_S_TIMER)
_SPP_SHIFT = 8


def take_trap(hart: Hart, cause: int, tval: int, pc: int) -> int:
    """Enter the trap handler for ``cause`` raised at ``pc``; return the handler's address.

    A trap goes to S-mode only when it is delegated and raised in S- or U-mode: traps
    never lower the privilege.
    """
    c = hart.csr
    ctl = hart.ctl
    priv = ctl[CTL_PRIV]
    code = cause & ~INTERRUPT_BIT
    deleg = c[MIDELEG] if cause & INTERRUPT_BIT else c[MEDELEG]
    status = c[MSTATUS]
    if priv <= PRIV_S and (deleg >> code) & 1:
        c[SEPC] = pc
        c[SCAUSE] = cause
        c[STVAL] = tval & XLEN_MASK
        c[MSTATUS] = (
            (status & ~(MSTATUS_SPIE | MSTATUS_SIE | MSTATUS_SPP))
            | ((status & MSTATUS_SIE) << 4)  # SIE -> SPIE
            | (priv << _SPP_SHIFT)
        )
        new_priv = PRIV_S
        tvec = c[STVEC]
        flush = False
    else:
        c[MEPC] = pc
        c[MCAUSE] = cause
        c[MTVAL] = tval & XLEN_MASK
        c[MSTATUS] = (
            (status & ~(MSTATUS_MPIE | MSTATUS_MIE | MSTATUS_MPP))
            | ((status & MSTATUS_MIE) << 4)  # MIE -> MPIE
            | (priv << MSTATUS_MPP_SHIFT)
        )
        new_priv = PRIV_M
        tvec = c[MTVEC]
        # With MPRV set, M-mode data accesses follow MPP, which just changed.
        flush = bool(status & MSTATUS_MPRV)
    ctl[CTL_PRIV] = new_priv
    ctl[CTL_WFI] = 0
    if flush:
        hart.mmu.flush()
    elif new_priv != priv:
        hart.mmu.switch_priv(priv, new_priv)
    base = tvec & ~3
    if tvec & 1 and cause & INTERRUPT_BIT:
        return base + 4 * code
    return base


def pending_interrupt(hart: Hart) -> int | None:
    """The interrupt cause (with INTERRUPT_BIT) to take before the next instruction, or None."""
    c = hart.csr
    pending = c[MIP] & c[MIE]
    if not pending:
        return None
    priv = hart.ctl[CTL_PRIV]
    status = c[MSTATUS]
    deleg = c[MIDELEG]
    enabled = 0
    if priv < PRIV_M or status & MSTATUS_MIE:
        enabled = pending & ~deleg
    if priv < PRIV_S or (priv == PRIV_S and status & MSTATUS_SIE):
        enabled |= pending & deleg
    if enabled:
        for irq in PRIORITY:
            if (enabled >> irq) & 1:
                return INTERRUPT_BIT | irq
    return None


def mret(hart: Hart) -> int:
    """Return from an M-mode trap handler; the new pc is mepc."""
    ctl = hart.ctl
    if ctl[CTL_PRIV] != PRIV_M:
        raise Trap(ILLEGAL_INSN, None)
    c = hart.csr
    status = c[MSTATUS]
    new_priv = (status & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT
    new = (status & ~(MSTATUS_MIE | MSTATUS_MPP)) | ((status & MSTATUS_MPIE) >> 4) | MSTATUS_MPIE
    if new_priv != PRIV_M:
        new &= ~MSTATUS_MPRV
    c[MSTATUS] = new
    ctl[CTL_PRIV] = new_priv
    if status & MSTATUS_MPRV:  # cleared, or MPP is now U
        hart.mmu.flush()
    elif new_priv != PRIV_M:
        hart.mmu.switch_priv(PRIV_M, new_priv)
    return c[MEPC]


def sret(hart: Hart) -> int:
    """Return from an S-mode trap handler; the new pc is sepc. M-mode may use it too."""
    c = hart.csr
    ctl = hart.ctl
    priv = ctl[CTL_PRIV]
    status = c[MSTATUS]
    if priv == PRIV_U or (priv == PRIV_S and status & MSTATUS_TSR):
        raise Trap(ILLEGAL_INSN, None)
    new_priv = (status & MSTATUS_SPP) >> _SPP_SHIFT
    c[MSTATUS] = (
        (status & ~(MSTATUS_SIE | MSTATUS_SPP | MSTATUS_MPRV))
        | ((status & MSTATUS_SPIE) >> 4)
        | MSTATUS_SPIE
    )
    ctl[CTL_PRIV] = new_priv
    if status & MSTATUS_MPRV:
        hart.mmu.flush()
    elif new_priv != priv:
        hart.mmu.switch_priv(priv, new_priv)
    return c[SEPC]


def wfi(hart: Hart) -> None:
    """Wait for an interrupt; U-mode, and S-mode under mstatus.TW, may not wait."""
    priv = hart.ctl[CTL_PRIV]
    if priv == PRIV_U or (priv == PRIV_S and hart.csr[MSTATUS] & MSTATUS_TW):
        raise Trap(ILLEGAL_INSN, None)
    hart.ctl[CTL_WFI] = 1


def sfence_vma(hart: Hart, vaddr: int | None, asid: int | None) -> None:
    """Order page-table updates before later translations of ``vaddr`` (None: of all) in
    address space ``asid`` (None: in all, global mappings included).

    The software TLB has no address-space identifiers, so a fence of one page drops its
    translations in every address space, and a fence of one address space drops every
    translation but the global ones (which the spec exempts from it). A fence of all
    keeps those global translations that a walk would give again (see Mmu.fence).
    """
    priv = hart.ctl[CTL_PRIV]
    if priv == PRIV_U or (priv == PRIV_S and hart.csr[MSTATUS] & MSTATUS_TVM):
        raise Trap(ILLEGAL_INSN, None)
    if vaddr is not None:
        hart.mmu.flush_page(vaddr)
    elif asid is None:
        hart.mmu.fence()
    else:
        hart.mmu.flush_local()
