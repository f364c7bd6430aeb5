"""Sv39/Sv48 address translation: the page-table walk behind the software TLB.

Leaf PTEs may use Svnapot (N set and PPN[3:0] = 1000 at level 0: one PTE of sixteen
that together map a naturally aligned 64 KiB page) and Svpbmt (PBMT, bits 62:61, a
memory type that a hart without caches ignores; legal only while menvcfg.PBMTE is set,
and 3 is reserved). Every other use of bits 63:54 is reserved and faults.

The MMU calls :func:`translate` on a TLB miss, once per page and access kind, and
caches the answer; so a walk for a store sets the PTE's D bit and one for a load or
fetch sets A, exactly as hardware that updates A/D itself (as QEMU does) would for
the first access of each kind. The walk's own PTE reads and writes are S-mode
accesses for PMP and raise access faults of the original access kind.

A walk also gives, for a global translation (a G bit on its path), the PTEs it read:
global translations are the same in every address space, so the TLB keeps them when
the address space changes, and across a fence of every address space while those PTEs
hold what they held (:func:`unchanged`), as a walk then would give the same answer.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from popek.cpu.causes import (
    ACCESS_EXEC,
    ACCESS_FAULT_FOR_ACCESS,
    ACCESS_READ,
    ACCESS_WRITE,
    PAGE_FAULT_FOR_ACCESS,
    Trap,
)
from popek.cpu.csr import (
    ENVCFG_PBMTE,
    MENVCFG,
    MSTATUS,
    MSTATUS_MPP,
    MSTATUS_MPP_SHIFT,
    MSTATUS_MPRV,
    MSTATUS_MXR,
    MSTATUS_SUM,
    SATP,
    SATP_BARE,
    SATP_MODE_SHIFT,
    SATP_PPN_MASK,
    SATP_SV39,
)
from popek.cpu.physmem import BusError
from popek.cpu.pmp import PMPCFG0, pmp_check
from popek.cpu.state import CTL_PRIV, PRIV_M, PRIV_S, PRIV_U

if TYPE_CHECKING:
    from popek.cpu.hart import Hart

PTE_V, PTE_R, PTE_W, PTE_X, PTE_U, PTE_G, PTE_A, PTE_D = (1 << i for i in range(8))
PTE_PPN_SHIFT = 10
PTE_N = 1 << 63
PTE_PBMT_SHIFT = 61
PTE_PBMT = 3 << PTE_PBMT_SHIFT
PTE_PBMT_RESERVED = 3
PTE_RESERVED = ((1 << 7) - 1) << 54  # bits 60:54
PTE_HIGH = PTE_N | PTE_PBMT | PTE_RESERVED
NAPOT_64K_PPN = 0b1000  # PPN[3:0] of a 64 KiB NAPOT PTE
NAPOT_64K_SHIFT = 16
PAGE_SHIFT = 12
PAGE_MASK = (1 << PAGE_SHIFT) - 1
LEVEL_BITS = 9
_u64 = struct.Struct("<Q").unpack_from


def effective_priv(hart: Hart, access: int) -> int:
    """The privilege an access is translated and PMP-checked with (MPRV applies to data only)."""
    priv = hart.ctl[CTL_PRIV]
    if priv == PRIV_M and access != ACCESS_EXEC:
        status = hart.csr[MSTATUS]
        if status & MSTATUS_MPRV:
            return (status & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT
    return priv


def translate(hart: Hart, vaddr: int, access: int) -> int:
    """The physical address of ``vaddr`` for ``access`` (causes.ACCESS_*), or a page/access fault.

    ``vaddr`` is the full 64-bit virtual address (so its upper bits can be checked).
    """
    return walk(hart, vaddr, access)[0]


def debug_translate(hart: Hart, vaddr: int) -> int:
    """The physical address a debugger means by ``vaddr``: as the hart would read it (or
    fetch it, for execute-only code), without setting A/D bits; a page fault if neither."""
    try:
        return walk(hart, vaddr, ACCESS_READ, update=False)[0]
    except Trap:
        return walk(hart, vaddr, ACCESS_EXEC, update=False)[0]


Trail = tuple[int, ...]


def walk(hart: Hart, vaddr: int, access: int, update: bool = True
         ) -> tuple[int, int, bool, Trail | None]:
    """:func:`translate`, plus what a TLB caching the answer needs to know to drop it in
    time: the log2 size of the mapping (an ``sfence.vma`` of any page in a superpage
    changes all of it), whether only ``mstatus.SUM`` grants it (a user page reached
    from S-mode) and, if it is global, its trail (see :func:`unchanged`; M-mode's
    untranslated accesses have an empty one); None if it belongs to one address space.
    ``update`` False leaves the PTE's A/D bits alone (a debugger's look)."""
    priv = effective_priv(hart, access)
    if priv == PRIV_M:
        return vaddr, PAGE_SHIFT, False, ()
    c = hart.csr
    satp = c[SATP]
    mode = satp >> SATP_MODE_SHIFT
    if mode == SATP_BARE:
        return vaddr, PAGE_SHIFT, False, None
    levels = 3 if mode == SATP_SV39 else 4
    va_bits = PAGE_SHIFT + LEVEL_BITS * levels
    page_fault = PAGE_FAULT_FOR_ACCESS[access]
    top = vaddr >> (va_bits - 1)  # bits 63..va_bits-1 must all equal bit va_bits-1
    if top and top != (1 << (65 - va_bits)) - 1:
        raise Trap(page_fault, vaddr)

    table = (satp & SATP_PPN_MASK) << PAGE_SHIFT
    level = levels - 1
    mem = hart.mem
    # Page tables in RAM, no PMP, every page present: each PTE is one read (the
    # general path below checks and reads the same way, only slower).
    direct = not (c[PMPCFG0] | c[PMPCFG0 + 2] or mem.absent_pages)
    ram, ram_base, ram_last = mem.ram, mem.base, mem.size - 8
    bits = 0  # the PTEs' bits ORed: G in a pointer makes everything below it global
    trail: Trail = ()  # (address, value) of each PTE read; the root's address in its page
    while True:
        shift = PAGE_SHIFT + LEVEL_BITS * level
        pte_addr = table + ((vaddr >> shift) & 0x1FF) * 8
        if direct and 0 <= pte_addr - ram_base <= ram_last:
            pte = _u64(ram, pte_addr - ram_base)[0]
        else:
            pte = _load_pte(hart, pte_addr, vaddr, access)
        if not pte & PTE_V or pte & (PTE_R | PTE_W) == PTE_W:
            raise Trap(page_fault, vaddr)
        bits |= pte
        trail += (pte_addr if trail else pte_addr & PAGE_MASK, pte)
        if pte & (PTE_R | PTE_X):
            break
        # A pointer at the last level, or one with D, A, U or any of bits 63:54 set
        # (reserved in pointers).
        if level == 0 or pte & (PTE_D | PTE_A | PTE_U | PTE_HIGH):
            raise Trap(page_fault, vaddr)
        level -= 1
        table = ((pte >> PTE_PPN_SHIFT) & SATP_PPN_MASK) << PAGE_SHIFT

    if pte & PTE_HIGH and not _high_bits_valid(pte, level, c[MENVCFG]):
        raise Trap(page_fault, vaddr)
    status = c[MSTATUS]
    if pte & PTE_U:
        if priv == PRIV_S and (access == ACCESS_EXEC or not status & MSTATUS_SUM):
            raise Trap(page_fault, vaddr)
    elif priv == PRIV_U:
        raise Trap(page_fault, vaddr)
    if access == ACCESS_READ:
        allowed = pte & PTE_R or (status & MSTATUS_MXR and pte & PTE_X)
    elif access == ACCESS_WRITE:
        allowed = pte & PTE_W
    else:
        allowed = pte & PTE_X
    if not allowed:
        raise Trap(page_fault, vaddr)
    ppn = (pte >> PTE_PPN_SHIFT) & SATP_PPN_MASK
    if pte & PTE_N:  # a 64 KiB page: the low PPN bits come from the address
        shift = NAPOT_64K_SHIFT
        ppn &= ~0xF
    offset_mask = (1 << shift) - 1
    if (ppn << PAGE_SHIFT) & offset_mask:
        raise Trap(page_fault, vaddr)  # misaligned superpage

    wanted = PTE_A | PTE_D if access == ACCESS_WRITE else PTE_A
    if update and pte & wanted != wanted:
        _store_pte(hart, pte_addr, pte | wanted, vaddr, access)
        trail = (*trail[:-1], pte | wanted)
    pa = (ppn << PAGE_SHIFT) | (vaddr & offset_mask)
    return (pa, shift, priv == PRIV_S and bool(pte & PTE_U),
            trail if bits & PTE_G and direct else None)


def unchanged(hart: Hart, trail: Trail) -> bool:
    """Whether a walk now would read the PTE values of ``trail`` (a global translation's,
    from :func:`walk` in this translation mode), and so give the translation it gave.
    The root is the current one (global mappings are the same under every root); each
    later PTE's address follows from the value above it."""
    if not trail:
        return True
    c = hart.csr
    mem = hart.mem
    if c[PMPCFG0] | c[PMPCFG0 + 2] or mem.absent_pages:
        return False
    ram, ram_base, ram_last = mem.ram, mem.base, mem.size - 8
    addr = ((c[SATP] & SATP_PPN_MASK) << PAGE_SHIFT) | trail[0]
    for i in range(0, len(trail), 2):
        off = (addr if i == 0 else trail[i]) - ram_base
        if not 0 <= off <= ram_last or _u64(ram, off)[0] != trail[i + 1]:
            return False
    return True


