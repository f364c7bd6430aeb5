"""Sv39/Sv48 page walks, permission checks and A/D updates (privileged spec 1.12, ch. 4)."""

from __future__ import annotations

import struct

import pytest
from rvasm import EBREAK, MRET, RAM_BASE, WFI, ld, load, make_hart, sd

from popek.cpu import csr as C
from popek.cpu import trap
from popek.cpu.causes import (
    ACCESS_EXEC,
    ACCESS_READ,
    ACCESS_WRITE,
    ECALL_U,
    INSN_ACCESS,
    INSN_PAGE_FAULT,
    LOAD_ACCESS,
    LOAD_PAGE_FAULT,
    STORE_ACCESS,
    STORE_PAGE_FAULT,
    Trap,
)
from popek.cpu.pagewalk import (
    PTE_A,
    PTE_D,
    PTE_G,
    PTE_N,
    PTE_PBMT_SHIFT,
    PTE_R,
    PTE_U,
    PTE_V,
    PTE_W,
    PTE_X,
    translate,
)
from popek.cpu.pmp import A_NAPOT, ADDR_MASK, PMP_A_SHIFT, PMP_R, PMP_W, PMP_X, PMPADDR0, PMPCFG0
from popek.cpu.state import CTL_WFI, PRIV_M, PRIV_S, PRIV_U

RWX = PTE_R | PTE_W | PTE_X
TABLES = RAM_BASE + 0x20_0000
DATA = RAM_BASE + 0x10_0000
PAGE_FAULT = {ACCESS_READ: LOAD_PAGE_FAULT, ACCESS_WRITE: STORE_PAGE_FAULT,
              ACCESS_EXEC: INSN_PAGE_FAULT}
ACCESS_FAULT = {ACCESS_READ: LOAD_ACCESS, ACCESS_WRITE: STORE_ACCESS, ACCESS_EXEC: INSN_ACCESS}


class PageTables:
    """Builds page tables in guest RAM the way a kernel would."""

    def __init__(self, hart, mode: int) -> None:
        self.hart = hart
        self.levels = 3 if mode == C.SATP_SV39 else 4
        self.root = TABLES
        self.next_free = TABLES + 0x1000
        hart.csr[C.SATP] = (mode << 60) | (self.root >> 12)

    def pte_addr(self, va: int, level: int) -> int:
        """Address of the PTE for ``va`` at ``level``, allocating tables above it."""
        table = self.root
        for lvl in range(self.levels - 1, level, -1):
            addr = table + ((va >> (12 + 9 * lvl)) & 0x1FF) * 8
            pte = self.hart.mem.load(addr, 8)
            if not pte & PTE_V:
                pte = ((self.next_free >> 12) << 10) | PTE_V
                self.next_free += 0x1000
                self.hart.mem.store(addr, 8, pte)
            table = (pte >> 10) << 12
        return table + ((va >> (12 + 9 * level)) & 0x1FF) * 8

    def map(self, va: int, pa: int, flags: int, level: int = 0) -> int:
        """Install a leaf (or any raw PTE bits in ``flags``); returns the PTE's address."""
        addr = self.pte_addr(va, level)
        self.hart.mem.store(addr, 8, ((pa >> 12) << 10) | flags)
        return addr

    def pte(self, addr: int) -> int:
        return self.hart.mem.load(addr, 8)


@pytest.fixture
def hart():
    h = make_hart()
    h.priv = PRIV_S
    return h


@pytest.fixture
def sv39(hart):
    return PageTables(hart, C.SATP_SV39)


@pytest.fixture
def sv48(hart):
    return PageTables(hart, C.SATP_SV48)


def fault(hart, va: int, access: int) -> int | None:
    """The cause of the fault translating ``va``, or None if it translates."""
    try:
        translate(hart, va, access)
    except Trap as t:
        assert t.tval == va
        return t.cause
    return None


def page_fault(hart, va: int, access: int) -> bool:
    return fault(hart, va, access) == PAGE_FAULT[access]


# -- translation -----------------------------------------------------------------------------
def test_sv39_4k_page_translates_with_offset(hart, sv39):
    sv39.map(0x4000_1000, DATA, PTE_V | RWX)
    assert translate(hart, 0x4000_1abc, ACCESS_READ) == DATA + 0xABC


