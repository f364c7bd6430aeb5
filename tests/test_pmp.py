"""Physical memory protection (privileged spec 1.12, section 3.7)."""

from __future__ import annotations

import pytest
from rvasm import MRET, RAM_BASE, WFI, ld, load, make_hart

from popek.cpu import csr as C
from popek.cpu.causes import (
    ACCESS_EXEC,
    ACCESS_READ,
    ACCESS_WRITE,
    ILLEGAL_INSN,
    LOAD_ACCESS,
    Trap,
)
from popek.cpu.pmp import (
    A_NA4,
    A_NAPOT,
    A_TOR,
    ADDR_MASK,
    PMP_A_SHIFT,
    PMP_L,
    PMP_R,
    PMP_W,
    PMP_X,
    PMPADDR0,
    PMPCFG0,
    pmp_check,
    pmp_page_uniform,
)
from popek.cpu.state import PRIV_M, PRIV_S, PRIV_U

RWX = PMP_R | PMP_W | PMP_X
READ, WRITE, EXEC = ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC
REGION = RAM_BASE + 0x10_0000  # a 64 KiB region used by most tests
REGION_SIZE = 0x1_0000


@pytest.fixture
def hart():
    return make_hart()


def csrw(hart, num: int, value: int) -> None:
    hart.csrs.op(num, 0, value, False, True)


def csrr(hart, num: int) -> int:
    return hart.csrs.op(num, 1, 0, True, False)


def napot(base: int, size: int) -> int:
    return (base >> 2) | ((size >> 3) - 1)


def set_entry(hart, i: int, mode: int, perms: int, addr: int) -> None:
    """Program entry ``i`` (0..7) through the CSR interface."""
    csrw(hart, PMPADDR0 + i, addr)
    cfg = csrr(hart, PMPCFG0)
    cfg &= ~(0xFF << (8 * i))
    cfg |= ((mode << PMP_A_SHIFT) | perms) << (8 * i)
    csrw(hart, PMPCFG0, cfg)


def allowed(hart, addr: int, size: int, access: int, priv: int) -> bool:
    return pmp_check(hart, addr, size, access, priv)


# -- no rules --------------------------------------------------------------------------------
def test_all_entries_off_allow_every_mode(hart):
    # popek's choice (see popek.cpu.pmp): an unprogrammed PMP does not lock S/U out.
    for priv in (PRIV_M, PRIV_S, PRIV_U):
        assert allowed(hart, RAM_BASE, 8, WRITE, priv)
    csrw(hart, PMPCFG0, PMP_R)  # permissions on an OFF entry change nothing
    assert allowed(hart, RAM_BASE, 8, WRITE, PRIV_S)


# -- address matching ------------------------------------------------------------------------
def test_napot_region_grants_its_permissions_to_s_and_u(hart):
    set_entry(hart, 0, A_NAPOT, PMP_R, napot(REGION, REGION_SIZE))
    for priv in (PRIV_S, PRIV_U):
        assert allowed(hart, REGION, 8, READ, priv)
        assert allowed(hart, REGION + REGION_SIZE - 8, 8, READ, priv)
        assert not allowed(hart, REGION, 8, WRITE, priv)
        assert not allowed(hart, REGION, 4, EXEC, priv)


def test_unmatched_access_fails_for_s_and_u_but_not_m_once_a_rule_exists(hart):
    set_entry(hart, 0, A_NAPOT, RWX, napot(REGION, REGION_SIZE))
    for addr in (REGION - 8, REGION + REGION_SIZE):
        assert not allowed(hart, addr, 8, READ, PRIV_S)
        assert not allowed(hart, addr, 8, READ, PRIV_U)
        assert allowed(hart, addr, 8, WRITE, PRIV_M)


def test_unlocked_rules_do_not_restrict_m_mode(hart):
    set_entry(hart, 0, A_NAPOT, 0, napot(REGION, REGION_SIZE))
    assert allowed(hart, REGION, 8, WRITE, PRIV_M)
    assert not allowed(hart, REGION, 8, READ, PRIV_S)


def test_tor_matches_from_the_previous_address_up_to_its_own(hart):
    set_entry(hart, 0, 0, 0, REGION >> 2)  # OFF, but its address is entry 1's base
    set_entry(hart, 1, A_TOR, PMP_R | PMP_W, (REGION + 0x100) >> 2)
    assert allowed(hart, REGION, 4, WRITE, PRIV_S)
    assert allowed(hart, REGION + 0xFC, 4, WRITE, PRIV_S)
    assert not allowed(hart, REGION + 0x100, 4, READ, PRIV_S)
    assert not allowed(hart, REGION - 4, 4, READ, PRIV_S)


