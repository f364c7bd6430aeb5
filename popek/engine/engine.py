"""The reference engine: decode once into blocks, then call one handler per instruction.

A block is a run of instructions within one guest page, ending at a control
transfer, a system instruction or the page end; it is cached by host offset
of its first instruction (plus the mode bits decoding depends on) and dropped
when a store hits its page. Interrupts are checked at block boundaries: after
every system instruction (which may have enabled one) and at each slice start.
"""

from __future__ import annotations

import struct

from popek.cpu import trap as trap_unit
from popek.cpu.causes import ILLEGAL_INSN, Trap
from popek.cpu.physmem import PAGE_SIZE
from popek.cpu.state import CTL_INSTRET, CTL_WFI, XLEN_MASK
from popek.engine.handlers import Handler, bind_handlers
from popek.isa.decoder import Decoded, decode16, decode32

MSTATUS = 0x300
MSTATUS_FS = 3 << 13
MSTATUS_FS_DIRTY_SD = (3 << 13) | (1 << 63)
FS_ON_KEY = 1 << 62  # block-cache key bit: decoded with the FP unit enabled
MAX_BLOCK = 64

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from

Op = tuple[Handler, int, int, int, int]


class Block:
    """Decoded instructions of one block and what the engine must do around them."""

    __slots__ = ("ops", "count", "fp", "system", "offsets", "page")

    def __init__(self, ops: tuple[Op, ...], offsets: tuple[int, ...], fp: bool, system: bool,
                 page: int | None) -> None:
        self.ops = ops
        self.count = len(ops)
        self.offsets = offsets  # byte offset of each instruction from the block start
        self.fp = fp  # makes FP state dirty
        self.system = system  # ends in a system instruction
        self.page = page  # host page offset, None if not cacheable


