"""Copy-and-patch: machine-code stencils from which a block's native code is assembled.

Tier 2 gives a hot block LLVM's best code, at ~2 ms a block; a Linux boot runs ~27,000
distinct blocks, most of them a few times, which never repay that. This baseline tier
makes every block native at its first run, in microseconds (Xu and Kjolstad's
copy-and-patch, as CPython 3.13's JIT): for each instruction there is a *stencil*, its
machine code compiled once with holes where the operands go, and a block's code is the
stencils of its instructions copied one after another with their holes filled in.

The stencils come from the one instruction declaration, through the same lowering as
tier 2's (:mod:`popek.engine.lowering`): each is a function of ``(env, pc0)``, the
signature of tier 2's blocks, whose operands are the addresses of undefined symbols
(``rd``, ``imm``, the instruction's offset in the block, ...). LLVM compiles them with
the small code model, and each hole is declared with the range of its values, so that a
hole is a field of the instruction that uses it (pyelftools reads the relocations): a
register operand is the 32-bit displacement of its slot (``mov rdx, [rax + 8*rs1]``), an
immediate a sign-extended 32-bit immediate, ``next`` and ``chain`` 32-bit relative jumps
(every block lies in one code area), and only host addresses (a run counter, a CSR
window, guest RAM) and instruction bits take 64 bits. Registers stay in memory (each
stencil loads and stores the ones it uses), and each stencil ends by tail-calling the
hole ``next``: the following stencil, which is placed right behind it, so that jump is
cut off. A block's code has tier 2's signature and exits (the jump cache, ``chain``), so
blocks of both tiers chain into each other natively.

The library (every stencil's bytes and holes) is built once per popek version and host
and kept in the code cache's directory; a library whose checksum fails is rebuilt,
never used. Only x86-64 hosts have stencils: elsewhere blocks wait for tier 2 on the
Python tiers, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import marshal
import mmap
import os
import struct
import sys
import weakref
from collections.abc import Iterable
from pathlib import Path
from types import CodeType

from popek.cpu.csr import MIE, MIP, MSTATUS, MSTATUS_FS, WINDOWS
from popek.cpu.state import CTL_PRIV, X_SINK
from popek.engine import hostfp
from popek.engine import irtext as ir
from popek.engine.lowering import I32, I64, Lowering, Operand, Unsupported, reads_pc
from popek.isa.decoder import ALL_INSNS, Decoded
from popek.isa.spec import IMM_RANGES, WRITES_X, Insn

HOST_MACHINES = ("x86_64", "AMD64")
LIBRARY_MAGIC = b"popek stencils 3\n"
U64 = (1 << 64) - 1
# The relocations a stencil's holes come as (ELF x86-64 types): how each field is filled.
R_X86_64_64 = 1  # 64-bit absolute
R_X86_64_PC32 = 2  # 32-bit, relative to the field's address
R_X86_64_PLT32 = 4  # (the same, as a call or jump to a function)
R_X86_64_32 = 10  # 32-bit absolute, zero-extended
R_X86_64_32S = 11  # 32-bit absolute, sign-extended
FIELD_FORMATS = {R_X86_64_64: "Q", R_X86_64_PC32: "i", R_X86_64_PLT32: "i", R_X86_64_32: "I",
                 R_X86_64_32S: "i"}
RELATIVE = (R_X86_64_PC32, R_X86_64_PLT32)
# Holes: what popek patches into a stencil (by symbol name).
OPERAND_HOLES = ("rd", "rs1", "rs2", "imm")
HOLE_OFFSET = "offset"  # the instruction's byte offset in its block (pc = pc0 + offset)
HOLE_INDEX = "index"  # how many of the block's instructions retired before it
HOLE_REF = "ref"  # a fallback's instruction, by jit.fallback_ref
HOLE_NEXT = "next"  # the following stencil
HOLE_CHAIN = "chain"  # the shared exit: the jump cache (jit's chain function)
HOLE_COUNTER = "counter"  # the address of the block's run counter
HOLE_LENGTH = "length"  # the block's instruction count (its end stencil)
HOLE_END = "end"  # the byte offset of the block's end
HOLE_BITS = "bits"  # a page-straddling instruction's bits on its second page
HOLE_RAM = "ram"  # the host address of guest RAM
HOLE_WINDOW = "window"  # a CSR access's window (csr.Window), as WINDOW_FIELDS in memory
HOLES = (*OPERAND_HOLES, HOLE_OFFSET, HOLE_INDEX, HOLE_REF, HOLE_NEXT, HOLE_CHAIN,
         HOLE_COUNTER, HOLE_LENGTH, HOLE_END, HOLE_BITS, HOLE_RAM, HOLE_WINDOW)
REGISTER_HOLES = ("rd", "rs1", "rs2")  # filled with the register's byte offset in its file
SLOT_SHIFT = 3  # a register's byte offset is its number << SLOT_SHIFT
# The values each data hole takes, as LLVM's !absolute_symbol ranges [lo, hi): a hole that
# fits 32 bits is an instruction's immediate or displacement. The rest are host addresses
# or wider (a fallback's ref): 64-bit absolute.
HOLE_RANGES = {"rd": (0, 33 << SLOT_SHIFT), "rs1": (0, 33 << SLOT_SHIFT),
               "rs2": (0, 33 << SLOT_SHIFT), "imm": (-1 << 31, 1 << 31),
               HOLE_OFFSET: (0, 1 << 31), HOLE_INDEX: (0, 1 << 31), HOLE_LENGTH: (0, 1 << 31),
               HOLE_END: (0, 1 << 31), HOLE_BITS: (0, 1 << 16)}
JUMP_HOLES = (HOLE_NEXT, HOLE_CHAIN)  # functions: jumped to, 32-bit relative
# The accumulator: each instruction's stencil hands the value of its destination register
# to the next in a host register (the blocks' third argument), besides storing it, and
# a stencil whose source is the register the previous one wrote has a variant that takes
# it from there (named ``add$rs1``): a chain of dependent instructions waits for no store
# to reach a load. (Only within a block: patching knows which register it holds.)
ACC_SOURCES = ("rs1", "rs2")


def variant_name(name: str, source: str) -> str:
    """The stencil of ``name`` that reads register operand ``source`` from the accumulator."""
    return f"{name}${source}"
# How a CSR window is laid out for native code (64-bit words; sd is MSTATUS_SD for a view
# of mstatus, else 0; dirty what an FP CSR's write sets in mstatus, else 0; min_priv the
# lowest privilege that may access the CSR).
WINDOW_FIELDS = ("slot", "read_mask", "write_mask", "shift", "loud_set", "loud_clear", "wakes",
                 "sd", "dirty", "min_priv")
HOT = 4  # exit status of a block whose run counter reached zero (see jit)
LEAVE = 5  # a system instruction's handler asks native code to return (env.pc is set)
FALLBACK = "fallback"  # an instruction without native semantics: its Python handler
SYSTEM = "system"  # a system instruction: its Python handler, which may ask to leave
COUNT = "count"  # a block's first stencil: counts its runs down to tier 2
FP_DIRTY = "fp_dirty"  # makes FP state dirty, as the engine does before FP blocks
END = "end"  # a block's fall-through exit
STRADDLE = "straddle"  # first in a page-straddling instruction's block: checks its second half
LINKED = "linked"  # where blocks that jump straight to a block enter it: checks the budget
CHAIN_FN = "chain"
CHAIN_SLOW_FN = "chain_slow"  # chain after a jump-cache miss (env.chain_slow)
ENTER_FN = "enter"  # enter(env, pc, code): Python's one way into any block's native code
# Loads and stores that miss the native TLB, and chain when it finds no successor, call
# their Python callback through a thunk that preserves every register (LLVM's
# preserve_most convention), so that their fast paths save none: by the env field that
# holds each thunk's address, the callback's env field, its result and argument types.
THUNKS = {"load_thunk": ("load_slow", I64, (I64, I32, I32)),  # vaddr, size, access
          "store_thunk": ("store_slow", I32, (I64, I32, I64)),  # vaddr, size, value
          "successor_thunk": ("successor", I64, (I64,))}  # pc
SLOW_CC = "preserve_mostcc"


Hole = tuple[int, str, int, int]  # offset in the code, hole name, addend, relocation type


class Stencil:
    """A stencil's machine code and its holes: (offset, hole, addend, relocation type) each.

    ``fill(*values)`` is the code with its holes filled from ``values`` (one argument per
    name in HOLES, in that order; only operands may be negative): one ``struct`` call,
    made for this stencil's holes (patching is the per-block cost of this tier, so it is
    kept to one call per instruction, which takes its values as arguments: no tuple to
    build and index). That function is made at the stencil's first use: making all ~160
    took ~6 ms of every start, and a short program uses a quarter of them."""

    __slots__ = ("code", "holes", "falls", "leaves_rd", "size", "continues", "calls_handler",
                 "chain_field", "chain_holes", "filler", "fill", "via_rs1", "via_rs2")

    def __init__(self, code: bytes, holes: tuple[Hole, ...], falls: bool,
                 leaves_rd: bool = False, filler: CodeType | None = None) -> None:
        self.code = code
        self.holes = holes
        # The compiled source of ``fill`` (see _filler), kept in the library: compiling it
        # took ~70 us, ~15 ms of a short program's start.
        self.filler = filler or compile(_filler_layout(code, holes)[2], "<stencil>", "eval")
        self.falls = falls  # its code ends with the jump to ``next``, cut off here
        # Whether it hands ``next`` the value of register rd (else the accumulator it got).
        self.leaves_rd = leaves_rd
        # Its variants that take that operand from the accumulator (see ACC_SOURCES).
        self.via_rs1: Stencil | None = None
        self.via_rs2: Stencil | None = None
        self.size = len(code)
        # Whether control may go on to the next stencil (else it always leaves the block).
        self.continues = falls or any(hole == HOLE_NEXT for _, hole, _, _ in holes)
        # Whether it may run its instruction's Python handler (the fallback's, FP ones'
        # in a rounding mode the host lacks): then the runtime must know it by HOLE_REF.
        self.calls_handler = any(hole == HOLE_REF for _, hole, _, _ in holes)
        # Where its jump to ``chain`` keeps its distance (-1: it has none), so that a block
        # patched later can be jumped to instead (see CodeArea.aim_jumps).
        self.chain_field = next((off for off, hole, addend, _ in holes
                                 if hole == HOLE_CHAIN and addend == -4), -1)
        # Every jump to ``chain``, (offset, addend) each: code placed elsewhere is aimed
        # again (see jit.PatchedCode).
        self.chain_holes = tuple((off, addend) for off, hole, addend, _ in holes
                                 if hole == HOLE_CHAIN)
        self.fill = self._first_fill

    def _first_fill(self, *values: int) -> bytes:
        fmt, constants, _ = _filler_layout(self.code, self.holes)
        self.fill = eval(self.filler, {"pack": struct.Struct(fmt).pack, **constants})  # noqa: S307
        return self.fill(*values)


def _filler_layout(code: bytes, holes: tuple[Hole, ...]) -> tuple[str, dict[str, bytes], str]:
    """How ``code`` is patched: the ``struct`` format of its bytes, the constant pieces
    between its holes and the source of the function of the hole values that packs them
    (``fill``). A relative field is the target less the field's end (the x86 convention,
    which the addend -4 already holds): the field's address is found from ``next``, where
    this stencil ends. A relative jump to ``next`` itself is a constant."""
    fmt, args, constants, at = "<", [], {}, 0
    size = len(code)
    for off, hole, addend, kind in holes:
        if off > at:
            name = f"c{len(constants)}"
            constants[name] = code[at:off]
            fmt += f"{off - at}s"
            args.append(name)
        field = FIELD_FORMATS[kind]
        fmt += field
        value = f"({hole} << {SLOT_SHIFT})" if hole in REGISTER_HOLES else hole
        if kind in RELATIVE:
            # target + addend - (next - size + off)
            args.append(str(addend + size - off) if hole == HOLE_NEXT else
                        f"{value} - next + {addend + size - off}")
        elif field == "Q":  # (an operand may be negative; every other value lies in [0, 2**64))
            args.append(f"({value} + {addend}) & {U64}" if addend else
                        f"{value} & {U64}" if hole in OPERAND_HOLES else value)
        else:
            args.append(f"{value} + {addend}" if addend else value)
        at = off + struct.calcsize(field)
    if at < size:
        constants["tail"] = code[at:]
        fmt += f"{size - at}s"
        args.append("tail")
    return fmt, constants, f"lambda {', '.join(HOLES)}: pack({', '.join(args)})"


def supported() -> bool:
    return os.uname().machine in HOST_MACHINES and sys.byteorder == "little" and \
        sys.platform == "linux"  # mremap: see CodeArea


def stencil_name(ins: Insn, length: int) -> str:
    """The stencil of ``ins`` at ``length`` bytes: only semantics that read the pc differ."""
    return f"{ins.name}.{length}" if length != 4 and reads_pc(ins.sem) else ins.name


def _symbol(hole: str) -> str:
    return f"hole.{hole}"


def _hole(name: str) -> ir.Value:
    return ir.Value(I64, f"ptrtoint (ptr @{_symbol(name)} to i64)")


# -- building the library ---------------------------------------------------------------------

def call_thunk(em, field: str, args: list[ir.Value]) -> ir.Value:
    """Call the thunk at env ``field`` (see THUNKS) from emitter ``em``'s code."""
    _, ret, _ = THUNKS[field]
    fnty = ir.FunctionType(ret, [em.env.type, *(a.type for a in args)])
    return em.builder.call(em.get(field), fnty, [em.env, *args], cc=SLOW_CC)