def test_sv39_megapage_translates_the_low_21_bits(hart, sv39):
    sv39.map(0x4020_0000, RAM_BASE + 0x20_0000, PTE_V | RWX, level=1)
    assert translate(hart, 0x4031_2345, ACCESS_WRITE) == RAM_BASE + 0x31_2345


def test_sv39_gigapage_translates_the_low_30_bits(hart, sv39):
    sv39.map(0x1_4000_0000, RAM_BASE, PTE_V | PTE_R | PTE_X, level=2)
    assert translate(hart, 0x1_4123_4567, ACCESS_EXEC) == RAM_BASE + 0x123_4567


def test_sv48_4k_page_uses_four_levels(hart, sv48):
    va = 0x7F12_3456_7000
    sv48.map(va, DATA, PTE_V | PTE_R)
    assert translate(hart, va + 8, ACCESS_READ) == DATA + 8
    assert sv48.next_free == TABLES + 4 * 0x1000  # three tables below the root


def test_sv48_512g_page(hart, sv48):
    sv48.map(0x80_0000_0000, 0, PTE_V | PTE_R, level=3)
    assert translate(hart, 0x80_8000_0010, ACCESS_READ) == 0x8000_0010


@pytest.mark.parametrize("level, pa", [(1, RAM_BASE + 0x1000), (2, RAM_BASE + 0x20_0000)])
def test_misaligned_superpage_is_a_page_fault(hart, sv39, level, pa):
    sv39.map(0, pa, PTE_V | RWX, level=level)
    for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
        assert page_fault(hart, 0x10, access)


def test_m_mode_and_bare_satp_are_identity(hart, sv39):
    hart.priv = PRIV_M
    assert translate(hart, 0x1234_5678, ACCESS_READ) == 0x1234_5678
    hart.priv = PRIV_S
    hart.csr[C.SATP] = 0
    assert translate(hart, 0x1234_5678, ACCESS_EXEC) == 0x1234_5678


def test_mprv_translates_m_mode_data_accesses_but_not_fetches(hart, sv39):
    sv39.map(0x1000, DATA, PTE_V | RWX)
    hart.priv = PRIV_M
    hart.csr[C.MSTATUS] |= C.MSTATUS_MPRV | (PRIV_S << 11)
    assert translate(hart, 0x1008, ACCESS_READ) == DATA + 8
    assert translate(hart, 0x1008, ACCESS_WRITE) == DATA + 8
    assert translate(hart, 0x1008, ACCESS_EXEC) == 0x1008
    hart.csr[C.MSTATUS] |= PRIV_M << 11  # MPP = M: no translation
    assert translate(hart, 0x1008, ACCESS_READ) == 0x1008


# -- canonical addresses ---------------------------------------------------------------------
def test_sv39_requires_bits_63_to_39_to_copy_bit_38(hart, sv39):
    high = 0xFFFF_FFC0_0000_0000  # the lowest canonical address of the upper half
    sv39.map(high, DATA, PTE_V | RWX)
    assert translate(hart, high + 4, ACCESS_READ) == DATA + 4
    for va in (1 << 39, 1 << 63, 0x7FFF_FFC0_0000_0000, 0x0000_0040_0000_0000):
        for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
            assert page_fault(hart, va, access)


def test_sv48_requires_bits_63_to_48_to_copy_bit_47(hart, sv48):
    high = 0xFFFF_8000_0000_0000
    sv48.map(high, DATA, PTE_V | RWX)
    assert translate(hart, high, ACCESS_READ) == DATA
    assert page_fault(hart, 1 << 48, ACCESS_READ)
    assert page_fault(hart, 0x7FFF_8000_0000_0000, ACCESS_WRITE)


# -- PTE encodings ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [
    RWX,  # V clear
    PTE_V | PTE_W,  # W without R is reserved
    PTE_V | PTE_W | PTE_X,
    PTE_V | RWX | (1 << 63),  # N with PPN[3:0] = 0000: no NAPOT size has that encoding
    PTE_V | RWX | (1 << 61),  # PBMT while menvcfg.PBMTE is clear
    PTE_V | RWX | (1 << 54),  # reserved
    PTE_V | RWX | (1 << 60),  # reserved
])
def test_invalid_or_reserved_leaf_is_a_page_fault(hart, sv39, flags):
    sv39.map(0x3000, DATA, flags)
    for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
        assert page_fault(hart, 0x3000, access)


