"""Cache-block operations (Zicbom, Zicboz): what a hart with no caches still owes them.

popek has no caches to clean, flush or invalidate, so ``cbo.clean``/``cbo.flush``/
``cbo.inval`` only check what the specification makes them check: that the privilege
may execute them (the CBIE/CBCFE/CBZE fields of ``menvcfg`` and, for U-mode, of
``senvcfg``; else illegal instruction) and that a load or a store may reach the block
(else a store page or access fault). ``cbo.zero`` zeroes the block, a store as far as
translation, PMP and the write watchers are concerned. A fault's tval is the address in
rs1, not the block's, as the Sail reference model has it (QEMU reports the block's). The
block size is the one the device tree advertises (``riscv,cbom-block-size``,
``riscv,cboz-block-size``), QEMU's 64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.cpu import extensions
from popek.cpu.causes import ACCESS_FAULT_FOR_ACCESS, ACCESS_READ, ACCESS_WRITE, Trap
from popek.cpu.csr import (
    ENVCFG_CBCFE,
    ENVCFG_CBIE,
    ENVCFG_CBZE,
    MENVCFG,
    SENVCFG,
    illegal,
)
from popek.cpu.physmem import BusError
from popek.cpu.state import CTL_PRIV, PRIV_M, PRIV_U

if TYPE_CHECKING:
    from popek.cpu.hart import Hart

BLOCK_SIZE = extensions.CACHE_BLOCK_SIZE
ZERO_BLOCK = bytes(BLOCK_SIZE)

# What each operation's kind number asks of the envcfg registers (see popek.isa.system).
CLEAN, FLUSH, INVAL, ZERO = 0, 1, 2, 3


def _field(hart: Hart, mask: int) -> int:
    """The envcfg field ``mask`` as the current privilege sees it: M-mode may do anything;
    U-mode gets what both menvcfg and senvcfg grant (for CBIE the lesser of the two)."""
    priv = hart.ctl[CTL_PRIV]
    if priv == PRIV_M:
        return mask
    field = hart.csr[MENVCFG] & mask
    if priv == PRIV_U:
        field = min(field, hart.csr[SENVCFG] & mask)
    return field


def operate(hart: Hart, kind: int, addr: int) -> None:
    """One ``cbo.*`` instruction on the block holding virtual address ``addr``."""
    if kind == ZERO:
        allowed = _field(hart, ENVCFG_CBZE)
    elif kind == INVAL:
        allowed = _field(hart, ENVCFG_CBIE)
    else:
        allowed = _field(hart, ENVCFG_CBCFE)
    if not allowed:
        raise illegal()
    try:
        _access(hart, kind, addr & ~(BLOCK_SIZE - 1))
    except Trap as trap:  # the fault reports the address the instruction named
        raise Trap(trap.cause, addr) from None


def _access(hart: Hart, kind: int, base: int) -> None:
    mmu = hart.mmu
    if kind == ZERO:
        pa, off = mmu.resolve(base, BLOCK_SIZE, ACCESS_WRITE)
        try:
            if off is not None:
                hart.mem.write(pa, ZERO_BLOCK)
            else:
                for i in range(0, BLOCK_SIZE, 8):
                    hart.mem.store(pa + i, 8, 0)
        except BusError:
            raise Trap(ACCESS_FAULT_FOR_ACCESS[ACCESS_WRITE], base) from None
        return
    try:
        mmu.resolve(base, BLOCK_SIZE, ACCESS_READ)
    except Trap:
        mmu.resolve(base, BLOCK_SIZE, ACCESS_WRITE)  # neither: the store's fault