def _library_module() -> tuple[str, list[str], set[str]]:
    """The IR of every stencil, their names and those that leave rd in the accumulator."""
    from popek.engine import jit  # the emitters and the chain function; jit imports us lazily

    class StencilEmitter(jit._StepEmitter):
        """One instruction of a block: operands are holes, registers stay in memory; a
        trap records the pc and the instructions retired before it; the block's exits go
        to ``chain``."""

        def __init__(self, fn: ir.Function, length: int) -> None:
            super().__init__(fn, length)
            self.pc0 = fn.args[1]
            self.pc = self.builder.add(self.pc0, _hole(HOLE_OFFSET))
            # A register operand's number, from its hole's byte offset: indexing the
            # register file by it folds back to that offset, a displacement.
            self.register = {h: self.builder.lshr(_hole(h), ir.Constant(I64, SLOT_SHIFT),
                                                  exact=True) for h in REGISTER_HOLES}
            self.acc = fn.args[2]
            self.from_acc = ""  # the register operand this variant reads from ``acc``
            self.reads: set[str] = set()  # the register operands it read
            self.leaves_rd = False  # it hands ``next`` register rd's value

        def read_x(self, reg: ir.Value) -> ir.Value:
            for name in ACC_SOURCES:
                if reg is self.register[name]:
                    self.reads.add(name)
                    if name == self.from_acc:
                        return self.acc
            return super().read_x(reg)

        def _retire(self, count: ir.Value) -> None:
            b = self.builder
            self.set("executed", b.add(b.load(self.field_ptr("executed"), typ=I64), count))

        def trap_exit(self, status: ir.Value) -> None:
            self.set("pc", self.pc)
            self._retire(_hole(HOLE_INDEX))
            self.builder.ret(status)

        def jump(self, target: ir.Value) -> None:
            b = self.builder
            self._retire(b.add(_hole(HOLE_INDEX), ir.Constant(I64, 1)))
            self.tail(HOLE_CHAIN, target)

        def tail(self, callee: str, pc: ir.Value) -> None:
            # (rd's value as stored: LLVM forwards the store, where one reaches here)
            acc = self.read_state("x", self.register["rd"]) if \
                self.leaves_rd and callee == HOLE_NEXT else self.acc
            jit.tail_call(self.builder, ir.Value(ir.PTR, f"@{_symbol(callee)}"), self.env, pc,
                          acc)

        def _slow_access(self, field: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
            return call_thunk(self, "load_thunk" if field == "load_slow" else "store_thunk",
                              args)

        def run_handler(self) -> bool:
            b = self.builder
            done = b.append_basic_block("handled")
            self._check(self._callback("exec_slow", I32, [_hole(HOLE_REF), self.pc]), done)
            b.position_at_end(done)
            return True

        def run_system(self) -> None:
            """The instruction's Python handler (``exec_system``), then on, out to the
            engine (``LEAVE``) or a trap: ends the IR block."""
            b = self.builder
            status = self._callback("exec_system", I32, [_hole(HOLE_REF), self.pc])
            on_bb, leave_bb, trap_bb = (b.append_basic_block(n) for n in ("on", "leave",
                                                                            "trapped"))
            b.cbranch(b.icmp_unsigned("==", status, ir.Constant(I32, jit.EXIT)), on_bb, leave_bb)
            b.position_at_end(leave_bb)
            left_bb = b.append_basic_block("left")
            b.cbranch(b.icmp_unsigned("==", status, ir.Constant(I32, LEAVE)), left_bb, trap_bb)
            b.position_at_end(left_bb)
            self._retire(b.add(_hole(HOLE_INDEX), ir.Constant(I64, 1)))
            b.ret(ir.Constant(I32, jit.EXIT))
            b.position_at_end(trap_bb)
            self.trap_exit(status)
            b.position_at_end(on_bb)
            self.tail(HOLE_NEXT, self.pc0)

        def csr_op(self, csr: ir.Value, kind: int, value: ir.Value, do_read: ir.Value,
                   do_write: ir.Value) -> ir.Value:
            """A CSR access through its window (the hole, chosen by the CSR number when
            the block is patched): quiet ones here, the rest (a write that must do more
            than store, too low a privilege) through the handler, as the system stencil."""
            b = self.builder
            window = b.cast("inttoptr", _hole(HOLE_WINDOW), ir.PTR)
            slot, rmask, wmask, shift, loud_set, loud_clear, wakes, sd, dirty, min_priv = (
                b.load(b.gep(window, [ir.Constant(I64, i)], inbounds=True, source_etype=I64),
                       typ=I64) for i in range(len(WINDOW_FIELDS)))
            zero = ir.Constant(I64, 0)
            fs = ir.Constant(I64, MSTATUS_FS)

            def with_sd(status: ir.Value) -> ir.Value:  # SD summarizes FS (sd: 0 or SD)
                dirty = b.icmp_unsigned("==", b.and_(status, fs), fs)
                return b.or_(b.and_(status, b.not_(sd)), b.select(dirty, sd, zero))

            stored = self.read_state("csr", slot)
            old = b.and_(b.lshr(with_sd(stored), shift), rmask)
            written = value if kind == 0 else b.or_(old, value) if kind == 1 else \
                b.and_(old, b.not_(value))
            new = with_sd(b.or_(b.and_(stored, b.not_(b.shl(wmask, shift))),
                                b.shl(b.and_(written, wmask), shift)))
            changed = b.xor(stored, new)
            loud = b.or_(b.and_(b.and_(changed, new), loud_set),
                         b.and_(b.and_(changed, stored), loud_clear))
            pending = b.and_(self.read_state("csr", MIP), self.read_state("csr", MIE))
            woken = b.and_(b.icmp_unsigned("!=", b.and_(b.and_(changed, new), wakes), zero),
                           b.icmp_unsigned("!=", pending, zero))
            mstatus = self.read_state("csr", MSTATUS)
            fp_off = b.and_(b.icmp_unsigned("!=", dirty, zero),
                            b.icmp_unsigned("==", b.and_(mstatus, fs), zero))
            refused = b.or_(fp_off, b.icmp_unsigned("<", self.read_state("ctl", CTL_PRIV),
                                                    min_priv))
            slow = b.or_(refused, b.and_(do_write, b.or_(
                b.icmp_unsigned("!=", loud, zero), woken)))
            slow_bb, quiet_bb = b.append_basic_block("csr.slow"), b.append_basic_block("csr.quiet")
            b.cbranch(slow, slow_bb, quiet_bb)
            b.position_at_end(slow_bb)
            self.run_system()
            b.position_at_end(quiet_bb)
            self.write_state("csr", slot, b.select(do_write, new, stored))
            with b.if_then(b.and_(do_write, b.icmp_unsigned("!=", dirty, zero))):
                self.write_state("csr", MSTATUS, b.or_(self.read_state("csr", MSTATUS), dirty))
            return b.select(do_read, old, zero)

    module = ir.Module(name="stencils")
    names: list[str] = []

    def function(name: str) -> StencilEmitter:
        fn = ir.Function(module, jit.BLOCK_TYPE, name)
        fn.attributes.update(("nounwind", '"no-jump-tables"="true"'))
        names.append(name)
        return StencilEmitter(fn, 4)

    leaving: set[str] = set()  # the stencils that leave rd's value in the accumulator

    def instruction(ins: Insn, length: int, name: str, from_acc: str = "") -> StencilEmitter:
        """The stencil ``name`` of ``ins`` (raises Unsupported, leaving no function)."""
        em = function(name)
        em.from_acc = from_acc
        em.leaves_rd = ins.fmt in WRITES_X
        reg = (0, X_SINK) if ins.fmt in WRITES_X else (0, 31)
        operands = {"rd": Operand(em.register["rd"], *reg),
                    "rs1": Operand(em.register["rs1"], 0, 31),
                    "rs2": Operand(em.register["rs2"], 0, 31),
                    "imm": Operand(_hole("imm"), *IMM_RANGES[ins.fmt])}
        mark = len(module.functions)
        try:
            falls = Lowering(em, operands, em.pc, length).lower(ins.sem)
        except Unsupported:
            del module.functions[mark - 1:]
            names.pop()
            raise
        if falls:
            em.tail(HOLE_NEXT, em.pc0)
        if em.leaves_rd:
            leaving.add(name)
        return em

    seen: set[str] = set()
    for ins in ALL_INSNS:
        if "system" in ins.flags and ins.fmt != "CSR":
            continue  # system instructions run in blocks of their own, through Python
        for length in (4, 2):
            name = stencil_name(ins, length)
            if name in seen:
                continue
            try:
                em = instruction(ins, length, name)
            except Unsupported:
                break
            seen.add(name)
            if "system" not in ins.flags:  # (a CSR access is alone in its block)
                for source in ACC_SOURCES:
                    if source in em.reads:
                        instruction(ins, length, variant_name(name, source), source)

    em = function(FALLBACK)
    em.run_handler()
    em.tail(HOLE_NEXT, em.pc0)

    em = function(SYSTEM)
    em.run_system()

    em = function(FP_DIRTY)
    mstatus = em.read_state("csr", jit.MSTATUS)
    em.write_state("csr", jit.MSTATUS, em.builder.or_(
        mstatus, ir.Constant(I64, jit.MSTATUS_FS_DIRTY_SD)))
    em.tail(HOLE_NEXT, em.pc0)

    em = function(COUNT)
    b = em.builder
    slot = ir.Value(ir.PTR, f"@{_symbol(HOLE_COUNTER)}")
    left = b.sub(b.load(slot, typ=I64), ir.Constant(I64, 1))
    b.store(left, slot)
    with b.if_then(b.icmp_unsigned("==", left, ir.Constant(I64, 0)), likely=False):
        em.set("pc", em.pc0)
        # (through an empty asm: LLVM 22 would store the address as a 32-bit immediate,
        # whatever its code model)
        em.set("tval", b.asm(I64, "", "=r,0", [_hole(HOLE_COUNTER)]))
        b.ret(ir.Constant(I32, HOT))
    em.tail(HOLE_NEXT, em.pc0)

    for name, ret, args in THUNKS.values():
        thunk = ir.Function(module, ir.FunctionType(ret, [ir.PTR, *args]), name)
        thunk.calling_convention = SLOW_CC
        thunk.attributes.add("nounwind")
        names.append(name)
        te = jit._Emitter(thunk)
        te.builder.ret(te._callback(name, ret, thunk.args[1:]))

    em = function(STRADDLE)
    b = em.builder
    # The block's one instruction straddles two pages; native code reaches it by its first
    # half (the jump cache, the block table), so it runs only if the second half, fetched
    # through the native fetch TLB, is still what it was decoded from. Otherwise Python,
    # which looks the block up by both halves, runs it.
    second = b.add(em.pc0, ir.Constant(I64, 2))
    vpn = b.lshr(second, ir.Constant(I64, 12))
    entry = b.gep(em.get("tlb_x"), [b.and_(vpn, ir.Constant(I64, jit.TLB_ENTRIES - 1))],
                  inbounds=True, source_etype=jit.TLB_ENTRY)
    mapped_bb, same_bb, leave_bb = (b.append_basic_block(n) for n in ("mapped", "same", "leave"))
    b.cbranch(b.icmp_unsigned("==", b.load(entry, typ=I64), b.add(vpn, ir.Constant(I64, 1))),
              mapped_bb, leave_bb)
    b.position_at_end(mapped_bb)
    page = b.load(b.gep(entry, [ir.Constant(I64, 1)], inbounds=True, source_etype=I64), typ=I64)
    host = b.add(b.add(_hole(HOLE_RAM), page), b.and_(second, ir.Constant(I64, 4095)))
    bits = b.load(b.cast("inttoptr", host, ir.PTR), typ=ir.IntType(16), align=1)
    b.cbranch(b.icmp_unsigned("==", b.zext(bits, I64), _hole(HOLE_BITS)), same_bb, leave_bb)
    b.position_at_end(leave_bb)
    em.set("pc", em.pc0)
    b.ret(ir.Constant(I32, jit.EXIT))
    b.position_at_end(same_bb)
    em.tail(HOLE_NEXT, em.pc0)

    em = function(LINKED)
    b = em.builder
    # A block's exit to a block on its own page jumps straight here, past the jump cache
    # (as QEMU chains translation blocks), so the budget is checked here instead.
    executed = b.load(em.field_ptr("executed"), typ=I64)
    with b.if_then(b.icmp_signed("<", executed, b.load(em.field_ptr("budget"), typ=I64))):
        em.tail(HOLE_NEXT, em.pc0)
    em.set("pc", em.pc0)
    b.ret(ir.Constant(I32, jit.EXIT))

    em = function(END)
    b = em.builder
    em._retire(_hole(HOLE_LENGTH))
    em.tail(HOLE_CHAIN, b.add(em.pc0, _hole(HOLE_END)))

    chain = jit._chain(module, slow="chain_slow")
    chain.linkage = ""
    names.append(CHAIN_FN)
    jit._chain_slow(module, CHAIN_SLOW_FN,
                    lambda em, target: call_thunk(em, "successor_thunk", [target]))
    names.append(CHAIN_SLOW_FN)

    enter = ir.Function(module, jit.ENTER_TYPE, ENTER_FN)
    enter.attributes.add("nounwind")
    names.append(ENTER_FN)
    b = ir.IRBuilder(enter.append_basic_block("entry"), enter)
    code = b.cast("inttoptr", enter.args[2], ir.PTR)
    b.ret(b.call(code, jit.BLOCK_TYPE, [*enter.args[:2], jit.NO_ACC], tail="tail"))

    return f"{module}\n{_hole_declarations()}", names, leaving


def _hole_declarations() -> str:
    """The holes as undefined symbols: data holes with the ranges of their values (LLVM
    makes a field of 32 bits of a hole that fits them, else of 64), ``next`` and ``chain``
    as functions."""
    decls, ranges = [], []
    for h in HOLES:
        if h in JUMP_HOLES:
            decls.append(f"declare dso_local i32 @{_symbol(h)}(ptr, i64)")
            continue
        # (-1, -1): any 64-bit value, which the large code model must also be told (else
        # LLVM would reach it relative to the code)
        lo, hi = HOLE_RANGES.get(h, (-1, -1))
        large = "" if h in HOLE_RANGES else ', code_model "large"'
        decls.append(f"@{_symbol(h)} = external dso_local global i8{large}, "
                     f"!absolute_symbol !{len(ranges)}")
        ranges.append(f"!{len(ranges)} = !{{i64 {lo}, i64 {hi}}}")
    return "\n".join(decls + ranges) + "\n"


def _compile(text: str) -> bytes:
    """Object code for the stencils' IR: optimized, small code model (see
    _hole_declarations), no PIC."""
    from popek.engine import jit
    llvm = jit.binding()
    target = llvm.Target.from_default_triple().create_target_machine(
        opt=2, reloc="static", codemodel="small")
    mod = llvm.parse_assembly(text)
    mod.verify()
    pb = llvm.create_pass_builder(target, llvm.PipelineTuningOptions(speed_level=2))
    pb.getModulePassManager().run(mod, pb)
    return target.emit_object(mod)


def _extract(obj: bytes, names: Iterable[str]) -> dict[str, Stencil]:
    """Each stencil's bytes and holes, read from the ELF object ``obj``."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    elf = ELFFile(io.BytesIO(obj))
    symtab = elf.get_section_by_name(".symtab")
    functions = {s.name: s for s in symtab.iter_symbols() if s["st_info"]["type"] == "STT_FUNC"}
    wanted = set(names)
    relocations: dict[int, list] = {}  # by the index of the section they apply to
    for section in elf.iter_sections():
        if isinstance(section, RelocationSection):
            relocations.setdefault(section["sh_info"], []).extend(section.iter_relocations())
    stencils: dict[str, Stencil] = {}
    for name in wanted:
        sym = functions[name]
        start, size = sym["st_value"], sym["st_size"]
        shndx = sym["st_shndx"]
        code = elf.get_section(shndx).data()[start:start + size]
        holes = []
        for rel in relocations.get(shndx, ()):
            off = rel["r_offset"] - start
            if not 0 <= off < size:
                continue
            target = symtab.get_symbol(rel["r_info_sym"])
            hole = target.name.removeprefix("hole.")
            kind = rel["r_info_type"]
            if kind not in FIELD_FORMATS or hole not in HOLES or \
                    (kind in RELATIVE) != (hole in JUMP_HOLES):
                raise Unsupported(f"stencil {name}: relocation {kind} "
                                  f"against {target.name or 'a section'}")
            holes.append((off, hole, rel["r_addend"], kind))
        falls = False
        # A tail call to ``next`` at the very end (jmp rel32) is cut: the next stencil
        # follows.
        for off, hole, _, _ in holes:
            if hole == HOLE_NEXT and off + 4 == size and code[off - 1] == 0xE9:
                code = code[:off - 1]
                holes = [h for h in holes if h[0] != off]
                falls = True
                break
        stencils[name] = Stencil(bytes(code), tuple(sorted(holes)), falls)
    return stencils


def build() -> dict[str, Stencil]:
    text, names, leaving = _library_module()
    stencils = _extract(_compile(text), names)
    for name in leaving:
        stencils[name].leaves_rd = True
    return _with_variants(stencils)


def _with_variants(stencils: dict[str, Stencil]) -> dict[str, Stencil]:
    """``stencils``, each knowing its accumulator variants (Stencil.via_rs1, via_rs2)."""
    for name, stencil in stencils.items():
        base, _, source = name.partition("$")
        if source:
            setattr(stencils[base], f"via_{source}", stencil)
    return stencils


# -- the library on disk ----------------------------------------------------------------------

def library_version() -> str:
    """What shapes the stencils: popek's engine, isa and cpu source, llvmlite, the host
    (and the instructions its FP code uses beyond x86-64's baseline)."""
    from popek.engine.jit import llvmlite_version
    from popek.engine.native_cache import source_version
    return source_version(f"stencils llvmlite {llvmlite_version()} {os.uname().machine} "
                          f"{hostfp.FEATURES}")


def encode(stencils: dict[str, Stencil]) -> bytes:
    body = marshal.dumps({n: (s.code, s.holes, s.falls, s.leaves_rd, s.filler)
                          for n, s in stencils.items()})
    return LIBRARY_MAGIC + hashlib.blake2b(body, digest_size=32).digest() + body


def decode(data: bytes) -> dict[str, Stencil] | None:
    """The stencils in ``data``, or None if it is not an intact library."""
    head = len(LIBRARY_MAGIC)
    if data[:head] != LIBRARY_MAGIC:
        return None
    digest, body = data[head:head + 32], data[head + 32:]
    if hashlib.blake2b(body, digest_size=32).digest() != digest:
        return None
    try:
        table = marshal.loads(body)
        return _with_variants({
            n: Stencil(code, tuple(map(tuple, holes)), falls, leaves_rd, filler)
            for n, (code, holes, falls, leaves_rd, filler) in table.items()})
    except (ValueError, TypeError, EOFError):
        return None


def library_path(root: Path) -> Path:
    return root / f"stencils-{library_version()}.bin"


_library: dict[str, Stencil] | None = None  # the process's, once read or built


def library(root: Path | None, spawn: bool = True) -> dict[str, Stencil]:
    """The stencil library: read from ``root`` (the code cache's directory) if an intact
    copy is there, else built (about a second, with LLVM) and, with a ``root``, kept
    there. A process reads or builds it once (a VMM worker inherits it from its fork
    server). With ``spawn``, a child process builds it, so that LLVM's ~100 MiB are
    never mapped into a run whose code never gets hot enough for tier 2 (a confined
    process may not start one)."""
    global _library
    if _library is None:
        _library = _read_or_build(root, spawn)
    return _library


def _built_by_child() -> dict[str, Stencil] | None:
    """The library as ``python -m popek.engine.stencils`` builds it, or None if that
    failed (then the caller builds it itself)."""
    import subprocess  # ~3 ms of import that a run with the library on disk never needs

    try:
        done = subprocess.run([sys.executable, "-m", __name__], capture_output=True,
                              timeout=300, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return decode(done.stdout) if done.returncode == 0 else None


def _read_or_build(root: Path | None, spawn: bool) -> dict[str, Stencil]:
    path = library_path(root) if root is not None else None
    if path is not None:
        try:
            stencils = decode(path.read_bytes())
        except OSError:
            stencils = None
        if stencils is not None:
            return stencils
    stencils = (_built_by_child() if spawn else None) or build()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
            tmp.write_bytes(encode(stencils))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache: built again next time
    return stencils


# -- executable memory ------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p)
_libc.mremap.restype = ctypes.c_void_p
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MAP_FAILED = ctypes.c_void_p(-1).value
# Linux's (the mmap module has no names for them)
_MAP_FIXED = 0x10
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def _checked(addr: int | None, call: str) -> int:
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"{call}: {os.strerror(err)}")
    return addr


def _shared_memory(size: int, at: int = 0) -> int:
    """New shared anonymous memory of ``size`` bytes, readable and writable, at ``at``
    (replacing what is there; 0: where the kernel chooses). Memory with no file behind it,
    unlike a memfd, is not bound by the process's file-size limit (RLIMIT_FSIZE)."""
    flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | (_MAP_FIXED if at else 0)
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    return _checked(_libc.mmap(at or None, size, rw, flags, -1, 0), "mmap")


def _map_views(size: int, executable: int, writable: int, memory: int = 0) -> tuple[int, int]:
    """Shared memory of ``size`` bytes, mapped twice: read+execute at ``executable`` and
    read+write at ``writable`` (replacing what is there; 0: where the kernel chooses);
    returns both addresses. The memory is new, or ``memory`` (from _shared_memory), moved."""
    if memory:
        executable = _checked(_libc.mremap(memory, size, size, _MREMAP_MAYMOVE | (
            _MREMAP_FIXED if executable else 0), executable or None), "mremap")
    else:
        executable = _shared_memory(size, executable)
    # mremap of a shared mapping with old size 0 maps the same pages once more
    writable = _checked(_libc.mremap(executable, 0, size, _MREMAP_MAYMOVE | (
        _MREMAP_FIXED if writable else 0), writable or None), "mremap")
    if _libc.mprotect(executable, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect: {os.strerror(err)}")
    return executable, writable


def _unmap(addresses: list[int], size: int) -> None:
    for addr in addresses:
        _libc.munmap(addr, size)


class CodeArea:
    """Memory for patched code: shared memory mapped twice, readable and executable at
    ``address`` (where code runs) and readable and writable elsewhere (where popek writes
    it), so no address is ever writable and executable, yet code runs as soon as it is
    written. (Sealing written code with an mprotect pair cost ~8 us, as much as a new
    block's first run on the interpreter, so blocks used to wait for batched seals on the
    interpreter and exit native code until then.) Code is written only while no thread
    runs it.

    popek exec forks for the guest's fork: shared memory would make parent and child
    patch each other's code (patching changes code already there: see
    jit.NativeRuntime._link), so each area is copied to new memory just before a fork,
    which the parent then takes, leaving the old to the child: neither copies what the
    other may be changing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self.address = self._writable = 0
        self._copy = 0  # the copy made for a fork (see _copy_before_fork)
        self._map()
        # Unmapped when collected, or never: at exit another thread may still run it.
        weakref.finalize(self, _unmap, [self.address, self._writable], size).atexit = False
        _AREAS.add(self)

    def _map(self, memory: int = 0) -> None:
        """Map new, empty memory (or ``memory``) at this area's addresses (or new ones)."""
        self.address, self._writable = _map_views(self.size, self.address, self._writable,
                                                  memory)
        self.memory = memoryview((ctypes.c_char * self.size).from_address(self._writable)
                                 ).cast("B")

    def _copy_before_fork(self) -> None:
        self._copy = _shared_memory(self.size)
        ctypes.memmove(self._copy, self._writable, self.used)

    def _take_copy(self) -> None:
        """In the parent after a fork: run from the copy; the child keeps the original."""
        copy, self._copy = self._copy, 0
        self._map(copy)

    def _drop_copy(self) -> None:
        _unmap([self._copy], self.size)
        self._copy = 0

    def free(self) -> int:
        return self.size - self.used

    def next_address(self) -> int:
        """Where the next code goes (16-byte aligned)."""
        return self.address + self.used + (-self.used % 16)

    def write(self, code: bytes) -> int:
        """Write ``code`` at ``next_address()`` (returned), where it may run at once."""
        at = self.used
        pad = -at % 16
        if pad:
            self.memory[at:at + pad] = b"\xcc" * pad  # int3 between blocks
            at += pad
        self.memory[at:at + len(code)] = code
        self.used = at + len(code)
        return self.address + at

    def overwrite(self, addr: int, code: bytes) -> None:
        """Replace the code at ``addr`` with ``code``."""
        at = addr - self.address
        self.memory[at:at + len(code)] = code

    def aim_jumps(self, fields: list[int], target: int) -> None:
        """Make the relative jumps whose fields are at addresses ``fields`` go to
        ``target`` (the field holds the distance from its end)."""
        memory, origin = self.memory, self.address
        for field in fields:
            pack_i32(memory, field - origin, target - field - 4)

    def holds(self, addr: int) -> bool:
        return self.address <= addr < self.address + self.used

    def reset(self) -> None:
        """Forget every block (only when none can run again)."""
        self.used = 0


pack_i32 = struct.Struct("<i").pack_into
_AREAS: weakref.WeakSet[CodeArea] = weakref.WeakSet()


def _copy_areas_before_fork() -> None:
    for area in list(_AREAS):
        area._copy_before_fork()


def _take_copies() -> None:
    for area in list(_AREAS):
        area._take_copy()


def _drop_copies() -> None:
    for area in list(_AREAS):
        area._drop_copy()


os.register_at_fork(before=_copy_areas_before_fork, after_in_parent=_take_copies,
                    after_in_child=_drop_copies)


JUMP_SIZE = 12  # movabs $target, %rax; jmp *%rax


def jump_to(target: int) -> bytes:
    """x86-64 code that jumps to ``target``, leaving the arguments' registers alone."""
    return b"\x48\xb8" + struct.pack("<Q", target) + b"\xff\xe0"


def stencil_for(library: dict[str, Stencil], d: Decoded) -> Stencil:
    """The stencil of instruction ``d``: its own, or one that runs its Python handler (the
    system stencil for system instructions, in blocks of their own, except accesses to
    CSRs that have a window)."""
    ins = d.insn
    if "system" in ins.flags:
        windowed = ins.fmt == "CSR" and d.imm in WINDOWS and library.get(ins.name)
        return windowed or library[SYSTEM]
    # The library names a compressed instruction's own stencil only if its semantics read
    # the pc (stencil_name): looked up, not found again by parsing them (~2 ms of a short
    # program, ~10 ms of a boot).
    own = library.get(f"{ins.name}.{d.length}") if d.length != 4 else None
    return own or library.get(ins.name) or library[FALLBACK]


if __name__ == "__main__":  # the library, built for a parent that keeps LLVM out (library)
    sys.stdout.buffer.write(encode(build()))