def test_reserved_bits_in_a_pointer_are_a_page_fault(hart, sv39):
    sv39.map(0x3000, DATA, PTE_V | RWX)
    top = sv39.root  # level-2 entry for va 0x3000 is the first one
    hart.mem.store(top, 8, hart.mem.load(top, 8) | (1 << 62))
    assert page_fault(hart, 0x3000, ACCESS_READ)


@pytest.mark.parametrize("bit", [PTE_D, PTE_A, PTE_U])
def test_d_a_or_u_in_a_pointer_is_a_page_fault(hart, sv39, bit):
    sv39.map(0x3000, DATA, PTE_V | RWX)
    top = sv39.root
    hart.mem.store(top, 8, hart.mem.load(top, 8) | bit)
    assert page_fault(hart, 0x3000, ACCESS_READ)


@pytest.mark.parametrize("bit", [PTE_N, 1 << PTE_PBMT_SHIFT])
def test_napot_or_pbmt_in_a_pointer_is_a_page_fault(hart, sv39, bit):
    hart.csr[C.MENVCFG] = C.ENVCFG_PBMTE
    sv39.map(0x3000, DATA, PTE_V | RWX)
    top = sv39.root
    hart.mem.store(top, 8, hart.mem.load(top, 8) | bit)
    assert page_fault(hart, 0x3000, ACCESS_READ)


# -- Svnapot and Svpbmt ----------------------------------------------------------------------
NAPOT_VA = 0x4001_0000  # a 64 KiB-aligned region
NAPOT_PA = RAM_BASE + 0x13_0000


def map_napot(sv39, va: int = NAPOT_VA, pa: int = NAPOT_PA, flags: int = PTE_V | RWX) -> list:
    """The sixteen PTEs of a 64 KiB NAPOT page, as a kernel writes them: each holds the
    region's PPN with PPN[3:0] = 1000 (pa must be 64 KiB aligned)."""
    ppn = (pa >> 12) & ~0xF | 0b1000
    return [sv39.map(va + i * 0x1000, ppn << 12, flags | PTE_N) for i in range(16)]


def test_napot_pte_maps_a_64k_page_with_the_low_ppn_bits_from_the_address(hart, sv39):
    map_napot(sv39)
    for offset in (0, 0x8abc, 0xFFF8):
        for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
            assert translate(hart, NAPOT_VA + offset, access) == NAPOT_PA + offset


def test_napot_pte_sets_a_and_d_in_the_pte_it_used(hart, sv39):
    ptes = map_napot(sv39)
    translate(hart, NAPOT_VA + 0x5008, ACCESS_WRITE)
    assert sv39.pte(ptes[5]) & (PTE_A | PTE_D) == PTE_A | PTE_D
    assert sv39.pte(ptes[4]) & PTE_A == 0


@pytest.mark.parametrize("low_ppn", [0b0000, 0b0100, 0b1100, 0b0001, 0b1001])
def test_napot_pte_with_a_reserved_size_encoding_is_a_page_fault(hart, sv39, low_ppn):
    ppn = (NAPOT_PA >> 12) | low_ppn
    sv39.map(NAPOT_VA, ppn << 12, PTE_V | RWX | PTE_N)
    assert page_fault(hart, NAPOT_VA, ACCESS_READ)


def test_napot_bit_in_a_superpage_leaf_is_a_page_fault(hart, sv39):
    sv39.map(0x20_0000, RAM_BASE + 0x20_0000 | 0b1000 << 12, PTE_V | RWX | PTE_N, level=1)
    assert page_fault(hart, 0x20_0000, ACCESS_READ)


def test_sfence_vma_of_any_page_in_a_napot_page_drops_all_of_it(hart, sv39):
    ld64 = hart.mmu.accessors["ld64"]
    hart.mem.store(RAM_BASE + 0x3000, 8, 7)
    map_napot(sv39)
    ld64(NAPOT_VA)
    ld64(NAPOT_VA + 0x3000)
    map_napot(sv39, pa=RAM_BASE)
    trap.sfence_vma(hart, NAPOT_VA + 0xF000, 0)  # the region's one PTE may have changed
    assert ld64(NAPOT_VA + 0x3000) == 7


