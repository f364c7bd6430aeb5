"""CSR access rules and WARL behaviour, from the privileged specification 1.12."""

from __future__ import annotations

import pytest
from rvasm import CLOCK, RAM_BASE, WFI, csrr, csrrw, load, make_hart

from popek.cpu import csr as C
from popek.cpu.causes import ILLEGAL_INSN, Trap
from popek.cpu.state import PRIV_M, PRIV_S, PRIV_U

WRITE, SET, CLEAR = 0, 1, 2


@pytest.fixture
def hart():
    return make_hart()


def read(hart, num: int) -> int:
    return hart.csrs.op(num, SET, 0, True, False)


def write(hart, num: int, value: int) -> int:
    return hart.csrs.op(num, WRITE, value, True, True)


def refused(hart, num: int, value: int | None = None) -> bool:
    """Whether reading (value None) or writing ``num`` raises an illegal-instruction trap."""
    try:
        if value is None:
            read(hart, num)
        else:
            write(hart, num, value)
    except Trap as t:
        assert t.cause == ILLEGAL_INSN and t.tval is None
        return True
    return False


def count_flushes(hart) -> list[int]:
    calls: list[int] = []
    real = hart.mmu.flush

    def flush() -> None:
        calls.append(1)
        real()

    hart.mmu.flush = flush
    return calls


# -- reset values and identification ---------------------------------------------------------
def test_misa_reports_rv64_imafdc_with_s_and_u(hart):
    misa = read(hart, C.MISA)
    assert misa >> 62 == 2
    letters = {chr(ord("A") + i) for i in range(26) if misa >> i & 1}
    assert letters == set("IMAFDCSU")


def test_misa_writes_are_ignored(hart):
    before = read(hart, C.MISA)
    write(hart, C.MISA, 0)
    assert read(hart, C.MISA) == before


def test_mstatus_reports_64_bit_u_and_s_modes(hart):
    status = read(hart, C.MSTATUS)
    assert (status >> 32) & 3 == 2 and (status >> 34) & 3 == 2
    write(hart, C.MSTATUS, 0)
    status = read(hart, C.MSTATUS)
    assert (status >> 32) & 3 == 2 and (status >> 34) & 3 == 2


def test_identification_csrs_are_read_only(hart):
    assert read(hart, C.MHARTID) == hart.hartid
    for num in (C.MVENDORID, C.MARCHID, C.MIMPID, C.MHARTID, C.MCONFIGPTR):
        assert read(hart, num) == 0 or num == C.MHARTID
        assert refused(hart, num, 1)


def test_trigger_csrs_say_there_are_no_triggers(hart):
    """tselect and tdata1..3 exist (the ISA tests' breakpoint test writes them) but tdata1
    keeps type 0, "no trigger here", whatever is written; tinfo lists only that type."""
    for num in (0x7A0, 0x7A1, 0x7A2, 0x7A3):
        write(hart, num, (2 << 60) | 0x44)
        assert read(hart, num) == 0
    assert read(hart, 0x7A4) == 1


# -- existence and privilege -----------------------------------------------------------------
@pytest.mark.parametrize("num", [
    0x7A5,  # tcontrol: no debug triggers
    0x015,  # seed: no Zkr
    0x600,  # hstatus: no H extension
    0x3A1,  # pmpcfg1 does not exist on RV64
    0x30C,  # mstateen0
    0x10C,  # sstateen0
    0x15D,  # stimecmph is RV32 only
    0x747,  # mseccfg: no Smepmp
    0xC80,  # cycleh is RV32 only
    0x7B0,  # dcsr: debug mode only
])
def test_unimplemented_csrs_are_illegal(hart, num):
    assert refused(hart, num)


def test_m_mode_csrs_are_refused_below_m(hart):
    hart.priv = PRIV_S
    assert refused(hart, C.MSTATUS)
    assert refused(hart, C.MSCRATCH)
    assert not refused(hart, C.SSCRATCH)


def test_s_mode_csrs_are_refused_in_u_and_allowed_in_m(hart):
    hart.priv = PRIV_U
    assert refused(hart, C.SSTATUS)
    hart.priv = PRIV_M
    assert not refused(hart, C.SSTATUS)


def test_writes_to_read_only_csrs_are_illegal_but_reads_are_not(hart):
    assert refused(hart, C.CYCLE, 5)
    assert refused(hart, C.MHARTID, 0)
    # csrrs/csrrc with rs1 = x0 do not write, so they may read a read-only CSR.
    assert hart.csrs.op(C.MHARTID, SET, 0, True, False) == hart.hartid
    assert hart.csrs.op(C.MHARTID, CLEAR, 0, True, False) == hart.hartid