def test_tor_in_entry_zero_starts_at_address_zero(hart):
    set_entry(hart, 0, A_TOR, PMP_R, 0x1000 >> 2)
    assert allowed(hart, 0, 8, READ, PRIV_S)
    assert allowed(hart, 0xFF8, 8, READ, PRIV_S)
    assert not allowed(hart, 0x1000, 8, READ, PRIV_S)


def test_tor_with_base_not_below_top_matches_nothing(hart):
    set_entry(hart, 0, A_NAPOT, 0, napot(0, 8))  # a rule that keeps the PMP "on"
    csrw(hart, PMPADDR0 + 1, (REGION + 0x100) >> 2)
    set_entry(hart, 2, A_TOR, RWX, REGION >> 2)
    assert not allowed(hart, REGION + 0x80, 4, READ, PRIV_S)


def test_na4_covers_exactly_four_bytes(hart):
    set_entry(hart, 0, A_NA4, PMP_R, REGION >> 2)
    assert allowed(hart, REGION, 4, READ, PRIV_S)
    assert not allowed(hart, REGION + 4, 4, READ, PRIV_S)
    assert not allowed(hart, REGION, 8, READ, PRIV_S)  # reaches past the entry


def test_napot_all_ones_covers_the_whole_address_space(hart):
    set_entry(hart, 0, A_NAPOT, RWX, ADDR_MASK)
    assert allowed(hart, 0, 8, WRITE, PRIV_U)
    assert allowed(hart, (1 << 56) - 8, 8, EXEC, PRIV_U)


def test_lowest_numbered_matching_entry_wins(hart):
    set_entry(hart, 0, A_NAPOT, PMP_R, napot(REGION, 0x1000))
    set_entry(hart, 1, A_NAPOT, RWX, napot(REGION, REGION_SIZE))
    assert not allowed(hart, REGION, 8, WRITE, PRIV_S)
    assert allowed(hart, REGION + 0x1000, 8, WRITE, PRIV_S)


def test_access_that_straddles_an_entry_boundary_fails_even_for_m(hart):
    set_entry(hart, 0, A_NAPOT, RWX, napot(REGION, 0x1000))
    set_entry(hart, 1, A_NAPOT, RWX, ADDR_MASK)
    assert not allowed(hart, REGION + 0xFFC, 8, READ, PRIV_S)
    assert not allowed(hart, REGION + 0xFFC, 8, READ, PRIV_M)
    assert allowed(hart, REGION + 0xFF8, 8, READ, PRIV_S)


# -- locking ---------------------------------------------------------------------------------
def test_locked_entry_applies_to_m_mode(hart):
    set_entry(hart, 0, A_NAPOT, PMP_L | PMP_R, napot(REGION, REGION_SIZE))
    assert allowed(hart, REGION, 8, READ, PRIV_M)
    assert not allowed(hart, REGION, 8, WRITE, PRIV_M)
    assert not allowed(hart, REGION, 4, EXEC, PRIV_M)


def test_locked_entry_ignores_writes_to_its_cfg_and_address(hart):
    set_entry(hart, 0, A_NAPOT, PMP_L | PMP_R, napot(REGION, REGION_SIZE))
    csrw(hart, PMPCFG0, 0)
    csrw(hart, PMPADDR0, 0)
    assert csrr(hart, PMPCFG0) & 0xFF == PMP_L | (A_NAPOT << PMP_A_SHIFT) | PMP_R
    assert csrr(hart, PMPADDR0) == napot(REGION, REGION_SIZE)


def test_locked_tor_entry_also_locks_the_address_below_it(hart):
    csrw(hart, PMPADDR0, REGION >> 2)
    set_entry(hart, 1, A_TOR, PMP_L | PMP_R, (REGION + 0x100) >> 2)
    csrw(hart, PMPADDR0, 0)
    assert csrr(hart, PMPADDR0) == REGION >> 2


def test_locked_napot_entry_leaves_the_address_below_it_writable(hart):
    set_entry(hart, 1, A_NAPOT, PMP_L | PMP_R, napot(REGION, REGION_SIZE))
    csrw(hart, PMPADDR0, 0x1234)
    assert csrr(hart, PMPADDR0) == 0x1234