def _high_bits_valid(pte: int, level: int, menvcfg: int) -> bool:
    """Whether a leaf PTE's bits 63:54 hold only what Svnapot and Svpbmt define."""
    if pte & PTE_RESERVED:
        return False
    pbmt = (pte & PTE_PBMT) >> PTE_PBMT_SHIFT
    if pbmt and (pbmt == PTE_PBMT_RESERVED or not menvcfg & ENVCFG_PBMTE):
        return False
    if pte & PTE_N:
        return level == 0 and (pte >> PTE_PPN_SHIFT) & 0xF == NAPOT_64K_PPN
    return True


def _load_pte(hart: Hart, pte_addr: int, vaddr: int, access: int) -> int:
    if pmp_check(hart, pte_addr, 8, ACCESS_READ, PRIV_S):
        try:
            return hart.mem.load(pte_addr, 8)
        except BusError:
            pass
    raise Trap(ACCESS_FAULT_FOR_ACCESS[access], vaddr)


def _store_pte(hart: Hart, pte_addr: int, pte: int, vaddr: int, access: int) -> None:
    if pmp_check(hart, pte_addr, 8, ACCESS_WRITE, PRIV_S):
        try:
            hart.mem.store(pte_addr, 8, pte)
            return
        except BusError:
            pass
    raise Trap(ACCESS_FAULT_FOR_ACCESS[access], vaddr)