def test_csrrs_and_csrrc_set_and_clear_bits_and_return_the_old_value(hart):
    write(hart, C.MSCRATCH, 0b1010)
    assert hart.csrs.op(C.MSCRATCH, SET, 0b0101, True, True) == 0b1010
    assert hart.csrs.op(C.MSCRATCH, CLEAR, 0b0011, True, True) == 0b1111
    assert read(hart, C.MSCRATCH) == 0b1100


def test_csrrw_without_read_returns_zero(hart):
    write(hart, C.MSCRATCH, 7)
    assert hart.csrs.op(C.MSCRATCH, WRITE, 9, False, True) == 0
    assert read(hart, C.MSCRATCH) == 9


# -- mstatus / sstatus -----------------------------------------------------------------------
def test_mpp_keeps_its_value_when_written_with_the_reserved_encoding(hart):
    write(hart, C.MSTATUS, 1 << 11)  # MPP = S
    write(hart, C.MSTATUS, 2 << 11)  # H-mode does not exist
    assert (read(hart, C.MSTATUS) >> 11) & 3 == 1


def test_xs_and_reserved_mstatus_bits_read_zero(hart):
    write(hart, C.MSTATUS, (3 << 15) | (1 << 6) | (3 << 9) | (1 << 36) | (1 << 37))
    assert read(hart, C.MSTATUS) & ((3 << 15) | (1 << 6) | (3 << 9) | (3 << 36)) == 0


def test_sd_summarizes_a_dirty_fs(hart):
    write(hart, C.MSTATUS, 1 << 13)
    assert not read(hart, C.MSTATUS) >> 63
    write(hart, C.MSTATUS, 3 << 13)
    assert read(hart, C.MSTATUS) >> 63
    assert read(hart, C.SSTATUS) >> 63
    write(hart, C.MSTATUS, 0)
    assert not read(hart, C.MSTATUS) >> 63


def test_sstatus_is_a_view_that_cannot_touch_m_fields(hart):
    m_fields = C.MSTATUS_MIE | C.MSTATUS_MPIE | C.MSTATUS_MPP | C.MSTATUS_MPRV | C.MSTATUS_TVM
    write(hart, C.MSTATUS, m_fields | C.MSTATUS_SIE)
    assert read(hart, C.SSTATUS) & m_fields == 0
    assert read(hart, C.SSTATUS) & C.MSTATUS_SIE
    write(hart, C.SSTATUS, (1 << 64) - 1)
    status = read(hart, C.MSTATUS)
    assert status & m_fields == m_fields
    assert status & C.SSTATUS_WMASK == C.SSTATUS_WMASK
    assert read(hart, C.SSTATUS) >> 32 & 3 == 2  # UXL visible in sstatus


def test_mstatus_writes_flush_the_tlb_only_when_they_may_take_access_away(hart):
    flushes = count_flushes(hart)
    write(hart, C.MSTATUS, C.MSTATUS_MIE | C.MSTATUS_SIE)
    hart.csrs.op(C.MSTATUS, SET, C.MSTATUS_SUM | C.MSTATUS_MXR, False, True)  # grant more
    assert not flushes
    for kind, bit in ((CLEAR, C.MSTATUS_MXR), (SET, C.MSTATUS_MPRV), (CLEAR, C.MSTATUS_MPRV)):
        hart.csrs.op(C.MSTATUS, kind, bit, False, True)
        assert flushes
        flushes.clear()
    hart.csrs.op(C.MSTATUS, SET, C.MSTATUS_MPRV, False, True)
    flushes.clear()
    hart.csrs.op(C.MSTATUS, SET, 1 << 11, False, True)  # MPP changes while MPRV = 1
    assert flushes


# -- floating-point CSRs ---------------------------------------------------------------------
def test_fp_csrs_are_illegal_while_fs_is_off(hart):
    write(hart, C.MSTATUS, 0)
    for num in (C.FFLAGS, C.FRM, C.FCSR):
        assert refused(hart, num)


def test_fflags_and_frm_are_views_of_fcsr_and_writes_dirty_fs(hart):
    write(hart, C.MSTATUS, 1 << 13)  # FS = Initial
    write(hart, C.FCSR, 0xFFF)
    assert read(hart, C.FCSR) == 0xFF
    assert read(hart, C.FFLAGS) == 0x1F and read(hart, C.FRM) == 7
    write(hart, C.FRM, 0b010)
    assert read(hart, C.FCSR) == 0b010_11111
    write(hart, C.FFLAGS, 0b00001)
    assert read(hart, C.FCSR) == 0b010_00001
    status = read(hart, C.MSTATUS)
    assert (status >> 13) & 3 == 3 and status >> 63


# -- counters --------------------------------------------------------------------------------
def test_time_reads_the_platform_clock(hart):
    assert read(hart, C.TIME) == CLOCK