@pytest.mark.parametrize("pbmt", [1, 2])  # NC, IO: no caches here, so only legality matters
def test_pbmt_is_accepted_while_menvcfg_pbmte_is_set(hart, sv39, pbmt):
    sv39.map(0x3000, DATA, PTE_V | RWX | pbmt << PTE_PBMT_SHIFT)
    assert page_fault(hart, 0x3000, ACCESS_READ)
    hart.mmu.flush()
    hart.csr[C.MENVCFG] = C.ENVCFG_PBMTE
    ld64 = hart.mmu.accessors["ld64"]
    hart.mem.store(DATA + 8, 8, 42)
    assert ld64(0x3008) == 42  # and the TLB holds the page now
    hart.priv = PRIV_M
    hart.csrs.op(C.MENVCFG, 0, 0, False, True)  # clearing PBMTE drops that translation
    hart.priv = PRIV_S
    with pytest.raises(Trap) as caught:
        ld64(0x3008)
    assert caught.value.cause == LOAD_PAGE_FAULT


def test_pbmt_3_is_reserved(hart, sv39):
    hart.csr[C.MENVCFG] = C.ENVCFG_PBMTE
    sv39.map(0x3000, DATA, PTE_V | RWX | 3 << PTE_PBMT_SHIFT)
    assert page_fault(hart, 0x3000, ACCESS_WRITE)


def test_pbmt_on_a_napot_page_is_accepted(hart, sv39):
    hart.csr[C.MENVCFG] = C.ENVCFG_PBMTE
    map_napot(sv39, flags=PTE_V | PTE_R | 1 << PTE_PBMT_SHIFT)
    assert translate(hart, NAPOT_VA + 0x1234, ACCESS_READ) == NAPOT_PA + 0x1234


def test_pointer_at_the_last_level_is_a_page_fault(hart, sv39):
    sv39.map(0x5000, DATA, PTE_V)  # non-leaf where only a leaf may be
    assert page_fault(hart, 0x5000, ACCESS_READ)


def test_unmapped_address_faults_with_the_access_kinds_cause(hart, sv39):
    sv39.map(0x5000, DATA, PTE_V | RWX)
    for access, cause in PAGE_FAULT.items():
        assert fault(hart, 0x6000, access) == cause
        assert fault(hart, 0x4000_0000, access) == cause  # missing upper-level table


# -- permissions -----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, allowed", [
    (PTE_R, {ACCESS_READ}),
    (PTE_R | PTE_W, {ACCESS_READ, ACCESS_WRITE}),
    (PTE_X, {ACCESS_EXEC}),
    (PTE_R | PTE_X, {ACCESS_READ, ACCESS_EXEC}),
    (RWX, {ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC}),
])
def test_rwx_bits_select_the_permitted_accesses(hart, sv39, flags, allowed):
    sv39.map(0x7000, DATA, PTE_V | flags)
    for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
        assert page_fault(hart, 0x7000, access) == (access not in allowed)


def test_mxr_makes_executable_pages_readable(hart, sv39):
    sv39.map(0x7000, DATA, PTE_V | PTE_X)
    assert page_fault(hart, 0x7000, ACCESS_READ)
    hart.csr[C.MSTATUS] |= C.MSTATUS_MXR
    assert translate(hart, 0x7000, ACCESS_READ) == DATA
    assert page_fault(hart, 0x7000, ACCESS_WRITE)


def test_s_mode_reaches_user_pages_only_with_sum_and_never_executes_them(hart, sv39):
    sv39.map(0x8000, DATA, PTE_V | PTE_U | RWX)
    for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
        assert page_fault(hart, 0x8000, access)
    hart.csr[C.MSTATUS] |= C.MSTATUS_SUM
    assert translate(hart, 0x8000, ACCESS_READ) == DATA
    assert translate(hart, 0x8000, ACCESS_WRITE) == DATA
    assert page_fault(hart, 0x8000, ACCESS_EXEC)


def test_user_mode_reaches_only_user_pages(hart, sv39):
    sv39.map(0x8000, DATA, PTE_V | PTE_U | RWX)
    sv39.map(0x9000, DATA, PTE_V | PTE_G | RWX)
    hart.priv = PRIV_U
    for access in (ACCESS_READ, ACCESS_WRITE, ACCESS_EXEC):
        assert translate(hart, 0x8000, access) == DATA
        assert page_fault(hart, 0x9000, access)


