"""Physical memory protection: 16 entries, 4-byte granularity (G = 0), priv. spec 1.12.

The configuration lives in the hart's CSR storage (``pmpcfg0``/``pmpcfg2`` and
``pmpaddr0..15``); ``pmpcfg4..14`` and ``pmpaddr16..63`` exist but read as zero, which
is how firmware (OpenSBI) discovers that 16 entries are implemented.

One deliberate departure from the letter of the spec: while every entry is OFF, S- and
U-mode accesses succeed. popek can boot a kernel in S-mode with the SBI implemented in
Python, which never programs PMP; real firmware always installs at least one rule, and
from then on unmatched S/U accesses fail as the spec says.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from popek.cpu.state import PRIV_M

if TYPE_CHECKING:
    from popek.cpu.hart import Hart

PMPCFG0 = 0x3A0
PMPADDR0 = 0x3B0
N_CFG_CSRS = 8  # pmpcfg0, 2, ..., 14
N_ADDR_CSRS = 64
N_ENTRIES = 16
PAGE_SIZE = 4096

PMP_R, PMP_W, PMP_X = 1, 2, 4
PMP_A_SHIFT = 3
PMP_A = 3 << PMP_A_SHIFT
A_OFF, A_TOR, A_NA4, A_NAPOT = 0, 1, 2, 3
PMP_L = 0x80
CFG_WMASK = PMP_L | PMP_A | PMP_X | PMP_W | PMP_R  # bits 6:5 are reserved, read as zero
ADDR_MASK = (1 << 54) - 1  # pmpaddr holds physical address bits 55:2

Rule = tuple[int, int, int]
"""(first byte, end byte exclusive, cfg byte) of one active entry."""

_rules_cache: dict[bytes, tuple[Rule, ...]] = {}
_RULES_CACHE_MAX = 64


def cfg_of(csr: array[int], i: int) -> int:
    """The configuration byte of entry ``i``."""
    return (csr[PMPCFG0 + 2 * (i >> 3)] >> (8 * (i & 7))) & 0xFF


def _decode(csr: array[int]) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    prev = 0
    for i in range(N_ENTRIES):
        cfg = cfg_of(csr, i)
        addr = csr[PMPADDR0 + i]
        mode = (cfg & PMP_A) >> PMP_A_SHIFT
        if mode == A_TOR:
            lo, hi = prev << 2, addr << 2
        elif mode == A_NA4:
            lo, hi = addr << 2, (addr << 2) + 4
        elif mode == A_NAPOT:
            ones = (~addr & (addr + 1)).bit_length() - 1  # trailing one bits
            lo = (addr & ~((1 << ones) - 1)) << 2
            hi = lo + (8 << ones)
        else:
            lo = hi = 0
        if lo < hi:
            rules.append((lo, hi, cfg))
        prev = addr
    return tuple(rules)


def _rules(csr: array[int]) -> tuple[Rule, ...]:
    """Decoded entries, cached by the raw register contents (so restoring a snapshot is safe)."""
    key = csr[PMPCFG0:PMPADDR0 + N_ENTRIES].tobytes()
    rules = _rules_cache.get(key)
    if rules is None:
        if len(_rules_cache) >= _RULES_CACHE_MAX:
            _rules_cache.clear()
        rules = _rules_cache[key] = _decode(csr)
    return rules


def pmp_check(hart: Hart, paddr: int, size: int, access: int, priv: int) -> bool:
    """May ``priv`` perform ``access`` (causes.ACCESS_*) on bytes [paddr, paddr + size)?"""
    csr = hart.csr
    if not (csr[PMPCFG0] | csr[PMPCFG0 + 2]):
        return True
    rules = _rules(csr)
    if not rules:
        return True
    end = paddr + size
    for lo, hi, cfg in rules:
        if paddr < hi and lo < end:
            if lo > paddr or end > hi:
                return False  # the highest-priority match must cover the whole access
            if priv == PRIV_M and not cfg & PMP_L:
                return True
            return bool((cfg >> access) & 1)  # ACCESS_READ/WRITE/EXEC are bits R/W/X
    return priv == PRIV_M


def pmp_page_uniform(hart: Hart, page_paddr: int, access: int, priv: int) -> bool:
    """True when every byte of the 4 KiB page allows the access, so a TLB may cache the page.

    Checking the whole page as one access gives exactly that: it succeeds only when a
    single entry covers the page (or none touches it, for M-mode) and grants the access.
    """
    return pmp_check(hart, page_paddr & ~(PAGE_SIZE - 1), PAGE_SIZE, access, priv)


def write_cfg(hart: Hart, num: int, value: int) -> None:
    """Write pmpcfg CSR ``num``: locked bytes and the reserved R=0/W=1 encoding keep their value."""
    index = (num - PMPCFG0) >> 1
    if index * 8 >= N_ENTRIES:
        return
    csr = hart.csr
    old = csr[num]
    new = 0
    for k in range(0, 64, 8):
        before = (old >> k) & 0xFF
        after = (value >> k) & CFG_WMASK
        if before & PMP_L or after & (PMP_R | PMP_W) == PMP_W:
            after = before
        new |= after << k
    csr[num] = new
    hart.mmu.flush()


def write_addr(hart: Hart, i: int, value: int) -> None:
    """Write pmpaddr ``i``, unless entry i is locked or is the base of a locked TOR entry."""
    if i >= N_ENTRIES:
        return
    csr = hart.csr
    if cfg_of(csr, i) & PMP_L:
        return
    if i + 1 < N_ENTRIES:
        upper = cfg_of(csr, i + 1)
        if upper & PMP_L and (upper & PMP_A) >> PMP_A_SHIFT == A_TOR:
            return
    csr[PMPADDR0 + i] = value & ADDR_MASK
    hart.mmu.flush()