def test_counters_need_mcounteren_in_s_mode(hart):
    hart.priv = PRIV_S
    assert refused(hart, C.CYCLE) and refused(hart, C.TIME) and refused(hart, C.INSTRET)
    hart.priv = PRIV_M
    write(hart, C.MCOUNTEREN, 0b010)
    hart.priv = PRIV_S
    assert not refused(hart, C.TIME)
    assert refused(hart, C.CYCLE)


def test_counters_need_both_enables_in_u_mode(hart):
    write(hart, C.MCOUNTEREN, 0b111)
    hart.priv = PRIV_U
    assert refused(hart, C.TIME)
    hart.priv = PRIV_M
    write(hart, C.SCOUNTEREN, 0b010)
    hart.priv = PRIV_U
    assert not refused(hart, C.TIME)
    assert refused(hart, C.INSTRET)
    hart.priv = PRIV_M
    write(hart, C.MCOUNTEREN, 0)
    hart.priv = PRIV_U
    assert refused(hart, C.TIME)


def test_hpm_counters_read_zero_and_ignore_writes(hart):
    write(hart, C.MHPMCOUNTER3, 1)
    write(hart, C.MHPMEVENT3 + 5, 1)
    assert read(hart, C.MHPMCOUNTER3) == 0 and read(hart, C.MHPMEVENT3 + 5) == 0
    assert read(hart, C.HPMCOUNTER3 + 28) == 0  # hpmcounter31
    hart.priv = PRIV_S
    assert refused(hart, C.HPMCOUNTER3)


def test_minstret_counts_from_the_written_value(hart):
    hart.instret = 1000
    write(hart, C.MINSTRET, 50)
    hart.instret += 1  # the csrw itself retires, but its write replaces its increment
    assert read(hart, C.MINSTRET) == 50
    hart.instret += 10
    assert read(hart, C.MINSTRET) == 60
    assert read(hart, C.INSTRET) == 60


def test_mcountinhibit_freezes_mcycle_and_minstret(hart):
    write(hart, C.MCYCLE, 7)
    hart.instret += 1
    write(hart, C.MCOUNTINHIBIT, 0b101)
    hart.instret += 100
    assert read(hart, C.MCYCLE) == 7 and read(hart, C.CYCLE) == 7
    frozen = read(hart, C.MINSTRET)
    hart.instret += 5
    assert read(hart, C.MINSTRET) == frozen
    write(hart, C.MCOUNTINHIBIT, 0)
    hart.instret += 1  # the enabling write is not counted
    hart.instret += 3
    assert read(hart, C.MCYCLE) == 10
    assert read(hart, C.MCOUNTINHIBIT) == 0
    write(hart, C.MCOUNTINHIBIT, (1 << 64) - 1)
    assert read(hart, C.MCOUNTINHIBIT) == 0xFFFF_FFFD  # TM does not exist


# -- delegation and interrupt registers ------------------------------------------------------
def test_ecall_from_m_cannot_be_delegated(hart):
    write(hart, C.MEDELEG, (1 << 64) - 1)
    medeleg = read(hart, C.MEDELEG)
    assert not medeleg >> 11 & 1
    assert medeleg & 0b1011_0011_1111_1111 == 0b1011_0011_1111_1111


def test_only_s_level_interrupts_can_be_delegated(hart):
    write(hart, C.MIDELEG, (1 << 64) - 1)
    assert read(hart, C.MIDELEG) == C.MIP_SSIP | C.MIP_STIP | C.MIP_SEIP


def test_mie_holds_the_six_interrupt_enables(hart):
    write(hart, C.MIE, (1 << 64) - 1)
    assert read(hart, C.MIE) == 0xAAA


def test_m_level_pending_bits_are_read_only_to_software(hart):
    hart.set_interrupt(7, True)  # MTIP from the CLINT
    write(hart, C.MIP, 0)
    assert read(hart, C.MIP) == 1 << 7
    write(hart, C.MIP, (1 << 64) - 1)
    assert read(hart, C.MIP) == (1 << 7) | C.MIP_SSIP | C.MIP_STIP | C.MIP_SEIP


def test_sie_and_sip_show_only_delegated_interrupts(hart):
    write(hart, C.MIE, 0xAAA)
    write(hart, C.MIP, C.MIP_SSIP | C.MIP_STIP)
    assert read(hart, C.SIE) == 0 and read(hart, C.SIP) == 0
    write(hart, C.MIDELEG, C.MIP_SSIP | C.MIP_STIP)
    assert read(hart, C.SIE) == C.MIP_SSIP | C.MIP_STIP
    assert read(hart, C.SIP) == C.MIP_SSIP | C.MIP_STIP