def test_mprv_uses_the_user_rules_when_mpp_is_u(hart, sv39):
    sv39.map(0x9000, DATA, PTE_V | RWX)
    hart.priv = PRIV_M
    hart.csr[C.MSTATUS] |= C.MSTATUS_MPRV  # MPP = U
    assert page_fault(hart, 0x9000, ACCESS_READ)


# -- accessed and dirty bits -----------------------------------------------------------------
def test_reads_and_fetches_set_a_but_not_d(hart, sv39):
    data = sv39.map(0x1000, DATA, PTE_V | RWX)
    text = sv39.map(0x2000, DATA, PTE_V | PTE_X)
    translate(hart, 0x1000, ACCESS_READ)
    translate(hart, 0x2000, ACCESS_EXEC)
    assert sv39.pte(data) & (PTE_A | PTE_D) == PTE_A
    assert sv39.pte(text) & (PTE_A | PTE_D) == PTE_A


def test_writes_set_a_and_d(hart, sv39):
    addr = sv39.map(0x1000, DATA, PTE_V | RWX)
    translate(hart, 0x1000, ACCESS_WRITE)
    assert sv39.pte(addr) == ((DATA >> 12) << 10) | PTE_V | RWX | PTE_A | PTE_D


def test_superpage_a_and_d_are_set_in_the_leaf(hart, sv39):
    addr = sv39.map(0x20_0000, RAM_BASE, PTE_V | RWX, level=1)
    translate(hart, 0x20_0000, ACCESS_WRITE)
    assert sv39.pte(addr) & (PTE_A | PTE_D) == PTE_A | PTE_D


def test_a_faulting_access_does_not_set_a(hart, sv39):
    addr = sv39.map(0x1000, DATA, PTE_V | PTE_R)
    assert page_fault(hart, 0x1000, ACCESS_WRITE)
    assert not sv39.pte(addr) & PTE_A


def test_a_store_marks_its_page_and_the_page_table_page_whose_d_bit_it_set(hart, sv39):
    pte = sv39.map(0x1000, DATA, PTE_V | RWX)
    log = hart.mem.dirty_log()
    hart.mmu.accessors["st64"](0x1008, 42)
    assert sv39.pte(pte) & PTE_D
    data_page, table_page = (DATA - RAM_BASE) >> 12, (pte - RAM_BASE) >> 12
    assert log.take() == sorted([(data_page, 1), (table_page, 1)])


# -- faults on the walk's own accesses -------------------------------------------------------
def test_page_table_outside_memory_is_an_access_fault(hart):
    hart.csr[C.SATP] = (C.SATP_SV39 << 60) | (0x1000_0000 >> 12)  # nothing there
    for access, cause in ACCESS_FAULT.items():
        assert fault(hart, 0x1000, access) == cause


def test_pmp_denied_page_table_is_an_access_fault(hart, sv39):
    sv39.map(0x1000, DATA, PTE_V | RWX)
    napot = A_NAPOT << PMP_A_SHIFT
    # Entry 0: the root table, no permissions; entry 1: everything else, RWX.
    hart.csr[PMPADDR0] = (sv39.root >> 2) | 0x1FF
    hart.csr[PMPADDR0 + 1] = ADDR_MASK
    hart.csr[PMPCFG0] = napot | ((napot | PMP_R | PMP_W | PMP_X) << 8)
    for access, cause in ACCESS_FAULT.items():
        assert fault(hart, 0x1000, access) == cause


# -- the software TLB ------------------------------------------------------------------------
def test_sfence_vma_of_one_page_drops_only_that_pages_translation(hart, sv39):
    ld64 = hart.mmu.accessors["ld64"]
    hart.mem.store(DATA, 8, 1)
    hart.mem.store(DATA + 0x1000, 8, 2)
    sv39.map(0x1000, DATA, PTE_V | PTE_R)
    sv39.map(0x2000, DATA + 0x1000, PTE_V | PTE_R)
    assert (ld64(0x1000), ld64(0x2000)) == (1, 2)
    sv39.map(0x1000, DATA + 0x1000, PTE_V | PTE_R)  # swap the two pages
    sv39.map(0x2000, DATA, PTE_V | PTE_R)
    trap.sfence_vma(hart, 0x1000, 0)
    assert ld64(0x1000) == 2
    assert ld64(0x2000) == 2  # still the old translation: 0x2000 was not fenced
    trap.sfence_vma(hart, 0x2008, 0)
    assert ld64(0x2000) == 1


