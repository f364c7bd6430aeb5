"""The execution engine: code cache, block dispatch and precise traps for every tier.

A block is a run of instructions within one guest page, ending at a control
transfer, a system instruction or the page end; it is decoded once, cached by the
host offset of its first instruction (plus the mode bits decoding depends on), and
dropped when a store hits its page. Each block has one entry point, ``run(pc)``:
the reference tier interprets its decoded instructions; tier 1 replaces that with
a translated Python function once the block is hot. Interrupts are checked at
block boundaries: after every system instruction and at each slice start.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from popek.cpu import trap as trap_unit
from popek.cpu.causes import ILLEGAL_INSN, Trap
from popek.cpu.physmem import PAGE_SIZE
from popek.cpu.state import CTL_INSTRET, CTL_WFI, XLEN_MASK
from popek.engine import translator
from popek.engine.handlers import Handler, bind_handlers, semantics_namespace
from popek.engine.interpreter import BlockFn, Op, interpret
from popek.isa.decoder import Decoded, decode16, decode32

MSTATUS = 0x300
MSTATUS_FS = 3 << 13
MSTATUS_FS_DIRTY_SD = (3 << 13) | (1 << 63)
FS_ON_KEY = 1 << 62  # block-cache key bit: decoded with the FP unit enabled
MAX_BLOCK = 64
STRADDLERS_LIMIT = 4096
HOT_AFTER = 256  # runs before tier 1 translates a block: compiling costs ~1 ms, so
# only blocks that will run many more times repay it (measured on a Linux boot)
TIERS = ("interp", "translate")
DEFAULT_TIER = os.environ.get("POPEK_ENGINE", "translate")  # the fastest tier by default

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from

class Block:
    """One decoded block: its entry point and what the engine must do around it."""

    __slots__ = ("run", "count", "fp", "system", "special", "offsets", "decoded")

    def __init__(self, decoded: list[Decoded | None], offsets: tuple[int, ...], fp: bool,
                 system: bool) -> None:
        self.run: BlockFn = _unset
        self.decoded = decoded  # None marks an illegal instruction (always the last)
        self.count = len(decoded)
        self.offsets = offsets  # byte offset of each instruction from the block start
        self.fp = fp  # makes FP state dirty
        self.system = system  # ends in a system instruction
        self.special = fp or system  # the run loop has work to do around it


def _unset(pc: int) -> int:
    raise AssertionError("block entry point not set")


class Engine:
    """Runs one hart: decodes, caches and dispatches blocks of the chosen tier."""

    def __init__(self, hart, tier: str = DEFAULT_TIER) -> None:
        if tier not in TIERS:
            raise ValueError(f"unknown engine {tier!r}: choose one of {', '.join(TIERS)}")
        self.hart = hart
        self.tier = tier
        self.namespace = semantics_namespace(hart)
        self.handlers = bind_handlers(self.namespace)
        self.illegal: Handler = self.handlers[("illegal", 0)]
        self.ops: dict[int, Op] = {}
        self.blocks: dict[int, Block] = {}
        self.page_blocks: dict[int, list[int]] = {}
        # Instructions that straddle two pages, cached by their bits (and mode) rather
        # than by address: the second page may map anywhere, and differently next time.
        self.straddlers: dict[int, Block] = {}
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

    def _op(self, d: Decoded | None) -> Op:
        """The interpreter's op for ``d``, one shared by every block holding the same bits
        (a boot decodes ~200,000 instructions, a quarter of them distinct)."""
        if d is None:
            return (self.illegal, 0, 0, 0, 0)
        key = d.word | d.length << 32
        op = self.ops.get(key)
        if op is None:
            op = self.ops[key] = (self.handlers[(d.insn.name, d.length)], d.rd, d.rs1, d.rs2,
                                  d.imm)
        return op

    def _promote(self, block: Block) -> Callable[[], None]:
        def promote() -> None:
            if None not in block.decoded:
                block.run = translator.translate(self.namespace, block.decoded, block.offsets)

        return promote

    def decode_block(self, page: int | None, pc: int, mode: int, limit: int = MAX_BLOCK) -> Block:
        """Decode the block at ``pc`` (host page offset ``page``, None for a device)."""
        fs_on = bool(mode & FS_ON_KEY)
        ram = self.hart.mem.ram
        mmu = self.hart.mmu
        decoded: list[Decoded | None] = []
        offsets: list[int] = []
        fp = system = False
        cacheable = page is not None
        straddler = None  # the cache key of a block that is one page-straddling instruction
        off = pc & (PAGE_SIZE - 1)
        start = off
        while len(decoded) < limit:
            if page is not None and off + 2 <= PAGE_SIZE:
                half = _u16(ram, page + off)[0]
                if half & 3 != 3:
                    d, length = decode16(half), 2
                elif off + 4 <= PAGE_SIZE:
                    d, length = decode32(_u32(ram, page + off)[0]), 4
                elif decoded:
                    break  # the next instruction straddles pages: its own block
                else:
                    word = self._straddling_bits(page, pc)
                    straddler = word | mode
                    if limit == MAX_BLOCK and (block := self.straddlers.get(straddler)):
                        return block
                    d, length, cacheable = decode32(word), 4, False
            else:
                word = mmu.fetch_slow(pc + off - start, 2)
                if word & 3 == 3:
                    word = mmu.fetch_slow(pc + off - start, 4)
                d, length = (decode32(word), 4) if word & 3 == 3 else (decode16(word), 2)
            if d is not None and "fp" in d.insn.flags and not fs_on:
                d = None  # the FP unit is off: FP instructions are illegal
            decoded.append(d)
            offsets.append(off - start)
            off += length
            if d is None:
                break
            fp = fp or "fp_write" in d.insn.flags
            system = "system" in d.insn.flags
            if "ends_block" in d.insn.flags or off >= PAGE_SIZE or page is None:
                break
        block = Block(decoded, tuple(offsets), fp, system)
        ops = tuple(self._op(d) for d in decoded)
        if limit != MAX_BLOCK or not (cacheable or straddler is not None):
            block.run = interpret(ops, block.offsets)
            if self.tier == "translate":  # a single step runs tier-1 code too
                self._promote(block)()
            return block
        if self.tier == "translate":
            block.run = interpret(ops, block.offsets, self._promote(block), HOT_AFTER)
        else:
            block.run = interpret(ops, block.offsets)
        if straddler is not None:
            if len(self.straddlers) >= STRADDLERS_LIMIT:
                self.straddlers.clear()
            self.straddlers[straddler] = block
        else:
            key = page + start + mode
            self.blocks[key] = block
            self.page_blocks.setdefault(page, []).append(key)
            self.hart.mem.protect_code(page, start, off)
        return block

    def _straddling_bits(self, page: int, pc: int) -> int:
        """The bits of the 4-byte instruction at the last two bytes of ``page`` (at ``pc``)."""
        mmu = self.hart.mmu
        high_pc = (pc + 2) & XLEN_MASK
        high_page = mmu.tlb_x.get(high_pc >> 12)
        if high_page is None:
            high_page = mmu.fetch_page(high_pc)  # a fault here reports the second half
        if high_page is None:  # a device
            return mmu.fetch_slow(pc, 4)
        ram = self.hart.mem.ram
        return _u16(ram, page + PAGE_SIZE - 2)[0] | (_u16(ram, high_page)[0] << 16)

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

    def _block_at(self, pc: int, base: int | None, mode: int, single: bool) -> Block:
        """The block at ``pc`` when the run loop's fast lookup missed: the fetch missed the
        TLB (``base`` None), the block is not decoded yet, or a single step is asked."""
        if base is None:
            base = self.hart.mmu.fetch_page(pc)
        if single:
            return self.decode_block(base, pc, mode, limit=1)
        if base is not None and (blk := self.blocks.get(base + (pc & 4095) + mode)) is not None:
            return blk
        return self.decode_block(base, pc, mode)

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
        tlb_x = hart.mmu.tlb_x
        blocks = {} if single else self.blocks  # a single step decodes one instruction afresh
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
                        base = tlb_x.get(pc >> 12)
                        if base is None or (blk := blocks.get(base + (pc & 4095) + mode)) is None:
                            blk = None  # a fault fetching it is no block's
                            pc &= XLEN_MASK
                            blk = self._block_at(pc, base, mode, single)
                        if blk.special:
                            if blk.fp:
                                csr[MSTATUS] |= MSTATUS_FS_DIRTY_SD
                            if blk.system:  # its CSR access may read instret: make it exact
                                ctl[CTL_INSTRET] = (instret0 + executed + blk.count - 1) & XLEN_MASK
                        bpc = pc
                        pc = blk.run(pc)
                        executed += blk.count
                        if blk.system:
                            pc = self.check_interrupts(pc)
                            mode = self._mode_key()
                            if ctl[CTL_WFI]:
                                break
                except Trap as t:
                    if blk is not None:  # the block tells which instruction trapped
                        index = t.index
                        executed += index
                        pc = bpc + blk.offsets[index]
                    pc = self._take(t, pc)
                    mode = self._mode_key()
                    budget -= 1  # a trap is progress too: a trap loop must not pin the host
        finally:
            hart.pc = pc
            ctl[CTL_INSTRET] = (instret0 + executed) & XLEN_MASK
        return executed