def test_sip_lets_s_mode_clear_only_ssip(hart):
    write(hart, C.MIDELEG, C.S_INTERRUPTS)
    write(hart, C.MIP, C.MIP_SSIP | C.MIP_STIP | C.MIP_SEIP)
    hart.priv = PRIV_S
    write(hart, C.SIP, 0)
    assert read(hart, C.SIP) == C.MIP_STIP | C.MIP_SEIP


def test_sie_writes_reach_mie_only_for_delegated_bits(hart):
    write(hart, C.MIDELEG, C.MIP_STIP)
    write(hart, C.SIE, 0xAAA)
    assert read(hart, C.MIE) == C.MIP_STIP
    write(hart, C.MIE, 0xAAA)
    write(hart, C.SIE, 0)
    assert read(hart, C.MIE) == 0xAAA & ~C.MIP_STIP


# -- trap vector and return address ----------------------------------------------------------
@pytest.mark.parametrize("num", [C.MTVEC, C.STVEC])
def test_tvec_accepts_direct_and_vectored_modes_only(hart, num):
    write(hart, num, RAM_BASE | 1)
    assert read(hart, num) == RAM_BASE | 1
    write(hart, num, 0x9000_0002)
    assert read(hart, num) == RAM_BASE | 1
    write(hart, num, 0x9000_0003)
    assert read(hart, num) == RAM_BASE | 1


@pytest.mark.parametrize("num", [C.MEPC, C.SEPC])
def test_epc_bit_zero_is_always_clear(hart, num):
    write(hart, num, 0x8000_0003)
    assert read(hart, num) == 0x8000_0002


def test_envcfg_implements_fiom_the_cache_block_enables_pbmte_and_stce(hart):
    write(hart, C.MENVCFG, (1 << 64) - 1)
    assert read(hart, C.MENVCFG) == (1 << 63) | (1 << 62) | 0xF1  # STCE PBMTE CBZE CBCFE CBIE FIOM
    write(hart, C.SENVCFG, (1 << 64) - 1)
    assert read(hart, C.SENVCFG) == 0xF1  # no PBMTE or STCE in senvcfg
    hart.priv = PRIV_S
    assert refused(hart, C.MENVCFG)
    assert read(hart, C.SENVCFG) == 0xF1


# -- satp ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [C.SATP_BARE, C.SATP_SV39, C.SATP_SV48])
def test_satp_accepts_bare_sv39_and_sv48(hart, mode):
    value = (mode << 60) | (0xBEEF << 44) | 0x80123 if mode else 0
    hart.mmu.tlb_r[5] = 0  # a translation of the old address space
    hart.mmu.local_pages.add(5)
    write(hart, C.SATP, value)
    assert read(hart, C.SATP) == value
    assert 5 not in hart.mmu.tlb_r


@pytest.mark.parametrize("mode", [1, 7, 10, 11, 15])
def test_satp_ignores_writes_with_unsupported_modes(hart, mode):
    write(hart, C.SATP, (8 << 60) | 0x80000)
    write(hart, C.SATP, (mode << 60) | 0x80001)
    assert read(hart, C.SATP) == (8 << 60) | 0x80000


def test_tvm_traps_satp_in_s_mode_only(hart):
    write(hart, C.MSTATUS, C.MSTATUS_TVM)
    assert not refused(hart, C.SATP)
    hart.priv = PRIV_S
    assert refused(hart, C.SATP)
    hart.priv = PRIV_M
    write(hart, C.MSTATUS, 0)
    hart.priv = PRIV_S
    assert not refused(hart, C.SATP, 0)


# -- through the instruction path ------------------------------------------------------------
def test_csr_instructions_read_and_write_through_the_hart(hart):
    hart.x[5] = 0x1234
    load(hart, RAM_BASE, csrrw(6, C.MSCRATCH, 5), csrr(7, C.MSCRATCH), csrr(8, C.MHARTID), WFI)
    hart.pc = RAM_BASE
    hart.run(10)
    assert hart.waiting
    assert hart.x[6] == 0 and hart.x[7] == 0x1234 and hart.x[8] == hart.hartid
    assert hart.x[0] == 0


def test_illegal_csr_access_traps_with_the_instruction_bits(hart):
    write(hart, C.MTVEC, RAM_BASE + 0x100)
    word = csrrw(1, C.MHARTID, 2)  # write to a read-only CSR
    load(hart, RAM_BASE, word)
    load(hart, RAM_BASE + 0x100, WFI)  # the handler parks the hart
    hart.pc = RAM_BASE
    hart.run(10)
    assert hart.waiting and hart.pc == RAM_BASE + 0x104
    assert read(hart, C.MCAUSE) == ILLEGAL_INSN
    assert read(hart, C.MTVAL) == word
    assert read(hart, C.MEPC) == RAM_BASE
