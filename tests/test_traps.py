"""Trap entry, delegation, xRET, interrupts, WFI and SFENCE.VMA (privileged spec 1.12)."""

from __future__ import annotations

import pytest
from rvasm import (
    EBREAK,
    ECALL,
    MRET,
    RAM_BASE,
    SRET,
    WFI,
    csrr,
    load,
    make_hart,
    sfence_vma,
)

from popek.cpu import csr as C
from popek.cpu import trap
from popek.cpu.causes import (
    BREAKPOINT,
    ECALL_M,
    ECALL_S,
    ECALL_U,
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
from popek.cpu.state import CTL_WFI, PRIV_M, PRIV_S, PRIV_U

MTVEC = RAM_BASE + 0x1000
STVEC = RAM_BASE + 0x2000
PC = RAM_BASE + 0x400


@pytest.fixture
def hart():
    h = make_hart()
    h.csr[C.MTVEC] = MTVEC
    h.csr[C.STVEC] = STVEC
    return h


def status_field(hart, mask: int) -> int:
    return (hart.csr[C.MSTATUS] & mask) // (mask & -mask)


def illegal(fn, *args) -> bool:
    try:
        fn(*args)
    except Trap as t:
        return t.cause == ILLEGAL_INSN
    return False


# -- synchronous traps and delegation --------------------------------------------------------
def test_ecall_from_u_goes_to_m_without_delegation(hart):
    hart.priv = PRIV_U
    hart.csr[C.MSTATUS] |= C.MSTATUS_MIE
    assert trap.take_trap(hart, ECALL_U, 0, PC) == MTVEC
    assert hart.priv == PRIV_M
    assert hart.csr[C.MEPC] == PC and hart.csr[C.MCAUSE] == ECALL_U and hart.csr[C.MTVAL] == 0
    assert status_field(hart, C.MSTATUS_MPP) == PRIV_U
    assert status_field(hart, C.MSTATUS_MPIE) == 1 and status_field(hart, C.MSTATUS_MIE) == 0


def test_delegated_ecall_from_u_goes_to_s(hart):
    hart.priv = PRIV_U
    hart.csr[C.MEDELEG] = 1 << ECALL_U
    hart.csr[C.MSTATUS] |= C.MSTATUS_SIE
    assert trap.take_trap(hart, ECALL_U, 0, PC) == STVEC
    assert hart.priv == PRIV_S
    assert hart.csr[C.SEPC] == PC and hart.csr[C.SCAUSE] == ECALL_U
    assert status_field(hart, C.MSTATUS_SPP) == PRIV_U
    assert status_field(hart, C.MSTATUS_SPIE) == 1 and status_field(hart, C.MSTATUS_SIE) == 0
    assert hart.csr[C.MEPC] == 0 and hart.csr[C.MCAUSE] == 0


def test_delegated_trap_from_s_records_spp_s(hart):
    hart.priv = PRIV_S
    hart.csr[C.MEDELEG] = 1 << ECALL_S
    assert trap.take_trap(hart, ECALL_S, 0, PC) == STVEC
    assert status_field(hart, C.MSTATUS_SPP) == 1 and hart.priv == PRIV_S


def test_undelegated_ecall_from_s_goes_to_m(hart):
    hart.priv = PRIV_S
    hart.csr[C.MEDELEG] = 1 << ECALL_U
    assert trap.take_trap(hart, ECALL_S, 0, PC) == MTVEC
    assert hart.csr[C.MCAUSE] == ECALL_S and status_field(hart, C.MSTATUS_MPP) == PRIV_S


def test_traps_in_m_mode_are_never_delegated(hart):
    hart.csr[C.MEDELEG] = C.MEDELEG_MASK
    assert trap.take_trap(hart, BREAKPOINT, PC, PC) == MTVEC
    assert hart.priv == PRIV_M and hart.csr[C.MCAUSE] == BREAKPOINT
    assert status_field(hart, C.MSTATUS_MPP) == PRIV_M


def test_exceptions_use_the_base_address_even_in_vectored_mode(hart):
    hart.csr[C.MTVEC] = MTVEC | 1
    assert trap.take_trap(hart, ILLEGAL_INSN, 0x1234, PC) == MTVEC
    assert hart.csr[C.MTVAL] == 0x1234


def test_trap_entry_flushes_the_tlb_when_privilege_changes(hart):
    hart.priv = PRIV_U
    hart.mmu.tlb_r[1] = 0
    trap.take_trap(hart, ECALL_U, 0, PC)
    assert not hart.mmu.tlb_r


# -- executed through the hart ---------------------------------------------------------------
def enter(hart, priv: int, pc: int) -> None:
    """Drop to ``priv`` at ``pc`` the way firmware does: an mret."""
    hart.csr[C.MSTATUS] = (hart.csr[C.MSTATUS] & ~C.MSTATUS_MPP) | (priv << 11)
    hart.csr[C.MEPC] = pc
    load(hart, RAM_BASE, MRET)
    hart.pc = RAM_BASE
    hart.run(1)
    assert hart.pc == pc and hart.priv == priv


@pytest.mark.parametrize("priv, cause", [(PRIV_U, ECALL_U), (PRIV_S, ECALL_S), (PRIV_M, ECALL_M)])
def test_ecall_instruction_reports_the_callers_mode(hart, priv, cause):
    load(hart, MTVEC, WFI)
    load(hart, PC, ECALL)
    enter(hart, priv, PC)
    hart.run(10)
    assert hart.waiting and hart.pc == MTVEC + 4
    assert hart.csr[C.MCAUSE] == cause and hart.csr[C.MEPC] == PC and hart.csr[C.MTVAL] == 0


def test_ebreak_reports_its_address(hart):
    load(hart, MTVEC, WFI)
    load(hart, PC, EBREAK)
    hart.pc = PC
    hart.run(10)
    assert hart.csr[C.MCAUSE] == BREAKPOINT and hart.csr[C.MTVAL] == PC


def test_illegal_instruction_reports_its_bits(hart):
    word = csrr(1, C.MSTATUS)  # M-mode CSR read from U-mode
    load(hart, MTVEC, WFI)
    load(hart, PC, word)
    enter(hart, PRIV_U, PC)
    hart.run(10)
    assert hart.csr[C.MCAUSE] == ILLEGAL_INSN and hart.csr[C.MTVAL] == word
    assert hart.csr[C.MEPC] == PC


def test_delegated_ecall_runs_the_s_mode_handler(hart):
    hart.csr[C.MEDELEG] = 1 << ECALL_U
    load(hart, STVEC, WFI)
    load(hart, PC, ECALL)
    enter(hart, PRIV_U, PC)
    hart.run(10)
    assert hart.waiting and hart.pc == STVEC + 4 and hart.priv == PRIV_S
    assert hart.csr[C.SCAUSE] == ECALL_U and hart.csr[C.SEPC] == PC


# -- mret and sret ---------------------------------------------------------------------------
def test_mret_restores_mie_and_mode_and_returns_to_mepc(hart):
    hart.csr[C.MSTATUS] |= C.MSTATUS_MPIE | (PRIV_S << 11)
    hart.csr[C.MEPC] = PC
    assert trap.mret(hart) == PC
    assert hart.priv == PRIV_S
    assert status_field(hart, C.MSTATUS_MIE) == 1 and status_field(hart, C.MSTATUS_MPIE) == 1
    assert status_field(hart, C.MSTATUS_MPP) == PRIV_U


def test_mret_to_a_lower_mode_clears_mprv(hart):
    hart.csr[C.MSTATUS] |= C.MSTATUS_MPRV | (PRIV_U << 11)
    trap.mret(hart)
    assert not hart.csr[C.MSTATUS] & C.MSTATUS_MPRV


def test_mret_back_to_m_keeps_mprv(hart):
    hart.csr[C.MSTATUS] |= C.MSTATUS_MPRV | (PRIV_M << 11)
    trap.mret(hart)
    assert hart.priv == PRIV_M and hart.csr[C.MSTATUS] & C.MSTATUS_MPRV


@pytest.mark.parametrize("priv", [PRIV_S, PRIV_U])
def test_mret_is_illegal_below_m(hart, priv):
    hart.priv = priv
    assert illegal(trap.mret, hart)


def test_sret_restores_sie_and_mode_and_clears_mprv(hart):
    hart.priv = PRIV_S
    hart.csr[C.MSTATUS] |= C.MSTATUS_SPIE | C.MSTATUS_MPRV  # SPP = U
    hart.csr[C.SEPC] = PC
    assert trap.sret(hart) == PC
    assert hart.priv == PRIV_U
    assert status_field(hart, C.MSTATUS_SIE) == 1 and status_field(hart, C.MSTATUS_SPIE) == 1
    assert not hart.csr[C.MSTATUS] & C.MSTATUS_MPRV


def test_sret_from_m_mode_is_allowed(hart):
    hart.csr[C.MSTATUS] |= C.MSTATUS_SPP | C.MSTATUS_TSR
    hart.csr[C.SEPC] = PC
    assert trap.sret(hart) == PC and hart.priv == PRIV_S
    assert status_field(hart, C.MSTATUS_SPP) == PRIV_U


def test_sret_is_illegal_in_u_and_in_s_under_tsr(hart):
    hart.priv = PRIV_U
    assert illegal(trap.sret, hart)
    hart.priv = PRIV_S
    hart.csr[C.MSTATUS] |= C.MSTATUS_TSR
    assert illegal(trap.sret, hart)


def test_sret_instruction_returns_to_user_mode(hart):
    load(hart, PC, SRET)
    hart.csr[C.SEPC] = PC + 0x100
    load(hart, PC + 0x100, ECALL)
    load(hart, MTVEC, WFI)
    enter(hart, PRIV_S, PC)
    hart.run(10)
    assert hart.csr[C.MCAUSE] == ECALL_U and hart.csr[C.MEPC] == PC + 0x100


# -- interrupts ------------------------------------------------------------------------------
def pend(hart, *irqs: int, enable: bool = True) -> None:
    for irq in irqs:
        hart.csr[C.MIP] |= 1 << irq
        if enable:
            hart.csr[C.MIE] |= 1 << irq


def test_no_interrupt_without_its_enable_bit(hart):
    hart.csr[C.MSTATUS] |= C.MSTATUS_MIE
    pend(hart, IRQ_M_TIMER, enable=False)
    assert trap.pending_interrupt(hart) is None


def test_m_interrupts_in_m_mode_need_mie(hart):
    pend(hart, IRQ_M_TIMER)
    assert trap.pending_interrupt(hart) is None
    hart.csr[C.MSTATUS] |= C.MSTATUS_MIE
    assert trap.pending_interrupt(hart) == INTERRUPT_BIT | IRQ_M_TIMER


@pytest.mark.parametrize("priv", [PRIV_S, PRIV_U])
def test_m_interrupts_below_m_ignore_mie(hart, priv):
    hart.priv = priv
    pend(hart, IRQ_M_EXT)
    assert trap.pending_interrupt(hart) == INTERRUPT_BIT | IRQ_M_EXT


def test_delegated_interrupts_never_trap_m_mode(hart):
    hart.csr[C.MIDELEG] = C.S_INTERRUPTS
    hart.csr[C.MSTATUS] |= C.MSTATUS_MIE | C.MSTATUS_SIE
    pend(hart, IRQ_S_TIMER)
    assert trap.pending_interrupt(hart) is None


def test_delegated_interrupts_in_s_mode_need_sie(hart):
    hart.priv = PRIV_S
    hart.csr[C.MIDELEG] = C.S_INTERRUPTS
    pend(hart, IRQ_S_TIMER)
    assert trap.pending_interrupt(hart) is None
    hart.csr[C.MSTATUS] |= C.MSTATUS_SIE
    assert trap.pending_interrupt(hart) == INTERRUPT_BIT | IRQ_S_TIMER


def test_delegated_interrupts_in_u_mode_ignore_sie(hart):
    hart.priv = PRIV_U
    hart.csr[C.MIDELEG] = C.S_INTERRUPTS
    pend(hart, IRQ_S_SOFT)
    assert trap.pending_interrupt(hart) == INTERRUPT_BIT | IRQ_S_SOFT


def test_undelegated_s_interrupt_goes_to_m_even_from_s(hart):
    hart.priv = PRIV_S
    pend(hart, IRQ_S_EXT)
    assert trap.pending_interrupt(hart) == INTERRUPT_BIT | IRQ_S_EXT
    assert trap.take_trap(hart, INTERRUPT_BIT | IRQ_S_EXT, 0, PC) == MTVEC
    assert hart.priv == PRIV_M


def test_interrupt_priority_is_mei_msi_mti_sei_ssi_sti(hart):
    hart.priv = PRIV_U
    order = [IRQ_M_EXT, IRQ_M_SOFT, IRQ_M_TIMER, IRQ_S_EXT, IRQ_S_SOFT, IRQ_S_TIMER]
    pend(hart, *order)
    for irq in order:
        assert trap.pending_interrupt(hart) == INTERRUPT_BIT | irq
        hart.csr[C.MIP] &= ~(1 << irq)
    assert trap.pending_interrupt(hart) is None


def test_m_level_interrupt_outranks_a_delegated_one(hart):
    hart.priv = PRIV_U
    hart.csr[C.MIDELEG] = C.MIP_SEIP
    pend(hart, IRQ_S_EXT, IRQ_M_TIMER)
    assert trap.pending_interrupt(hart) == INTERRUPT_BIT | IRQ_M_TIMER


def test_vectored_mode_sends_interrupts_to_base_plus_four_times_cause(hart):
    hart.csr[C.MTVEC] = MTVEC | 1
    cause = INTERRUPT_BIT | IRQ_M_TIMER
    assert trap.take_trap(hart, cause, 0, PC) == MTVEC + 4 * IRQ_M_TIMER
    assert hart.csr[C.MCAUSE] == cause


def test_delegated_interrupt_uses_stvec_vectoring(hart):
    hart.priv = PRIV_U
    hart.csr[C.STVEC] = STVEC | 1
    hart.csr[C.MIDELEG] = C.S_INTERRUPTS
    cause = INTERRUPT_BIT | IRQ_S_EXT
    assert trap.take_trap(hart, cause, 0, PC) == STVEC + 4 * IRQ_S_EXT
    assert hart.csr[C.SCAUSE] == cause and hart.priv == PRIV_S


def test_timer_interrupt_is_taken_before_the_next_instruction(hart):
    load(hart, PC, WFI)
    load(hart, MTVEC, WFI)
    hart.csr[C.MSTATUS] |= C.MSTATUS_MIE
    hart.csr[C.MIE] = C.MIP_MTIP
    hart.set_interrupt(IRQ_M_TIMER, True)
    hart.pc = PC
    hart.run(10)
    assert hart.csr[C.MCAUSE] == INTERRUPT_BIT | IRQ_M_TIMER and hart.csr[C.MEPC] == PC
    assert hart.pc == MTVEC + 4


# -- wfi ------------------------------------------------------------------------------------
def test_wfi_waits_in_m_and_s(hart):
    trap.wfi(hart)
    assert hart.ctl[CTL_WFI]
    hart.ctl[CTL_WFI] = 0
    hart.csr[C.MSTATUS] |= C.MSTATUS_TW  # TW does not apply to M-mode
    trap.wfi(hart)
    assert hart.ctl[CTL_WFI]
    hart.ctl[CTL_WFI] = 0
    hart.priv = PRIV_S
    hart.csr[C.MSTATUS] &= ~C.MSTATUS_TW
    trap.wfi(hart)
    assert hart.ctl[CTL_WFI]


def test_wfi_is_illegal_in_u_and_in_s_under_tw(hart):
    hart.priv = PRIV_U
    assert illegal(trap.wfi, hart)
    hart.priv = PRIV_S
    hart.csr[C.MSTATUS] |= C.MSTATUS_TW
    assert illegal(trap.wfi, hart)
    assert not hart.ctl[CTL_WFI]


def test_taking_an_interrupt_ends_the_wait(hart):
    hart.ctl[CTL_WFI] = 1
    trap.take_trap(hart, INTERRUPT_BIT | IRQ_M_SOFT, 0, PC)
    assert not hart.ctl[CTL_WFI]


def test_a_waiting_hart_resumes_at_the_handler_when_interrupted(hart):
    load(hart, PC, WFI)
    load(hart, MTVEC, WFI)
    hart.csr[C.MSTATUS] |= C.MSTATUS_MIE
    hart.csr[C.MIE] = C.MIP_MSIP
    hart.pc = PC
    hart.run(10)
    assert hart.waiting and hart.pc == PC + 4
    hart.set_interrupt(IRQ_M_SOFT, True)
    hart.run(10)
    assert hart.csr[C.MCAUSE] == INTERRUPT_BIT | IRQ_M_SOFT and hart.csr[C.MEPC] == PC + 4
    assert hart.pc == MTVEC + 4


# -- sfence.vma ------------------------------------------------------------------------------
def test_sfence_vma_without_an_address_flushes_the_tlb(hart):
    hart.priv = PRIV_S
    hart.mmu.tlb_r[5] = 0
    hart.mmu.local_pages.add(5)
    trap.sfence_vma(hart, None, None)
    assert not hart.mmu.tlb_r


def test_sfence_vma_is_illegal_in_u_and_in_s_under_tvm(hart):
    hart.priv = PRIV_U
    assert illegal(trap.sfence_vma, hart, None, None)
    hart.priv = PRIV_S
    hart.csr[C.MSTATUS] |= C.MSTATUS_TVM
    assert illegal(trap.sfence_vma, hart, 0x1000, 0)
    hart.priv = PRIV_M
    trap.sfence_vma(hart, None, None)


def test_sfence_vma_instruction_from_u_mode_traps(hart):
    word = sfence_vma()
    load(hart, MTVEC, WFI)
    load(hart, PC, word)
    enter(hart, PRIV_U, PC)
    hart.run(10)
    assert hart.csr[C.MCAUSE] == ILLEGAL_INSN and hart.csr[C.MTVAL] == word