# -- WARL behaviour of the registers ---------------------------------------------------------
def test_write_only_encoding_is_ignored(hart):
    set_entry(hart, 0, A_NAPOT, PMP_R, napot(REGION, REGION_SIZE))
    csrw(hart, PMPCFG0, (A_NAPOT << PMP_A_SHIFT) | PMP_W)  # R=0 W=1 is reserved
    assert csrr(hart, PMPCFG0) & 0xFF == (A_NAPOT << PMP_A_SHIFT) | PMP_R


def test_cfg_reserved_bits_read_zero(hart):
    csrw(hart, PMPCFG0, 0x60)
    assert csrr(hart, PMPCFG0) == 0


def test_sixteen_entries_are_implemented(hart):
    tor_r = ((A_TOR << PMP_A_SHIFT) | PMP_R) * 0x0101_0101_0101_0101
    csrw(hart, PMPCFG0 + 2, tor_r)  # entries 8..15
    assert csrr(hart, PMPCFG0 + 2) == tor_r
    for num in range(PMPCFG0 + 4, PMPCFG0 + 16, 2):
        csrw(hart, num, (1 << 64) - 1)
        assert csrr(hart, num) == 0
    csrw(hart, PMPADDR0 + 15, (1 << 64) - 1)
    assert csrr(hart, PMPADDR0 + 15) == ADDR_MASK  # 54 bits: physical address bits 55:2
    csrw(hart, PMPADDR0 + 16, (1 << 64) - 1)
    assert csrr(hart, PMPADDR0 + 16) == 0
    assert csrr(hart, PMPADDR0 + 63) == 0


def test_pmp_csrs_are_m_mode_only(hart):
    hart.priv = PRIV_S
    with pytest.raises(Trap) as info:
        csrr(hart, PMPCFG0)
    assert info.value.cause == ILLEGAL_INSN


def test_pmp_writes_flush_the_tlb(hart):
    hart.mmu.tlb_r[1] = 0
    csrw(hart, PMPADDR0, 5)
    assert not hart.mmu.tlb_r
    hart.mmu.tlb_r[1] = 0
    csrw(hart, PMPCFG0, PMP_R)
    assert not hart.mmu.tlb_r


# -- page uniformity (what the TLB may cache) ------------------------------------------------
def test_page_inside_one_region_is_uniform(hart):
    set_entry(hart, 0, A_NAPOT, PMP_R, napot(REGION, REGION_SIZE))
    assert pmp_page_uniform(hart, REGION + 0x1000, READ, PRIV_S)
    assert not pmp_page_uniform(hart, REGION + 0x1000, WRITE, PRIV_S)  # uniformly denied


def test_page_split_by_a_small_region_is_not_uniform(hart):
    set_entry(hart, 0, A_NA4, 0, (REGION + 0x800) >> 2)
    set_entry(hart, 1, A_NAPOT, RWX, ADDR_MASK)
    assert not pmp_page_uniform(hart, REGION, READ, PRIV_S)
    assert pmp_page_uniform(hart, REGION + 0x1000, READ, PRIV_S)


def test_unmatched_page_is_uniform_for_m_only(hart):
    set_entry(hart, 0, A_NAPOT, RWX, napot(REGION, REGION_SIZE))
    assert pmp_page_uniform(hart, RAM_BASE, WRITE, PRIV_M)
    assert not pmp_page_uniform(hart, RAM_BASE, WRITE, PRIV_S)


# -- through the hart ------------------------------------------------------------------------
def test_s_mode_load_from_a_protected_region_is_an_access_fault(hart):
    set_entry(hart, 0, A_NAPOT, 0, napot(REGION, REGION_SIZE))  # no access
    set_entry(hart, 1, A_NAPOT, RWX, ADDR_MASK)
    mtvec = RAM_BASE + 0x1000
    hart.csr[C.MTVEC] = mtvec
    load(hart, mtvec, WFI)
    load(hart, RAM_BASE, MRET)
    load(hart, RAM_BASE + 0x2000, ld(5, 6))
    hart.x[6] = REGION + 0x10
    hart.csr[C.MSTATUS] |= PRIV_S << 11
    hart.csr[C.MEPC] = RAM_BASE + 0x2000
    hart.pc = RAM_BASE
    hart.run(10)
    assert hart.csr[C.MCAUSE] == LOAD_ACCESS and hart.csr[C.MTVAL] == REGION + 0x10
    assert hart.csr[C.MEPC] == RAM_BASE + 0x2000