def test_sfence_vma_of_any_page_in_a_superpage_drops_all_of_the_superpage(hart, sv39):
    ld64 = hart.mmu.accessors["ld64"]
    new = RAM_BASE
    hart.mem.store(new + 0x1000, 8, 7)
    sv39.map(0x20_0000, RAM_BASE + 0x20_0000, PTE_V | PTE_R, level=1)
    ld64(0x20_0000)
    ld64(0x20_1000)
    sv39.map(0x20_0000, new, PTE_V | PTE_R, level=1)
    trap.sfence_vma(hart, 0x20_0000, 0)
    assert ld64(0x20_1000) == 7


class RecordingMirror:
    """A TLB mirror that remembers what it holds: (access, vpn) -> whether it is local."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, int], bool] = {}

    def fill(self, access: int, vpn: int, host_page: int, local: bool = True) -> None:
        self.entries[(access, vpn)] = local

    def flush(self) -> None:
        self.entries.clear()

    def flush_local(self) -> None:
        self.entries = {k: local for k, local in self.entries.items() if not local}

    def flush_page(self, vpn: int) -> None:
        self.entries = {k: local for k, local in self.entries.items() if k[1] != vpn}

    def switch_priv(self, old: int, new: int) -> None:
        pass

    def drop_writable(self, page: int | None) -> None:
        pass


@pytest.fixture
def mirror(hart) -> RecordingMirror:
    hart.mmu.mirror = RecordingMirror()
    return hart.mmu.mirror


def test_satp_write_leaves_the_mirror_the_global_translations_only(hart, sv39, mirror):
    ld64 = hart.mmu.accessors["ld64"]
    hart.mem.store(DATA, 8, 1)
    hart.mem.store(DATA + 0x1000, 8, 2)
    sv39.map(0x1000, DATA, PTE_V | PTE_R | PTE_G)
    sv39.map(0x2000, DATA, PTE_V | PTE_R)
    assert (ld64(0x1000), ld64(0x2000)) == (1, 1)
    assert mirror.entries == {(ACCESS_READ, 1): False, (ACCESS_READ, 2): True}
    sv39.map(0x2000, DATA + 0x1000, PTE_V | PTE_R)
    hart.csrs.op(C.SATP, 0, hart.csr[C.SATP] | 5 << 44, False, True)  # ASID 5, same tables
    assert mirror.entries == {(ACCESS_READ, 1): False}  # global: the same in every one
    assert ld64(0x2000) == 2  # the old address space's translation went with it


def test_satp_write_of_another_mode_drops_global_translations_too(hart, sv39, mirror):
    sv39.map(0x1000, DATA, PTE_V | PTE_R | PTE_G)
    hart.mmu.accessors["ld64"](0x1000)
    hart.csrs.op(C.SATP, 0, 0, False, True)  # bare
    assert not mirror.entries and 0x1000 >> 12 not in hart.mmu.tlb_r


def test_sfence_vma_of_one_asid_keeps_global_translations(hart, sv39, mirror):
    ld64 = hart.mmu.accessors["ld64"]
    hart.mem.store(DATA + 0x1000, 8, 2)
    sv39.map(0x1000, DATA, PTE_V | PTE_R | PTE_G)
    sv39.map(0x2000, DATA, PTE_V | PTE_R)
    ld64(0x1000)
    ld64(0x2000)
    sv39.map(0x2000, DATA + 0x1000, PTE_V | PTE_R)
    trap.sfence_vma(hart, None, 0)  # rs2 names a register holding ASID 0
    assert mirror.entries == {(ACCESS_READ, 1): False}
    assert ld64(0x2000) == 2


def test_sfence_vma_of_all_keeps_only_global_translations_whose_ptes_are_unchanged(
        hart, sv39, mirror):
    ld64 = hart.mmu.accessors["ld64"]
    for i in range(4):
        hart.mem.store(DATA + 0x1000 * i, 8, i)
    big = 0x4000_0000 + DATA - RAM_BASE  # in a gigapage
    sv39.map(0x1000, DATA, PTE_V | PTE_R | PTE_G)  # stays
    sv39.map(0x2000, DATA + 0x1000, PTE_V | PTE_R | PTE_G)  # remapped below
    sv39.map(0x3000, DATA + 0x2000, PTE_V | PTE_R)  # not global
    sv39.map(0x4000_0000, RAM_BASE, PTE_V | PTE_R | PTE_G, level=2)  # stays
    assert [ld64(va) for va in (0x1000, 0x2000, 0x3000, big)] == [0, 1, 2, 0]
    trap.sfence_vma(hart, None, None)
    assert mirror.entries == {(ACCESS_READ, 1): False, (ACCESS_READ, 2): False,
                              (ACCESS_READ, big >> 12): False}
    sv39.map(0x2000, DATA + 0x3000, PTE_V | PTE_R | PTE_G)
    trap.sfence_vma(hart, None, None)
    assert mirror.entries == {}  # a global translation changed: the mirror starts over
    assert ld64(0x2000) == 3


def test_sfence_vma_of_all_drops_global_translations_whose_page_table_changed(
        hart, sv39, mirror):
    ld64 = hart.mmu.accessors["ld64"]
    sv39.map(0x1000, DATA, PTE_V | PTE_R | PTE_G)
    ld64(0x1000)
    pointer = sv39.pte_addr(0x1000, 1)  # the level-1 PTE pointing at the leaf's table
    hart.mem.store(pointer, 8, 0)  # the table is unmapped
    trap.sfence_vma(hart, None, None)
    assert mirror.entries == {}
    with pytest.raises(Trap) as info:
        ld64(0x1000)
    assert info.value.cause == LOAD_PAGE_FAULT


def test_the_mirror_drops_a_global_page_once_it_is_walked_along_two_page_tables(
        hart, sv39, mirror):
    ld64, st64 = hart.mmu.accessors["ld64"], hart.mmu.accessors["st64"]
    sv39.map(0x1000, DATA, PTE_V | PTE_R | PTE_W | PTE_G)
    ld64(0x1000)  # read through the old PTE
    sv39.map(0x1000, DATA + 0x1000, PTE_V | PTE_R | PTE_W | PTE_G)
    st64(0x1000, 5)  # a walk for the write reads the new one: the read entry goes
    assert mirror.entries == {(ACCESS_WRITE, 1): True}
    hart.csrs.op(C.SATP, 0, hart.csr[C.SATP] | 5 << 44, False, True)
    assert mirror.entries == {}
    assert ld64(0x1000) == 5


def test_clearing_sum_drops_a_global_user_page_the_mirror_kept(hart, sv39, mirror):
    sv39.map(0x8000, DATA, PTE_V | PTE_U | PTE_G | PTE_R)
    hart.csrs.op(C.SSTATUS, 1, C.MSTATUS_SUM, False, True)
    hart.mmu.accessors["ld64"](0x8000)
    hart.csrs.op(C.SATP, 0, hart.csr[C.SATP] | 5 << 44, False, True)
    assert mirror.entries == {(ACCESS_READ, 8): False}
    hart.csrs.op(C.SSTATUS, 2, C.MSTATUS_SUM, False, True)
    assert mirror.entries == {}


def test_clearing_sum_takes_user_pages_from_s_mode_but_keeps_its_own(hart, sv39):
    ld64 = hart.mmu.accessors["ld64"]
    sv39.map(0x8000, DATA, PTE_V | PTE_U | PTE_R | PTE_W)
    sv39.map(0x9000, DATA, PTE_V | PTE_R)
    hart.csrs.op(C.SSTATUS, 1, C.MSTATUS_SUM, False, True)
    ld64(0x8000)
    ld64(0x9000)
    hart.csrs.op(C.SSTATUS, 2, C.MSTATUS_SUM, False, True)
    with pytest.raises(Trap) as info:
        ld64(0x8000)
    assert info.value.cause == LOAD_PAGE_FAULT
    assert 0x9000 >> 12 in hart.mmu.tlb_r


def test_user_mode_never_uses_translations_cached_for_s_mode_and_gets_its_own_back(hart, sv39):
    ld64 = hart.mmu.accessors["ld64"]
    sv39.map(0x8000, DATA, PTE_V | PTE_U | PTE_R)
    sv39.map(0x9000, DATA, PTE_V | PTE_R)
    hart.csr[C.MEDELEG] = 1 << ECALL_U
    ld64(0x9000)
    hart.csr[C.SEPC] = 0x1000
    trap.sret(hart)  # SPP = 0: to U-mode
    assert hart.priv == PRIV_U
    with pytest.raises(Trap):
        ld64(0x9000)
    ld64(0x8000)
    trap.take_trap(hart, ECALL_U, 0, 0x1000)
    assert hart.priv == PRIV_S
    assert 0x9000 >> 12 in hart.mmu.tlb_r and 0x8000 >> 12 not in hart.mmu.tlb_r
    trap.sret(hart)
    assert 0x8000 >> 12 in hart.mmu.tlb_r and 0x9000 >> 12 not in hart.mmu.tlb_r


# -- through the hart ------------------------------------------------------------------------
def test_instruction_straddling_two_pages_follows_the_second_pages_mapping(hart, sv39):
    low, high_a, high_b = RAM_BASE + 0x30_0000, RAM_BASE + 0x30_1000, RAM_BASE + 0x30_2000
    sv39.map(0x1000, low, PTE_V | PTE_R | PTE_X)
    sv39.map(0x2000, high_a, PTE_V | PTE_R | PTE_X)
    hart.mem.write(low + 0xFFE, struct.pack("<H", 0x0513))  # addi a0, a0, imm: low half
    hart.mem.write(high_a, struct.pack("<HI", 0x0015, EBREAK))  # imm = 1
    hart.mem.write(high_b, struct.pack("<HI", 0x0025, EBREAK))  # imm = 2
    mtvec = RAM_BASE + 0x1000
    hart.csr[C.MTVEC] = mtvec
    load(hart, mtvec, WFI)
    load(hart, RAM_BASE, MRET)

    def run_in_s_mode_from(va: int) -> None:
        hart.priv = PRIV_M
        hart.csr[C.MSTATUS] = (hart.csr[C.MSTATUS] & ~C.MSTATUS_MPP) | PRIV_S << 11
        hart.csr[C.MEPC] = va
        hart.pc = RAM_BASE
        hart.ctl[CTL_WFI] = 0
        hart.run(20)

    run_in_s_mode_from(0x1FFE)
    assert hart.x[10] == 1
    sv39.map(0x2000, high_b, PTE_V | PTE_R | PTE_X)
    trap.sfence_vma(hart, 0x2000, 0)
    run_in_s_mode_from(0x1FFE)
    assert hart.x[10] == 3
    sv39.map(0x2000, 0, 0)
    trap.sfence_vma(hart, 0x2000, 0)
    run_in_s_mode_from(0x1FFE)
    assert hart.csr[C.MCAUSE] == INSN_PAGE_FAULT
    assert hart.csr[C.MTVAL] == 0x2000 and hart.csr[C.MEPC] == 0x1FFE


def test_s_mode_program_runs_from_virtual_memory_and_faults_to_m(hart, sv39):
    code_pa, data_pa = RAM_BASE + 0x30_0000, RAM_BASE + 0x30_1000
    text = sv39.map(0x1000, code_pa, PTE_V | PTE_R | PTE_X)
    data = sv39.map(0x2000, data_pa, PTE_V | PTE_R | PTE_W)
    load(hart, code_pa, ld(5, 6), sd(5, 6, 8), ld(7, 8))
    hart.mem.store(data_pa, 8, 0xFEED_F00D)
    hart.x[6], hart.x[8] = 0x2000, 0x5000
    mtvec = RAM_BASE + 0x1000
    hart.csr[C.MTVEC] = mtvec
    load(hart, mtvec, WFI)
    # Enter S-mode at virtual 0x1000 with an mret from M-mode.
    hart.priv = PRIV_M
    hart.csr[C.MSTATUS] |= PRIV_S << 11
    hart.csr[C.MEPC] = 0x1000
    load(hart, RAM_BASE, MRET)
    hart.pc = RAM_BASE
    hart.run(20)
    assert hart.x[5] == 0xFEED_F00D
    assert hart.mem.load(data_pa + 8, 8) == 0xFEED_F00D
    assert hart.csr[C.MCAUSE] == LOAD_PAGE_FAULT and hart.csr[C.MTVAL] == 0x5000
    assert hart.csr[C.MEPC] == 0x1008 and hart.pc == mtvec + 4
    assert sv39.pte(text) & (PTE_A | PTE_D) == PTE_A
    assert sv39.pte(data) & (PTE_A | PTE_D) == PTE_A | PTE_D