class Interpreter:
    """Runs one hart by interpreting decoded blocks."""

    def __init__(self, hart) -> None:
        self.hart = hart
        self.handlers = bind_handlers(hart)
        self.illegal: Handler = self.handlers[("illegal", 0)]
        self.blocks: dict[int, Block] = {}
        self.page_blocks: dict[int, list[int]] = {}
        hart.mem.code_watchers.append(self.invalidate_page)

    # -- code cache ---------------------------------------------------------------------
    def invalidate_page(self, page: int) -> None:
        for key in self.page_blocks.pop(page, ()):
            self.blocks.pop(key, None)

    def flush(self) -> None:
        """Drop all decoded code (fence.i)."""
        self.blocks.clear()
        self.page_blocks.clear()

    def _mode_key(self) -> int:
        return FS_ON_KEY if self.hart.csr[MSTATUS] & MSTATUS_FS else 0

    def _op(self, d: Decoded | None, fs_on: bool) -> tuple[Op, bool]:
        """The op for a decoded instruction and whether it must end the block."""
        if d is None or ("fp" in d.insn.flags and not fs_on):
            return (self.illegal, 0, 0, 0, 0), True
        flags = d.insn.flags
        op = (self.handlers[(d.insn.name, d.length)], d.rd, d.rs1, d.rs2, d.imm)
        return op, "ends_block" in flags

    def translate(self, page: int | None, pc: int, mode: int, limit: int = MAX_BLOCK) -> Block:
        """Decode the block at ``pc`` (host page offset ``page``, None for a device)."""
        fs_on = bool(mode & FS_ON_KEY)
        ram = self.hart.mem.ram
        mmu = self.hart.mmu
        ops: list[Op] = []
        offsets: list[int] = []
        fp = system = False
        cacheable = page is not None
        off = pc & (PAGE_SIZE - 1)
        start = off
        while len(ops) < limit:
            if page is not None and off + 2 <= PAGE_SIZE:
                half = _u16(ram, page + off)[0]
                if half & 3 != 3:
                    d, length = decode16(half), 2
                elif off + 4 <= PAGE_SIZE:
                    d, length = decode32(_u32(ram, page + off)[0]), 4
                elif ops:
                    break  # the next instruction straddles pages: its own block
                else:
                    d, length, cacheable = decode32(mmu.fetch_slow(pc, 4)), 4, False
            else:
                word = mmu.fetch_slow(pc + off - start, 2)
                if word & 3 == 3:
                    word = mmu.fetch_slow(pc + off - start, 4)
                d, length = (decode32(word), 4) if word & 3 == 3 else (decode16(word), 2)
            op, ends = self._op(d, fs_on)
            ops.append(op)
            offsets.append(off - start)
            if d is not None:
                fp = fp or "fp_write" in d.insn.flags
                system = "system" in d.insn.flags
            off += length
            if ends or off >= PAGE_SIZE or page is None:
                break
        block = Block(tuple(ops), tuple(offsets), fp, system, page if cacheable else None)
        if cacheable and limit == MAX_BLOCK:
            key = page + start + mode
            self.blocks[key] = block
            self.page_blocks.setdefault(page, []).append(key)
            self.hart.mem.protect_code_page(page)
        return block

    # -- execution ----------------------------------------------------------------------
    def _take(self, t: Trap, pc: int) -> int:
        tval = t.tval
        if tval is None:  # illegal instruction: report its bits
            tval = self._instruction_bits(pc) if t.cause == ILLEGAL_INSN else 0
        return self.hart.on_trap(t.cause, tval, pc)

    def _instruction_bits(self, pc: int) -> int:
        try:
            half = self.hart.mmu.fetch_slow(pc, 2)
            return half if half & 3 != 3 else self.hart.mmu.fetch_slow(pc, 4)
        except Trap:
            return 0

    def check_interrupts(self, pc: int) -> int:
        cause = trap_unit.pending_interrupt(self.hart)  # already has INTERRUPT_BIT
        if cause is None:
            return pc
        return self.hart.on_trap(cause, 0, pc)

    def run(self, budget: int, single: bool = False) -> int:
        """Execute about ``budget`` instructions (whole blocks); returns how many retired.

        Stops early when the hart waits for an interrupt (WFI).
        """
        hart = self.hart
        ctl = hart.ctl
        mmu = hart.mmu
        tlb_x = mmu.tlb_x
        blocks = self.blocks
        csr = hart.csr
        pc = hart.pc
        executed = 0
        instret0 = ctl[CTL_INSTRET]
        try:
            pc = self.check_interrupts(pc)
            mode = self._mode_key()
            while executed < budget and not ctl[CTL_WFI]:
                blk = None
                try:
                    while executed < budget:
                        blk = None
                        base = tlb_x.get(pc >> 12)
                        if base is None:
                            pc &= XLEN_MASK
                            base = mmu.fetch_page(pc)
                        if single:
                            blk = self.translate(base, pc, mode, limit=1)
                        elif base is None or (blk := blocks.get(base + (pc & 4095) + mode)) is None:
                            blk = self.translate(base, pc, mode)
                        if blk.fp:
                            csr[MSTATUS] |= MSTATUS_FS_DIRTY_SD
                        if blk.system:  # its CSR access may read instret: make it exact
                            ctl[CTL_INSTRET] = (instret0 + executed + blk.count - 1) & XLEN_MASK
                        bpc = pc
                        for fn, a, b, c, d in blk.ops:
                            pc = fn(pc, a, b, c, d)
                        executed += blk.count
                        if blk.system:
                            pc = self.check_interrupts(pc)
                            mode = self._mode_key()
                            if ctl[CTL_WFI]:
                                break
                except Trap as t:
                    if blk is not None:
                        executed += blk.offsets.index(pc - bpc)
                    pc = self._take(t, pc)
                    mode = self._mode_key()
                    budget -= 1  # a trap is progress too: a trap loop must not pin the host
        finally:
            hart.pc = pc
            ctl[CTL_INSTRET] = (instret0 + executed) & XLEN_MASK
        return executed
