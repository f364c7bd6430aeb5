"""The execution engine: code cache, block dispatch and precise traps for every tier.

A block is a run of instructions within one guest page, ending at a control
transfer, a system instruction or the page end; it is decoded once, cached by the
host offset of its first instruction (plus the mode bits decoding depends on), and
dropped when a store overlaps it: the engine watches each page it decoded (guest
memory's write watches keep the page off the write fast path and report every write
to it) and checks each write against the 16-byte granules that hold code, so data
beside code costs a slow-path store, not a re-decode. Each block has one entry point,
``run(pc)``: the reference tier interprets its decoded instructions; tier 1 replaces
that with a translated Python function once the block is hot. Under the native tiers
(``baseline``, ``jit``) a block gets native code patched from stencils when it is
decoded, runnable at once (see stencils.CodeArea), and, under ``jit``,
LLVM's code once it has run PATCHED_NATIVE_AFTER times. Interrupts are checked
at block boundaries: after every system instruction and at each slice start. A block
whose bytes an earlier run (or this one) compiled starts native, or on tier 1, at
first sight (:mod:`popek.engine.native_cache`).

A debugger stops a hart at an arbitrary pc without a check per block: setting
breakpoints flushes the code cache (the one invalidation path), and blocks decoded while
breakpoints exist end before each breakpoint, so a breakpoint is always a block's first
instruction; such a block is ``special`` (the run loop's slow path looks at it) and never
native (native code would chain into it without returning to the loop).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterable
from functools import cache

from popek.cpu import trap as trap_unit
from popek.cpu.causes import ACCESS_EXEC, ILLEGAL_INSN, DebugStop, Trap
from popek.cpu.physmem import PAGE_SIZE
from popek.cpu.state import CTL_INSTRET, CTL_PRIV, CTL_WFI, XLEN_MASK
from popek.engine import jit, stencils, translator
from popek.engine.handlers import Handler, bind_handlers, semantics_namespace
from popek.engine.interpreter import BlockFn, Op, interpret
from popek.engine.native_cache import CACHE, block_key
from popek.engine.spin import SPIN_GLANCE, SPIN_WINDOW, SpinDetector
from popek.isa.decoder import ENDS_BLOCK, ENTRIES, FP_WRITE, NEEDS_FP, SYSTEM, Decoded, entry

MSTATUS = 0x300
MSTATUS_FS = 3 << 13
MSTATUS_FS_DIRTY_SD = (3 << 13) | (1 << 63)
FS_ON_KEY = 1 << 62  # block-cache key bit: decoded with the FP unit enabled
MAX_BLOCK = 64
CODE_GRANULE = 16  # bytes: how finely writes are checked against decoded code
STRADDLERS_LIMIT = 4096
HOT_AFTER = 256  # runs before tier 1 translates a block: compiling costs ~1 ms, so
# only blocks that will run many more times repay it (measured on a Linux boot)
NATIVE_AFTER = 256  # further runs on tier 1 before tier 2 compiles a block (~3 ms each;
# 64 and 1024 measured no better on Lua and gzip).
PATCHED_NATIVE_AFTER = 131072  # runs of a block patched from stencils before tier 2 compiles
# it: its code is native and linked already, so LLVM's ~3 ms a block (IR, compile) repay
# only blocks that then run some hundred thousand times more, saving a few ns each. With
# 8192 a Linux boot compiled 56 blocks and was 0.2-0.4 s slower than without tier 2, Lua
# compiled 710 and ran 1.2-1.9 s instead of 1.1-1.5 s; with 131072 neither compiles much,
# and sha256sum of 32 MiB still gets its ~30 hot blocks (2.2-2.4 s either way).
TIERS = ("interp", "translate", "baseline", "jit")
# The baseline tier where stencils exist: a Linux boot, Lua, gzip, sha256sum of 2 MiB,
# threads and esbuild all ran faster under it than under jit (which adds LLVM's tier 2),
# in ~70 MiB less memory; jit wins only on long hot loops (sha256sum of 32 MiB: 2.2-2.6 s
# against 2.8-3.6 s). Elsewhere tier 2 is the only native tier.
FASTEST_TIER = ("baseline" if stencils.supported() else "jit") if jit.available() \
    else "translate"
DEFAULT_TIER = os.environ.get("POPEK_ENGINE", FASTEST_TIER)

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from

_OFFSETS: dict[tuple[int, ...], tuple[int, ...]] = {}  # see Block.offsets
OFFSETS_LIMIT = 16384  # patterns kept for sharing (a boot has ~2,750), then start over


class Block:
    """One decoded block: its entry point and what the engine must do around it."""

    __slots__ = ("run", "count", "fp", "system", "special", "offsets", "decoded", "native",
                 "native_addr", "key", "breakpoint", "straddles")

    def __init__(self, decoded: list[Decoded | None], offsets: tuple[int, ...], fp: bool,
                 system: bool) -> None:
        self.run: BlockFn = _unset
        self.decoded = decoded  # None marks an illegal instruction (always the last)
        self.count = len(decoded)
        # The byte offset of each instruction from the block start: one tuple for all
        # blocks alike (a Linux boot's 31,000 blocks have fewer than 3,000 patterns).
        if len(_OFFSETS) >= OFFSETS_LIMIT:  # (code that the guest keeps generating)
            _OFFSETS.clear()
        self.offsets = _OFFSETS.setdefault(offsets, offsets)
        self.fp = fp  # makes FP state dirty
        self.system = system  # ends in a system instruction
        self.special = fp or system  # the run loop has work to do around it
        # How the run loop enters its native code (at native_addr), once it has some.
        self.native: Callable[[int, int, int], int] | None = None
        self.native_addr = 0
        self.key = -1  # in the code cache (Engine.blocks), if anywhere
        self.breakpoint = False  # decoded at a debugger's breakpoint
        # A page-straddling instruction's block with patched code: (its key in
        # Engine.straddlers, the host offset plus mode of its first half).
        self.straddles: tuple[int, int] | None = None

    def go_native(self, addr: int, runtime: jit.NativeRuntime) -> None:
        """Run native code at ``addr`` from now on, which ``runtime``'s block table lists.
        The run loop no longer calls ``run``: what the Python tiers' function held (ops,
        closures; tens of MiB over a boot's blocks) goes with it."""
        self.native, self.native_addr = runtime.entry(addr), addr
        self.special = True
        self.run = _unset
        if self.key >= 0:
            runtime.remember_block(self.key, addr)


@cache
def _no_stencils_notice() -> None:
    print(f"popek: no copy-and-patch stencils for {os.uname().machine} hosts (x86-64 only): "
          "cold code runs on the Python tiers", file=sys.stderr)


def _unset(pc: int) -> int:
    raise AssertionError("no Python entry point: not set yet, or the block runs native code")


class Engine:
    """Runs one hart: decodes, caches and dispatches blocks of the chosen tier."""

    def __init__(self, hart, tier: str = DEFAULT_TIER) -> None:
        if tier not in TIERS:
            raise ValueError(f"unknown engine {tier!r}: choose one of {', '.join(TIERS)}")
        if tier in ("baseline", "jit") and not jit.available():
            raise ValueError(f"engine {tier!r} needs llvmlite (pip install llvmlite)")
        if tier in ("baseline", "jit") and not stencils.supported():
            _no_stencils_notice()
            if tier == "baseline":
                tier = "translate"
        self.hart = hart
        self.tier = tier
        if tier in ("baseline", "jit"):
            CACHE.open(jit.toolchain())  # before the handlers, whose code it may hold
        self.namespace = semantics_namespace(hart)
        self.handlers = bind_handlers(self.namespace)
        self.illegal: Handler = self.handlers[("illegal", 0)]
        self.ops: dict[int, Op] = {}
        self.blocks: dict[int, Block] = {}
        self.page_blocks: dict[int, list[int]] = {}
        # Which CODE_GRANULE-byte granules of each watched page hold decoded code.
        self.code_granules: dict[int, bytearray] = {}
        # Instructions that straddle two pages, cached by their bits (and mode) rather
        # than by address: the second page may map anywhere, and differently next time.
        self.straddlers: dict[int, Block] = {}
        # Those whose native code the block table lists, by their first half's host offset
        # plus mode: native code may enter them (their code checks the second half).
        self.linked_straddlers: dict[int, Block] = {}
        self.native = jit.NativeRuntime(hart, self.handlers, compiles=tier == "jit") \
            if tier in ("baseline", "jit") else None
        self.native_queue: list[Block] = []  # hot blocks waiting for native code
        # Native code compiled for blocks, waiting to be installed between runs.
        self.native_done = self.native.compiled if self.native is not None else ()
        # A debugger's breakpoints (virtual pcs), where the hart stopped for it and
        # whether it runs guest instructions now (not a trap handler: the process VM's
        # system calls, the SBI), which a debugger's watched write must know.
        self.breakpoints: frozenset[int] = frozenset()
        self.debug_stop: DebugStop | None = None
        self.executing = False
        self.spin = SpinDetector(hart.x, hart.mmu, hart.mem)
        self.spun = False  # the last run ended early: the hart was spinning
        # What a native run started with, for its system instructions (leave_after_system).
        self._native_start = (0, 0)  # (privilege, decoding mode)
        self._spins = False  # the run looks for spinning at system instructions too
        if self.native is not None:
            self.native.leave_after_system = self._leave_after_system
            self.native.native_successor = self._native_successor

    # -- code cache ---------------------------------------------------------------------
    def _watch_code(self, page: int, start: int, end: int) -> None:
        """Decoded code now lies at offsets ``[start, end)`` of the RAM page at ``page``."""
        granules = self.code_granules.get(page)
        if granules is None:
            granules = self.code_granules[page] = bytearray(PAGE_SIZE // CODE_GRANULE)
            self.hart.mem.watch(page, self)
        first, last = start // CODE_GRANULE, (end - 1) // CODE_GRANULE
        granules[first:last + 1] = b"\1" * (last - first + 1)

    def page_written(self, page: int, offset: int, size: int) -> bool:
        """A write is about to change ``[offset, offset + size)`` of a watched page: drop
        the page's blocks if it overlaps their code (then stop watching), else keep them."""
        granules = self.code_granules[page]
        if granules.find(1, offset // CODE_GRANULE, (offset + size - 1) // CODE_GRANULE + 1) < 0:
            return True
        del self.code_granules[page]
        for key in self.page_blocks.pop(page, ()):
            self.blocks.pop(key, None)
            self.linked_straddlers.pop(key, None)
            if self.native is not None:
                self.native.forget_block(key)
        if self.native is not None:
            self.native.forget_jumps()
        return False

    def flush(self) -> None:
        """Drop all decoded code."""
        for page in self.code_granules:
            self.hart.mem.unwatch(page, self)
        self.code_granules.clear()
        self.blocks.clear()
        self.page_blocks.clear()
        self.straddlers.clear()  # their native code may go with the code area
        self.linked_straddlers.clear()
        if self.native is not None:
            self.native.forget_jumps()
            self.native.forget_blocks()

    def set_breakpoints(self, pcs: frozenset[int]) -> None:
        """Stop before any instruction at a virtual pc in ``pcs`` (see the module
        docstring): decoded blocks may run past them, so they are dropped."""
        if pcs != self.breakpoints:
            self.breakpoints = pcs
            self.flush()
            self.straddlers.clear()

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

    def _ops(self, decoded: list[Decoded | None]) -> tuple[Op, ...]:
        return tuple(self._op(d) for d in decoded)

    def _interpret_later(self, block: Block, promote: bool = False, native: bool = True,
                         code_key: bytes | None = None) -> BlockFn:
        """The interpreter's function for ``block``, made at its first run: most blocks
        run native code from the start and never need it. With ``promote``, tier 1 takes
        the block after HOT_AFTER runs (``_promote``'s function, ``native`` and
        ``code_key`` its arguments, is made then too)."""
        def first(pc: int) -> int:
            on_hot = self._promote(block, native, code_key) if promote else None
            block.run = interpret(self._ops(block.decoded), block.offsets, on_hot,
                                  HOT_AFTER if promote else 0)
            return block.run(pc)

        return first

    def _promote(self, block: Block, native: bool = True, code_key: bytes | None = None,
                 native_after: int = 0) -> Callable[[], None]:
        """Tier 1 for ``block``, then (if ``native``) tier 2 once it stays hot: after
        ``native_after`` runs (NATIVE_AFTER if 0). With the block's ``code_key``, tier
        1's code comes from the disk cache, or goes to it."""
        def promote() -> None:
            if block.decoded[-1] is None:  # an illegal instruction (always the last)
                return
            code = None
            if code_key is not None:
                code = CACHE.translation(code_key)
                if code is None:
                    code = translator.block_code(block.decoded, block.offsets)
                    CACHE.translated(code_key, code)
            block.run = translator.translate(self.namespace, block.decoded, block.offsets,
                                             code)
            if native and self.native is not None and self.native.compiles and \
                    not block.breakpoint:
                block.run = self._count_for_native(block, block.run,
                                                   native_after or NATIVE_AFTER)

        return promote

    def _count_for_native(self, block: Block, run: BlockFn, after: int) -> BlockFn:
        """Tier 1's function, queueing the block for native code after ``after`` runs."""
        remaining = after
        queue = self.native_queue

        def counted(pc: int) -> int:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                queue.append(block)
            return run(pc)

        return counted

    def _compile_native(self) -> None:
        """Between runs: install the native code the compiler thread finished, and hand it
        the queued blocks as one batch (LLVM's cost is mostly per batch) unless it still
        compiles the last one: until then they keep running on tier 1 and the queue grows."""
        native = self.native
        for block, addr in native.take_compiled():
            if self.blocks.get(block.key) is block:  # else its page changed, or a flush
                native.redirect(block.native_addr, addr)  # if it ran patched code
                block.go_native(addr, native)
        if not self.native_queue or native.compiling:
            return
        queue = [b for b in self.native_queue if self.blocks.get(b.key) is b]
        self.native_queue.clear()
        if native.full:  # start over; between runs no native code is running
            self.flush()
            native.start_over()
            return
        native.compile_later([(b, self._code_key(b, b.key & ~FS_ON_KEY), b.decoded,
                               b.offsets, b.fp) for b in queue])

    def _code_key(self, block: Block, start: int) -> bytes | None:
        """The key of the code of ``block``, at host offset ``start``: the hash of its
        instructions' bytes, which are all the code depends on (see native_cache); None
        without a disk cache."""
        if not CACHE.enabled:
            return None
        end = start + block.offsets[-1] + block.decoded[-1].length
        return block_key(self.hart.mem.ram[start:end])

    def finish_compiles(self) -> None:
        """Compile every queued block now and install the results: tests use it to make
        tier 2 take over at the same point every time."""
        native = self.native
        while native is not None:
            idle = not native.compiling  # then every result is in, for the next call
            self._compile_native()
            if idle and not native.compiling:
                return
            native.wait_compiles()

    def _step(self, d: Decoded) -> BlockFn | None:
        """A single step in native code (tier 2 checks its semantics one at a time)."""
        step = self.native.step_function(d.insn, d.length)
        if step is None:
            return None
        native, env, addr = self.native, self.native.env, self.native.env_addr
        rd, rs1, rs2, imm = d.rd, d.rs1, d.rs2, d.imm
        declined = interpret(self._ops([d]), (0,))  # e.g. FP in a mode the host lacks

        def run(pc: int) -> int:
            status = step(addr, pc, rd, rs1, rs2, imm)
            if status == jit.DECLINED:
                return declined(pc)
            if status:
                exc = native.take_pending(status)
                exc.index = 0
                raise exc
            return env.pc

        return run

    def decode_block(self, page: int | None, pc: int, mode: int, limit: int = MAX_BLOCK) -> Block:
        """Decode the block at ``pc`` (host page offset ``page``, None for a device)."""
        fs_on = bool(mode & FS_ON_KEY)
        ram = self.hart.mem.ram
        entries = ENTRIES
        decoded: list[Decoded | None] = []
        offsets: list[int] = []
        fp = system = False
        cacheable = page is not None
        straddler = None  # the cache key of a block that is one page-straddling instruction
        off = pc & (PAGE_SIZE - 1)
        start = off
        breakpoints = self.breakpoints if limit == MAX_BLOCK else frozenset()
        alone = self.native is not None  # tier 2: system instructions get a block of their own
        while len(decoded) < limit:
            if breakpoints and decoded and ((pc + off - start) & XLEN_MASK) in breakpoints:
                break  # a breakpoint starts a block of its own
            if page is not None and off + 4 <= PAGE_SIZE:
                bits = _u32(ram, page + off)[0]
                if bits & 3 != 3:
                    bits &= 0xFFFF
                d, length, flags = entries.get(bits) or entry(bits)
            elif page is not None and off + 2 <= PAGE_SIZE:
                half = _u16(ram, page + off)[0]
                if half & 3 != 3:
                    d, length, flags = entry(half)
                elif decoded:
                    break  # the next instruction straddles pages: its own block
                else:
                    word = self._straddling_bits(page, pc)
                    straddler = word | mode
                    if limit == MAX_BLOCK and not breakpoints and \
                            (block := self.straddlers.get(straddler)):
                        if block.native_addr:
                            self._link_straddler(block)
                        return block
                    d, length, flags = entry(word)
                    cacheable = False
            else:
                word = self.hart.mmu.fetch_slow(pc + off - start, 2)
                if word & 3 == 3:
                    word = self.hart.mmu.fetch_slow(pc + off - start, 4)
                d, length, flags = entry(word)
            if flags & NEEDS_FP and not fs_on:
                d, flags = None, 0  # the FP unit is off: FP instructions are illegal
            if decoded and alone and (d is None or flags & SYSTEM):
                break
            decoded.append(d)
            offsets.append(off - start)
            off += length
            if d is None:
                break
            if flags & FP_WRITE:
                fp = True
            system = flags & SYSTEM != 0
            if flags & ENDS_BLOCK or off >= PAGE_SIZE or page is None:
                break
        block = Block(decoded, tuple(offsets), fp, system)
        if pc in breakpoints:
            block.breakpoint = block.special = True
        if limit != MAX_BLOCK or not (cacheable or straddler is not None):
            block.run = interpret(self._ops(decoded), block.offsets)
            if self.native is not None and limit == 1 and decoded[0] is not None:
                block.run = self._step(decoded[0]) or block.run
            elif self.tier != "interp":  # a single step runs tier-1 code too
                self._promote(block, native=False)()
            return block
        if straddler is not None:
            # A straddler is found by its bits, not its pages, so native code, which jumps
            # to its successors without looking, must not run one: it stays on tier 1.
            block.run = self._interpret_later(block, self.tier != "interp", False)
            if len(self.straddlers) >= STRADDLERS_LIMIT:
                self.straddlers.clear()
            self.straddlers[straddler] = block
            if self.native is not None and not block.breakpoint and decoded[-1] is not None \
                    and (addr := self.native.patch_block(
                        block, decoded, block.offsets, fp, None,
                        second_half=straddler >> 16 & 0xFFFF)) is not None:
                block.straddles = (straddler, page + start + mode)
                block.native_addr = addr  # Python runs it on tier 1, native code here
                self._link_straddler(block)
            return block
        key = block.key = page + start + mode
        self.blocks[key] = block
        self.page_blocks.setdefault(page, []).append(key)
        self._watch_code(page, start, off)
        if self.native is not None and not block.breakpoint and decoded[-1] is not None:
            self._first_native(block, page + start)
        else:
            block.run = self._interpret_later(block, self.tier != "interp")
        return block

    def _first_native(self, block: Block, start: int) -> None:
        """A block just decoded (at host offset ``start``), with the native tier on:
        under ``jit``, tier 2's code if an earlier run (or this one) compiled its bytes;
        under ``baseline``, the patched code an earlier run kept for its bytes, placed;
        else code patched from stencils now (and kept, with a code cache). If it stays
        off native code, tier 1 at once if it got that hot before (and native after as
        many runs in all as from the interpreter, so a second run compiles what the first
        did, no more), else the interpreter until it is hot."""
        native = self.native
        code_key = self._code_key(block, start)
        addr = keep = None
        if native.compiles:
            if code_key is not None:
                addr = native.native_for(code_key, block.decoded)
        elif code_key is not None:  # the baseline tier: patched code kept by an earlier run
            kept = jit.PatchedCode.kept(CACHE.patched_code(code_key)) \
                if code_key in CACHE.patched else None
            if kept is not None:
                addr = native.place_block(block, block.decoded, kept, block.key)
            else:
                keep = []
        if addr is None:
            addr = native.patch_block(block, block.decoded, block.offsets, block.fp,
                                      PATCHED_NATIVE_AFTER, key=block.key, keep=keep)
            if keep:
                CACHE.keep_patched(code_key, keep[0])
        if addr is not None:
            block.go_native(addr, native)
            return
        if code_key is not None and code_key in CACHE.translations:
            self._promote(block, code_key=code_key, native_after=HOT_AFTER + NATIVE_AFTER)()
        else:
            block.run = self._interpret_later(block, True, True, code_key)

    def _link_straddler(self, block: Block) -> None:
        """Let native code enter the page-straddling instruction's ``block`` (patched) by
        its first half, as any block, through the block table: its code checks the
        second half. The first half's page is watched, and a write to it unlinks the
        block as it drops that page's blocks."""
        key = block.straddles[1]
        if self.linked_straddlers.get(key) is block:
            return
        self.linked_straddlers[key] = block
        page = (key & ~FS_ON_KEY) - (PAGE_SIZE - 2)
        self.page_blocks.setdefault(page, []).append(key)
        self._watch_code(page, PAGE_SIZE - 2, PAGE_SIZE)
        self.native.remember_block(key, block.native_addr)

    def predecode(self, keys: Iterable[int]) -> int:
        """Decode the blocks at code-cache ``keys`` (host offset of the first instruction
        plus mode bits, as :attr:`blocks` holds them) now rather than on first run; returns
        how many. A restore template warms its clones' cache so, with keys a throwaway
        copy of the guest ran (:mod:`popek.vmm.template`): each block is decoded from
        this hart's RAM, as a run would decode it there, so the keys are only hints, and
        one that is no block start of RAM (or straddles a page) is passed over."""
        decoded = 0
        for key in keys:
            mode = key & FS_ON_KEY
            offset = key - mode
            off = offset & (PAGE_SIZE - 1)
            if key in self.blocks or not 0 <= offset < self.hart.mem.size or \
                    key & ~FS_ON_KEY != offset or off > PAGE_SIZE - 4:
                continue
            self.decode_block(offset - off, off, mode)
            decoded += 1
        return decoded

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
        return self._handle_trap(t.cause, tval, pc)

    def _handle_trap(self, cause: int, tval: int, pc: int) -> int:
        """The hart's trap handler, whose own memory writes are no instruction's."""
        self.executing = False
        self.spin.traps += 1
        try:
            return self.hart.on_trap(cause, tval, pc)
        finally:
            self.executing = True

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

    def _native_successor(self, pc: int) -> int:
        """Native code for ``pc``, decoded and patched now if need be, for a native run
        that found none (see NativeRuntime._successor): its address, or 0 if it has none
        (a device's code, a straddling instruction, a breakpoint, a full code area)."""
        native = self.native
        mode = native.env.decode_mode
        base = self.hart.mmu.tlb_x.get(pc >> 12)
        if base is not None:  # the native fetch TLB, direct-mapped, may have lost it
            self.hart.mmu.refill_mirror(ACCESS_EXEC, pc, base)
            blk = self.blocks.get(base + (pc & 4095) + mode)
            if blk is not None:
                if blk.native is None:
                    return 0
                if blk.key >= 0:  # (the block table's bucket may have let it go)
                    native.remember_block(blk.key, blk.native_addr)
                return blk.native_addr
        blk = self._block_at(pc, base, mode, False)  # decoded now, unless base was None
        if blk.native is None:
            return 0
        if base is None and blk.key >= 0:  # (go_native put a new block in the table)
            native.remember_block(blk.key, blk.native_addr)
        return blk.native_addr

    def _enter(self, blk: Block, pc: int, mode: int, budget: int, instret: int
               ) -> tuple[int, int, Trap | None]:
        """Run native code from ``blk`` on, chaining natively within ``budget``: returns the
        next pc, how many instructions retired, and the trap that stopped it (if any).
        ``instret`` is the count before its first instruction."""
        native = self.native
        env = native.env
        decode_mode = mode
        priv = self.hart.ctl[CTL_PRIV]
        self._native_start = (priv, decode_mode)
        native.instret_base = instret
        native.left_after_system = False
        mode = jit.jump_mode(mode, priv)
        native.remember_jump(pc, mode, blk.native_addr)
        env.mode = mode
        env.decode_mode = decode_mode
        env.budget = budget
        env.executed = 0
        status = blk.native(native.env_addr, pc, blk.native_addr)
        if native.interrupted is not None:
            interrupted, native.interrupted = native.interrupted, None
            raise interrupted
        if status == jit.EXIT:
            return env.pc, env.executed, None
        if status == jit.HOT:  # a patched block ran often enough for tier 2
            self.native_queue.append(native.hot_block())
            return env.pc, env.executed, None
        exc = native.take_pending(status)
        if not isinstance(exc, Trap):
            raise exc
        return env.pc, env.executed, exc

    def _leave_after_system(self, next_pc: int, fallthrough: int) -> bool:
        """Whether native code must return to this loop after a system instruction's
        handler: as the loop does after a system block, it must look at interrupts, the
        privilege and decoding mode, WFI, a jump (xRET) and, if asked, spinning."""
        hart = self.hart
        ctl = hart.ctl
        return (next_pc != fallthrough or ctl[CTL_WFI] != 0 or self._spins
                or (ctl[CTL_PRIV], self._mode_key()) != self._native_start
                or trap_unit.pending_interrupt(hart) is not None)

    def check_interrupts(self, pc: int) -> int:
        cause = trap_unit.pending_interrupt(self.hart)  # already has INTERRUPT_BIT
        if cause is None:
            return pc
        return self._handle_trap(cause, 0, pc)

    def run(self, budget: int, single: bool = False, interrupts: bool = True,
            spins: bool = False) -> int:
        """Execute about ``budget`` instructions (whole blocks); returns how many retired.

        Stops early when the hart waits for an interrupt (WFI), a debugger stops it
        (``debug_stop``) or, if ``spins`` asks to look, it spins (``spun``: see
        :mod:`popek.engine.spin`; a machine asks while other harts wait for the thread).
        ``interrupts`` False leaves pending interrupts for later (a debugger's single step,
        as QEMU's steps without interrupts).
        """
        hart = self.hart
        ctl = hart.ctl
        tlb_x = hart.mmu.tlb_x
        blocks = {} if single else self.blocks  # a single step decodes one instruction afresh
        csr = hart.csr
        pc = hart.pc
        executed = 0
        instret0 = ctl[CTL_INSTRET]
        spin = self.spin
        self.spun = False
        # Where the spin detector looks next, if the hart runs that long without a system
        # instruction (native code stops there; never, unless asked to look).
        checkpoint = SPIN_WINDOW if spins else budget + 1
        glance = 0 if spins else budget + 1  # where a system instruction's block may look
        self._spins = spins
        self.debug_stop = None
        self.executing = True
        try:
            if interrupts:
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
                        if executed >= checkpoint:  # a loop without system instructions
                            checkpoint = executed + SPIN_WINDOW
                            if spin.looped(pc, instret0 + executed):
                                self.spun = True
                                break
                        if blk.special:
                            if blk.native is not None:  # (never a breakpoint's block)
                                pc, retired, trap = self._enter(
                                    blk, pc, mode, min(budget, checkpoint) - executed,
                                    instret0 + executed)
                                executed += retired
                                if trap is not None:
                                    blk = None  # pc is the faulting instruction's already
                                    raise trap
                                if self.native.left_after_system:  # as after a system block
                                    if executed >= glance:
                                        glance = executed + SPIN_GLANCE
                                        if spin.looped(pc, instret0 + executed):
                                            self.spun = True
                                            break
                                    pc = self.check_interrupts(pc)
                                    mode = self._mode_key()
                                    if ctl[CTL_WFI]:
                                        break
                                continue
                            if blk.breakpoint and pc in self.breakpoints:
                                blk = None  # stop before it (an alias may share the block)
                                raise DebugStop("breakpoint", pc)
                            if blk.fp:
                                csr[MSTATUS] |= MSTATUS_FS_DIRTY_SD
                            if blk.system:  # its CSR access may read instret: make it exact
                                if executed >= glance:
                                    glance = executed + SPIN_GLANCE
                                    if spin.looped(pc, instret0 + executed):
                                        self.spun = True
                                        break
                                ctl[CTL_INSTRET] = (instret0 + executed + blk.count - 1) & XLEN_MASK
                        bpc = pc
                        pc = blk.run(pc)
                        executed += blk.count
                        if blk.system:
                            pc = self.check_interrupts(pc)
                            mode = self._mode_key()
                            if ctl[CTL_WFI]:
                                break
                    if self.spun:
                        break
                except Trap as t:
                    if blk is not None:  # the block tells which instruction trapped
                        index = t.index
                        executed += index
                        pc = bpc + blk.offsets[index]
                    if isinstance(t, DebugStop):
                        self.debug_stop = t
                        break
                    pc = self._take(t, pc)
                    mode = self._mode_key()
                    budget -= 1  # a trap is progress too: a trap loop must not pin the host
        finally:
            self.executing = False
            hart.pc = pc
            ctl[CTL_INSTRET] = (instret0 + executed) & XLEN_MASK
        if self.native_queue or self.native_done:
            self._compile_native()
        if self.native is not None and self.native.area_full:  # patched code filled its
            self.flush()  # area: the code cache starts over (between runs, as it must)
            self.native.reset_patched()
        return executed
