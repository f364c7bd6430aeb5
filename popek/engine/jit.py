"""The native tiers' runtime, and tier 2: hot blocks compiled to native code through LLVM.

:class:`NativeRuntime` is what native code of both native tiers runs against: the
baseline tier's blocks, patched from stencils at first sight (:mod:`popek.engine.stencils`),
and tier 2's, compiled by LLVM (llvmlite) once a block is hot. They share one calling
convention, one jump cache and block table, and the callbacks below, so blocks of
either tier chain into each other natively.

Each block becomes one native function ``status = block(env, pc)``, lowered from the
instruction semantics by :mod:`popek.engine.lowering`. ``env`` is a small structure the
runtime shares with native code: pointers to the hart's registers and CSRs, the native
TLB (a direct-mapped copy of the software TLB, kept coherent through the MMU's mirror
hook; unlike the MMU's dicts it keeps global translations when the address space
changes), the jump cache, the instruction budget, and where to leave the exit pc and a
trap. Native code does the TLB hit path of loads and stores itself and calls back into
Python only for misses, devices and page-crossing accesses, and for instructions whose
semantics it does not lower (FP arithmetic): those run through their Python handler.

Dispatch stays native: a block's exit looks its successor up in the jump cache (virtual
pc to function) and tail-calls it while budget remains; only a miss returns to Python,
which finds or compiles the block and records it there. The jump cache is emptied
whenever a translation, the decoding mode or code may have changed, so a hit needs no
further checks. Native code is never freed while it may run: when the code cache is
full, the whole compiler is replaced between runs.

Hot blocks are compiled in batches: the vCPU thread writes a batch's IR (Python, which
needs the GIL anyway) and the compiler thread (:mod:`popek.engine.compiler_thread`) does
LLVM's part beside it, while the blocks keep running on tier 1; the engine installs the
results between runs.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import NamedTuple

from popek.cpu.causes import ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE, Trap
from popek.cpu.csr import MSTATUS_SD, WINDOWS
from popek.cpu.physmem import PAGE_SIZE
from popek.cpu.state import CTL_INSTRET, X_SINK, XLEN_MASK
from popek.engine import hostfp, stencils
from popek.engine import irtext as ir
from popek.engine.compiler_thread import COMPILER, LLVM_LOCK
from popek.engine.lowering import (
    I32,
    I64,
    Lowering,
    Operand,
    Unsupported,
    hands_over,
    reads_pc,
)
from popek.engine.native_cache import CACHE, Record
from popek.isa.decoder import Decoded
from popek.isa.spec import IMM_RANGES, WRITES_X, Insn

# llvmlite's binding, imported by the first native runtime: loading it maps about 100 MiB
# of LLVM's library, which the other tiers never use. Without llvmlite popek runs on tier 1.
llvm: ModuleType | None = None

# Per access kind; direct-mapped on the virtual page number. With 1,024, Lua's stack and a
# page of its heap 0x881e pages apart shared a slot: ~19,000 misses a run (now ~1,700).
TLB_ENTRIES = 4096
LOCAL_SLOTS = 4 * TLB_ENTRIES  # local fills remembered; beyond, flush_local empties all
# The jump cache: JUMP_PAGE_BITS of a bucket's index hash the virtual page, the rest hash
# the offset in the page (as QEMU's tb_jmp_cache), so the entries of one page are one run
# of buckets: an sfence.vma of a page (Linux issues thousands in a boot) clears them
# alone, and native chaining elsewhere goes on.
JUMP_BITS = 12  # buckets
JUMP_PAGE_BITS = 6
JUMP_OFFSET_BITS = JUMP_BITS - JUMP_PAGE_BITS
JUMP_WAYS = 2  # entries per bucket: two hot blocks that hash alike must not evict each other
JUMP_ENTRIES = JUMP_WAYS << JUMP_BITS
JUMP_HASH = 0x9E3779B97F4A7C15  # Fibonacci hashing: nearby and strided pages spread out
# The block table: native code by code-cache key (host offset of the first instruction
# plus decoding mode), as the engine's dict of blocks holds them. Behind the jump cache:
# after a flush (every satp write, a context switch) a successor that misses is found
# here through the native fetch TLB, without a return to Python.
BLOCK_BITS = 14  # buckets
BLOCK_WAYS = 4
U64 = (1 << 64) - 1
CODEGEN_LEVEL = 0  # LLVM's fast instruction selection: measured as fast as -O2 code on the
# benchmark programs once the IR is optimized, at a fraction of the compile time
MAX_NATIVE_BLOCKS = 20_000  # then the code cache starts over
MSTATUS = 0x300
MSTATUS_FS_DIRTY_SD = (3 << 13) | (1 << 63)

# Jump-cache tags are pc | 1 xor the privilege and the FP-unit bit, placed in bits 58-62:
# two pcs never differ in those bits alone (virtual pcs are canonical, so bits 57-63 are
# equal; physical ones are below 2**56), so tags stay unique.
PRIV_TAG_SHIFT = 58


def jump_mode(decode_mode: int, priv: int) -> int:
    """The mode bits of jump-cache tags: the block cache's decoding mode and privilege."""
    return decode_mode | priv << PRIV_TAG_SHIFT


I8 = ir.IntType(8)
TLB_ENTRY = ir.Type("{i64, i64}")  # tag (virtual page number + 1), host page address
JUMP_BUCKET = ir.Type(f"[{JUMP_WAYS} x {TLB_ENTRY}]")  # ways of (tag, function address)
BLOCK_BUCKET = ir.Type(f"[{BLOCK_WAYS} x {TLB_ENTRY}]")  # ways of (key | 1, function address)
# status = block(env, pc, acc): ``acc`` is the value of the register the previous
# instruction wrote, which a patched block's stencils hand on (see stencils.ACC); a block
# ignores it on entry.
BLOCK_TYPE = ir.FunctionType(I32, [ir.PTR, I64, I64])
NO_ACC = ir.Value(I64, "undef")
ENTER_TYPE = ir.FunctionType(I32, [ir.PTR, I64, I64])  # status = enter(env, pc, code)
CHAIN = "chain"

# Exit statuses of native code.
EXIT = 0  # env.pc is the next pc
TRAP_PENDING = 1  # a callback caught a Trap; it waits in NativeRuntime.pending
EXCEPTION = 2  # a callback caught another exception; re-raised after the run
TRAP_NATIVE = 3  # native code raised a trap: env.cause and env.tval
HOT = stencils.HOT  # a patched block's run counter reached zero: env.tval is the counter
DECLINED = 6  # a single step leaves its instruction to the Python handler (see run_handler)

STENCIL_AREA = 64 << 20  # bytes of patched code before the code cache starts over
STENCIL_BLOCKS = 1 << 16  # run counters, one per patched block
STATIC_JUMPS = frozenset({"B", "J"})  # formats whose jump target is pc + imm
# What patching an instruction takes, the same for all of its kind (NativeRuntime._choose):
# its stencil, CHOSE_ flags and its CSR window's address (0 for none).
Choice = tuple[stencils.Stencil, int, int]
CHOSE_FALLBACK = 1  # its stencil calls its Python handler (stencils.FALLBACK)
CHOSE_SYSTEM = 2  # a system instruction
CHOSE_STATIC_JUMP = 4  # it jumps to pc + imm
CHOSE_REF = 8  # native code may hand it to its Python handler, by its ref (fallback_ref)
CHOSE_ENDS_BLOCK = 16  # it ends its block
CHOSE_CSR = 32  # a CSR access: its kind includes its CSR
CHOSE_VARIANTS = 64  # its stencil has variants that read a source from the accumulator
CHOSE_LEAVES_RD = 128  # its stencil leaves rd's value in the accumulator

ENV_FIELDS = ("x", "f", "ctl", "csr", "tlb_r", "tlb_w", "jumps", "mode", "budget", "executed",
              "pc", "cause", "tval", "status", "load_slow", "store_slow", "exec_slow", "tlb_x",
              "blocks", "decode_mode", "exec_system", "load_thunk", "store_thunk", "successor",
              "successor_thunk", "chain_slow")
_F = {name: i for i, name in enumerate(ENV_FIELDS)}


class Env(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ENV_FIELDS]


LOAD_SLOW = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32)
STORE_SLOW = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64)
EXEC_SLOW = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint64)
SUCCESSOR = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)
BLOCK_FN = ctypes.PYFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint64)
ENTER_FN = ctypes.PYFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)
STEP_FN = ctypes.PYFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                            ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64)


@dataclass
class NativeStats:
    """What the native tiers did in this process (``--stats``, the benchmarks)."""

    patched: int = 0  # blocks made from stencils
    patch_seconds: float = 0.0  # spent patching them
    placed: int = 0  # blocks placed from patched code an earlier run kept
    place_seconds: float = 0.0  # spent placing them
    compiled: int = 0  # blocks compiled by LLVM (tier 2)

    def summary(self) -> str:
        each = self.patch_seconds / self.patched * 1e6 if self.patched else 0.0
        placing = self.place_seconds / self.placed * 1e6 if self.placed else 0.0
        return (f"popek: native code: {self.patched} blocks patched from stencils "
                f"({each:.1f} us each), {self.compiled} blocks compiled by LLVM, "
                f"{self.placed} blocks placed from kept patched code ({placing:.1f} us each)")


STATS = NativeStats()


class PatchedCode(NamedTuple):
    """A block's patched code as a later run places it (native_cache keeps it by the key of
    the block's instructions): in the baseline tier, everything in it but its jumps to
    ``chain`` (and to blocks aimed at instead) follows from those instructions' bytes, so
    placing it is copying it and aiming those jumps (NativeRuntime.place_block)."""

    code: bytes  # from the block's start (the check that blocks jumping here pass)
    # offset, addend, and the distance from the block's start to where the jump may go
    # straight (None: nowhere; a static target's, which, with the block elsewhere in its
    # page or in another, may be off its page)
    jumps: tuple[tuple[int, int, int | None], ...]
    refs: tuple[int, ...]  # its instructions whose Python handler it may call, by index

    @classmethod
    def kept(cls, value: object) -> PatchedCode | None:
        """``value`` as native_cache gives it back, if it has this shape."""
        if type(value) is tuple and len(value) == 3 and type(value[0]) is bytes:
            return cls(*value)
        return None


def available() -> bool:
    return importlib.util.find_spec("llvmlite") is not None


@cache
def _initialize() -> None:
    global llvm
    llvm = importlib.import_module("llvmlite.binding")
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()  # for inline assembly (hostfp)


def binding() -> ModuleType:
    """llvmlite's binding, initialized (for every instruction set's native tier)."""
    _initialize()
    assert llvm is not None
    return llvm


def target_machine():
    """A target machine for one execution engine (which takes ownership of it): generic
    for the host's triple, so its code suits any host of that triple."""
    _initialize()
    return llvm.Target.from_default_triple().create_target_machine(opt=CODEGEN_LEVEL, jit=True)


def toolchain() -> str:
    """What, besides popek's source, shapes the native code: the on-disk cache's version.
    Read without loading LLVM (a run whose code never gets hot never loads it): each
    llvmlite release bundles one LLVM, and the target is generic for the host's triple
    (FP code aside, which may use the host's FMA: hostfp.FEATURES)."""
    return (f"llvmlite {llvmlite_version()} {os.uname().machine} {sys.platform} "
            f"codegen {CODEGEN_LEVEL} {hostfp.FEATURES}")


def llvmlite_version() -> str:
    """llvmlite's version, from its package (light: not its binding, which loads LLVM;
    nor importlib.metadata, which a confined VMM worker cannot use)."""
    return importlib.import_module("llvmlite").__version__


def fallback_ref(d: Decoded) -> int:
    """How native code names an instruction it runs through its Python handler: by its
    bits, so the code means the same in any process (and can be cached on disk)."""
    return d.word | d.length << 32


# -- IR emission ------------------------------------------------------------------------------

class _Emitter:
    """What blocks and single steps share: env fields, the TLB hit path, trap exits."""

    def __init__(self, fn: ir.Function) -> None:
        self.fn = fn
        self.env = fn.args[0]
        self.builder = ir.IRBuilder(fn.append_basic_block("entry"), fn)
        self._field_ptrs: dict[str, ir.Value] = {}
        self._fields: dict[tuple[str, str], ir.Value] = {}

    def field_ptr(self, name: str) -> ir.Value:
        """Where an env field lives (computed once, in the entry block)."""
        if name not in self._field_ptrs:
            with self.builder.goto_entry_block():
                self._field_ptrs[name] = self.builder.gep(
                    self.env, [ir.Constant(I64, _F[name])], inbounds=True, source_etype=I64)
        return self._field_ptrs[name]

    def get(self, name: str, typ: ir.Type = ir.PTR) -> ir.Value:
        """An env field that stays constant during a run, loaded once at entry."""
        key = (name, typ.text)
        value = self._fields.get(key)
        if value is None:
            ptr = self.field_ptr(name)
            with self.builder.goto_entry_block():
                value = self._fields[key] = self.builder.load(ptr, typ=typ)
        return value

    def set(self, name: str, value: ir.Value) -> None:
        self.builder.store(value, self.field_ptr(name))

    def _slot(self, buffer: str, index: int | ir.Value) -> ir.Value:
        i = ir.Constant(I64, index) if isinstance(index, int) else index
        return self.builder.gep(self.get(buffer), [i], inbounds=True, source_etype=I64)

    def read_state(self, buffer: str, index: int | ir.Value) -> ir.Value:
        """FP registers and control slots stay in memory (Python handlers use them too)."""
        return self.builder.load(self._slot(buffer, index), typ=I64)

    def write_state(self, buffer: str, index: int | ir.Value, value: ir.Value) -> None:
        self.builder.store(value, self._slot(buffer, index))

    def _callback(self, field: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return self.builder.call(self.get(field), fnty, args)

    def trap_exit(self, status: ir.Value) -> None:
        raise NotImplementedError

    def _slow_access(self, field: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
        """A load or store that missed the native TLB: the callback ``field``."""
        return self._callback(field, ret, args)

    def csr_op(self, csr: ir.Value, kind: int, value: ir.Value, do_read: ir.Value,
               do_write: ir.Value) -> ir.Value:
        raise Unsupported("CSR accesses run through Python here")

    def _check(self, status: ir.Value, then: ir.Block) -> None:
        """Continue at ``then`` if a callback returned ``EXIT``, else leave through
        ``trap_exit``."""
        b = self.builder
        failed = b.icmp_unsigned("!=", status, ir.Constant(I32, EXIT))
        with b.if_then(failed, likely=False):
            self.trap_exit(status)
        b.branch(then)

    def _tlb_hit(self, addr: ir.Value, size: int, table: str
                 ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Whether the access hits the native TLB; where the entry's host page address
        is, and the access's offset in the page."""
        b = self.builder
        vpn = b.lshr(addr, ir.Constant(I64, 12))
        index = b.and_(vpn, ir.Constant(I64, TLB_ENTRIES - 1))
        entry = b.gep(self.get(table), [index], inbounds=True, source_etype=TLB_ENTRY)
        tag = b.load(entry, typ=I64)
        hit = b.icmp_unsigned("==", tag, b.add(vpn, ir.Constant(I64, 1)))
        offset = b.and_(addr, ir.Constant(I64, 4095))
        if size > 1:
            fits = b.icmp_unsigned("<=", offset, ir.Constant(I64, 4096 - size))
            hit = b.and_(hit, fits)
        return hit, entry, offset

    def _host(self, entry: ir.Value, offset: ir.Value) -> ir.Value:
        """The host address of a TLB hit."""
        b = self.builder
        page = b.load(b.gep(entry, [ir.Constant(I64, 1)], inbounds=True, source_etype=I64),
                      typ=ir.PTR)
        return b.gep(page, [offset], inbounds=True, source_etype=I8)

    def load(self, addr: ir.Value, size: int, writable: bool) -> ir.Value:
        b = self.builder
        hit, entry, offset = self._tlb_hit(addr, size, "tlb_w" if writable else "tlb_r")
        fast_bb, slow_bb, join_bb = (b.append_basic_block(n) for n in ("hit", "miss", "loaded"))
        b.cbranch(hit, fast_bb, slow_bb)
        b.position_at_end(fast_bb)
        raw = b.load(self._host(entry, offset), typ=ir.IntType(8 * size), align=1)
        fast_value = b.zext(raw, I64) if size < 8 else raw
        b.branch(join_bb)
        b.position_at_end(slow_bb)
        access = ACCESS_WRITE if writable else ACCESS_READ
        slow_value = self._slow_access("load_slow", I64, [
            addr, ir.Constant(I32, size), ir.Constant(I32, access)])
        self._check(b.trunc(b.load(self.field_ptr("status"), typ=I64), I32), join_bb)
        slow_end = b.block
        b.position_at_end(join_bb)
        phi = b.phi(I64)
        phi.add_incoming(fast_value, fast_bb)
        phi.add_incoming(slow_value, slow_end)
        return phi

    def store(self, addr: ir.Value, size: int, value: ir.Value) -> None:
        b = self.builder
        hit, entry, offset = self._tlb_hit(addr, size, "tlb_w")
        fast_bb, slow_bb, join_bb = (b.append_basic_block(n) for n in ("hit", "miss", "stored"))
        b.cbranch(hit, fast_bb, slow_bb)
        b.position_at_end(fast_bb)
        raw = b.trunc(value, ir.IntType(8 * size)) if size < 8 else value
        b.store(raw, self._host(entry, offset), align=1)
        b.branch(join_bb)
        b.position_at_end(slow_bb)
        self._check(self._slow_access("store_slow", I32, [addr, ir.Constant(I32, size), value]),
                    join_bb)
        b.position_at_end(join_bb)


# A path leaving a block: its exit pc or trap status, the index of the instruction it
# leaves from, the IR block it branches from, and the registers as it left them.
_Arm = tuple[ir.Value, int, ir.Block, dict[int, ir.Value]]


class _BlockEmitter(_Emitter):
    """One block: registers live in SSA values between entry and each exit."""

    def __init__(self, fn: ir.Function, decoded: list[Decoded], offsets: tuple[int, ...],
                 fp: bool, chain: ir.Function) -> None:
        super().__init__(fn)
        self.pc0 = fn.args[1]
        self.chain = chain
        self.decoded = decoded
        self.offsets = offsets
        self.index = 0
        self.used = sorted({r for d in decoded for r in (d.rd, d.rs1, d.rs2)} - {0, X_SINK})
        self.regs: dict[int, ir.Value] = {}
        self.written: set[int] = set()
        self.exit_bb: ir.Block | None = None
        self.exit_arms: list[_Arm] = []
        self.trap_bb: ir.Block | None = None
        self.trap_arms: list[_Arm] = []
        self._reload()
        if fp:  # FP state becomes dirty before an FP instruction runs, as in the engine
            mstatus = self.read_state("csr", MSTATUS)
            self.write_state("csr", MSTATUS, self.builder.or_(
                mstatus, ir.Constant(I64, MSTATUS_FS_DIRTY_SD)))

    # -- registers --
    def read_x(self, reg: int) -> ir.Value:
        if reg == 0:
            return ir.Constant(I64, 0)
        return self.regs[reg]

    def write_x(self, reg: int, value: ir.Value) -> None:
        if reg != X_SINK:
            self.regs[reg] = value
            self.written.add(reg)

    def registers(self) -> dict[int, ir.Value]:
        return dict(self.regs)

    def set_registers(self, regs: dict[int, ir.Value]) -> None:
        self.regs = regs

    def _write_back(self, regs: dict[int, ir.Value]) -> None:
        for n in sorted(self.written):
            self.write_state("x", n, regs[n])

    def _reload(self) -> None:
        self.regs = {n: self.read_state("x", n) for n in self.used}

    # -- exits --
    def _trap_arm(self, status: ir.Value) -> ir.Block:
        """The trap path shared by the whole block (see ``finish``), with the current IR
        block recorded as leaving for it."""
        if self.trap_bb is None:
            self.trap_bb = self.builder.append_basic_block("trap")
        self.trap_arms.append((status, self.index, self.builder.block, self.registers()))
        return self.trap_bb

    def trap_exit(self, status: ir.Value) -> None:
        self.builder.branch(self._trap_arm(status))

    def jump(self, target: ir.Value) -> None:
        """Leave the block for ``target``, through the exit shared by the whole block."""
        if self.exit_bb is None:
            self.exit_bb = self.builder.append_basic_block("exit")
        self.exit_arms.append((target, self.index, self.builder.block, self.registers()))
        self.builder.branch(self.exit_bb)

    def _merge(self, block: ir.Block, arms: list[_Arm], type_: ir.Type
               ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """At ``block``, where ``arms`` meet: their value, how many instructions they
        retired and the pc offset of the instruction they left from, after writing back
        the registers the block writes as each arm left them (one not yet written on
        that path still holds its entry value)."""
        b = self.builder
        b.position_at_end(block)

        def merged(values: list[ir.Value], typ: ir.Type) -> ir.Value:
            if all(v.ref == values[0].ref for v in values):
                return values[0]
            phi = b.phi(typ)
            for value, arm in zip(values, arms, strict=True):
                phi.add_incoming(value, arm[2])
            return phi

        value = merged([arm[0] for arm in arms], type_)
        retired = merged([ir.Constant(I64, arm[1]) for arm in arms], I64)
        offset = merged([ir.Constant(I64, self.offsets[arm[1]]) for arm in arms], I64)
        regs = {n: merged([arm[3][n] for arm in arms], I64) for n in sorted(self.written)}
        self._write_back(regs)  # after the phis, which must open the block
        return value, retired, offset

    def finish(self) -> None:
        """Emit the exits the block's paths branch to."""
        if self.exit_bb is not None:
            self._emit_exit()
        if self.trap_bb is None:
            return
        b = self.builder
        status, retired, offset = self._merge(self.trap_bb, self.trap_arms, I32)
        self.set("executed", b.add(b.load(self.field_ptr("executed"), typ=I64), retired))
        self.set("pc", b.add(self.pc0, offset))
        b.ret(status)

    def _check(self, status: ir.Value, then: ir.Block) -> None:
        """Branch straight to the shared trap block unless a callback returned ``EXIT``."""
        b = self.builder
        failed = b.icmp_unsigned("!=", status, ir.Constant(I32, EXIT))
        b.cbranch(failed, self._trap_arm(status), then)

    def trap(self, cause: ir.Value, tval: ir.Value) -> None:
        self.set("cause", cause)
        self.set("tval", tval)
        self.trap_exit(ir.Constant(I32, TRAP_NATIVE))

    def _emit_exit(self) -> None:
        """The shared exit: count the block's instructions and leave through the
        module's ``chain`` function (see :func:`_chain`)."""
        b = self.builder
        target, _, _ = self._merge(self.exit_bb, self.exit_arms, I64)
        executed = b.add(b.load(self.field_ptr("executed"), typ=I64),
                         ir.Constant(I64, len(self.decoded)))
        self.set("executed", executed)
        tail_call(b, self.chain, self.env, target)

    def run_handler(self) -> bool:
        """The current instruction through its Python handler (adopted by the runtime:
        see ``hands_over``)."""
        offset = ir.Constant(I64, self.offsets[self.index])
        self.fallback(fallback_ref(self.decoded[self.index]), self.builder.add(self.pc0, offset))
        return True

    def fallback(self, ref: int, pc: ir.Value) -> None:
        """Run one instruction through its Python handler, which reads and writes the
        registers in memory."""
        self._write_back(self.regs)
        b = self.builder
        done = b.append_basic_block("handled")
        self._check(self._callback("exec_slow", I32, [ir.Constant(I64, ref), pc]), done)
        b.position_at_end(done)
        self._reload()


def tail_call(b: ir.IRBuilder, callee: ir.Value, env: ir.Value, pc: ir.Value,
              acc: ir.Value = NO_ACC) -> None:
    """End the current block by jumping to the block (or stencil) ``callee``."""
    b.ret(b.call(callee, BLOCK_TYPE, [env, pc, acc], tail="musttail"))


def jump_bucket(pc: int) -> int:
    """The jump-cache bucket of virtual ``pc`` (as ``_jump_bucket`` computes it natively)."""
    page = (((pc >> 12) * JUMP_HASH) & U64) >> (64 - JUMP_PAGE_BITS)
    offset = ((pc >> 1) ^ (pc >> (1 + JUMP_OFFSET_BITS))) & ((1 << JUMP_OFFSET_BITS) - 1)
    return page << JUMP_OFFSET_BITS | offset


def _jump_bucket(b: ir.IRBuilder, pc: ir.Value) -> ir.Value:
    hashed = b.mul(b.lshr(pc, ir.Constant(I64, 12)), ir.Constant(I64, JUMP_HASH))
    page = b.shl(b.lshr(hashed, ir.Constant(I64, 64 - JUMP_PAGE_BITS)),
                 ir.Constant(I64, JUMP_OFFSET_BITS))
    mixed = b.xor(b.lshr(pc, ir.Constant(I64, 1)),
                  b.lshr(pc, ir.Constant(I64, 1 + JUMP_OFFSET_BITS)))
    return b.or_(page, b.and_(mixed, ir.Constant(I64, (1 << JUMP_OFFSET_BITS) - 1)))


def _block_table(em: _Emitter, target: ir.Value, tag: ir.Value, ways: list[ir.Value],
                 leave_bb: ir.Block) -> None:
    """The jump cache missed: find ``target``'s page in the native fetch TLB and its code in
    the block table; if both are there, enter the code in the jump cache (as way 0, the
    old way 0 moving to way 1) and tail-call it, else branch to ``leave_bb``."""
    b = em.builder
    vpn = b.lshr(target, ir.Constant(I64, 12))
    entry = b.gep(em.get("tlb_x"), [b.and_(vpn, ir.Constant(I64, TLB_ENTRIES - 1))],
                  inbounds=True, source_etype=TLB_ENTRY)
    mapped_bb = b.append_basic_block("mapped")
    b.cbranch(b.icmp_unsigned("==", b.load(entry, typ=I64), b.add(vpn, ir.Constant(I64, 1))),
              mapped_bb, leave_bb)
    b.position_at_end(mapped_bb)
    page = b.load(b.gep(entry, [ir.Constant(I64, 1)], inbounds=True, source_etype=I64), typ=I64)
    key = b.add(b.add(page, b.and_(target, ir.Constant(I64, 4095))), em.get("decode_mode", I64))
    hashed = b.mul(key, ir.Constant(I64, JUMP_HASH))
    bucket = b.lshr(hashed, ir.Constant(I64, 64 - BLOCK_BITS))
    want = b.or_(key, ir.Constant(I64, 1))
    for way in range(BLOCK_WAYS):
        slot = b.gep(em.get("blocks"), [bucket, ir.Constant(I32, way)], inbounds=True,
                     source_etype=BLOCK_BUCKET)
        found_bb = b.append_basic_block(f"known{way}")
        next_bb = b.append_basic_block(f"slot{way + 1}") if way + 1 < BLOCK_WAYS else leave_bb
        b.cbranch(b.icmp_unsigned("==", b.load(slot, typ=I64), want), found_bb, next_bb)
        b.position_at_end(found_bb)
        code = b.load(b.gep(slot, [ir.Constant(I64, 1)], inbounds=True, source_etype=I64),
                      typ=I64)
        first, second = ways[0], ways[1]
        for i in range(2):
            field = b.gep(first, [ir.Constant(I64, i)], inbounds=True, source_etype=I64)
            b.store(b.load(field, typ=I64),
                    b.gep(second, [ir.Constant(I64, i)], inbounds=True, source_etype=I64))
        b.store(tag, first)
        b.store(code, b.gep(first, [ir.Constant(I64, 1)], inbounds=True, source_etype=I64))
        tail_call(b, b.cast("inttoptr", code, ir.PTR), em.env, target)
        if next_bb is not leave_bb:
            b.position_at_end(next_bb)


def _jump_ways(em: _Emitter, target: ir.Value) -> tuple[ir.Value, list[ir.Value]]:
    """The jump-cache tag ``target`` has under the run's mode, and its bucket's ways."""
    b = em.builder
    bucket = _jump_bucket(b, target)
    want = b.xor(b.or_(target, ir.Constant(I64, 1)), em.get("mode", I64))
    return want, [b.gep(em.get("jumps"), [bucket, ir.Constant(I32, way)], inbounds=True,
                        source_etype=JUMP_BUCKET) for way in range(JUMP_WAYS)]


def _leave(em: _Emitter, target: ir.Value) -> None:
    em.set("pc", target)
    em.builder.ret(ir.Constant(I32, EXIT))


def _chain(module: ir.Module, slow: str = "") -> ir.Function:
    """The exit every block of ``module`` tail-calls with its successor's pc: chain to
    the successor's native code if the jump cache has it and budget remains, else return
    the pc to the dispatcher. One copy per module keeps each block's code small. With
    ``slow`` (the stencils' chain), a jump-cache miss goes on in the function at that env
    field (see _chain_slow), so that the hit path saves no registers."""
    for fn in module.functions:
        if fn.name == CHAIN:
            return fn
    fn = ir.Function(module, BLOCK_TYPE, CHAIN)
    fn.linkage = "internal"
    fn.attributes.add("nounwind")
    em = _Emitter(fn)
    b = em.builder
    target = fn.args[1]
    executed = b.load(em.field_ptr("executed"), typ=I64)
    budget_left = b.icmp_signed("<", executed, em.get("budget", I64))
    chain_bb = b.append_basic_block("chain")
    leave_bb = b.append_basic_block("leave")
    b.cbranch(budget_left, chain_bb, leave_bb)
    b.position_at_end(chain_bb)
    want, ways = _jump_ways(em, target)
    miss_bb = b.append_basic_block("miss")
    for way, entry in enumerate(ways):  # each way: (tag, function address)
        hit = b.icmp_unsigned("==", b.load(entry, typ=I64), want)
        found_bb = b.append_basic_block(f"found{way}")
        next_bb = b.append_basic_block(f"way{way + 1}") if way + 1 < JUMP_WAYS else miss_bb
        b.cbranch(hit, found_bb, next_bb)
        b.position_at_end(found_bb)
        callee = b.load(b.gep(entry, [ir.Constant(I64, 1)], inbounds=True, source_etype=I64),
                        typ=ir.PTR)
        tail_call(b, callee, em.env, target)
        b.position_at_end(next_bb)
    if slow:
        tail_call(b, em.get(slow), em.env, target)
    else:
        _block_table(em, target, want, ways, leave_bb)
    b.position_at_end(leave_bb)
    _leave(em, target)
    return fn


def _chain_slow(module: ir.Module, name: str, successor: Callable[[_Emitter, ir.Value], ir.Value]
                ) -> ir.Function:
    """The stencils' chain after a jump-cache miss: the block table, then, if the
    successor has no code yet, ``successor``'s call, which asks the engine to make it
    (NativeRuntime._successor) and gives its address or 0 (then back to the engine)."""
    fn = ir.Function(module, BLOCK_TYPE, name)
    fn.attributes.add("nounwind")
    em = _Emitter(fn)
    b = em.builder
    target = fn.args[1]
    want, ways = _jump_ways(em, target)
    unknown_bb = b.append_basic_block("unknown")
    _block_table(em, target, want, ways, unknown_bb)
    b.position_at_end(unknown_bb)
    code = successor(em, target)
    made_bb, leave_bb = b.append_basic_block("made"), b.append_basic_block("leave")
    b.cbranch(b.icmp_unsigned("!=", code, ir.Constant(I64, 0)), made_bb, leave_bb)
    b.position_at_end(made_bb)
    tail_call(b, b.cast("inttoptr", code, ir.PTR), em.env, target)
    b.position_at_end(leave_bb)
    _leave(em, target)
    return fn


class _StepEmitter(_Emitter):
    """One instruction for any operands: registers are read and written in memory."""

    def __init__(self, fn: ir.Function, length: int) -> None:
        super().__init__(fn)
        self.pc = fn.args[1]
        self.length = length

    def read_x(self, reg: ir.Value) -> ir.Value:
        return self.read_state("x", reg)

    def write_x(self, reg: ir.Value, value: ir.Value) -> None:
        self.write_state("x", reg, value)

    def registers(self) -> dict[int, ir.Value]:
        return {}  # registers stay in memory

    def set_registers(self, regs: dict[int, ir.Value]) -> None:
        pass

    def trap_exit(self, status: ir.Value) -> None:
        self.set("pc", self.pc)
        self.builder.ret(status)

    def trap(self, cause: ir.Value, tval: ir.Value) -> None:
        self.set("cause", cause)
        self.set("tval", tval)
        self.trap_exit(ir.Constant(I32, TRAP_NATIVE))

    def jump(self, target: ir.Value) -> None:
        self.set("executed", ir.Constant(I64, 1))
        self.set("pc", target)
        self.builder.ret(ir.Constant(I32, EXIT))

    def run_handler(self) -> bool:
        """A step knows no handler: it returns ``DECLINED`` for the engine to run it."""
        self.trap_exit(ir.Constant(I32, DECLINED))
        return False


def _operands(d: Decoded) -> dict[str, Operand]:
    return {"rd": Operand(d.rd, d.rd, d.rd), "rs1": Operand(d.rs1, d.rs1, d.rs1),
            "rs2": Operand(d.rs2, d.rs2, d.rs2), "imm": Operand(d.imm, d.imm, d.imm)}


_lowers: dict[str, bool] = {}  # by instruction name (hashing an Insn hashes its fields)


def lowers(ins: Insn) -> bool:
    """Whether ``ins`` has native semantics (else it runs through its Python handler)."""
    known = _lowers.get(ins.name)
    if known is None:
        known = _lowers[ins.name] = "system" not in ins.flags and _lowerable(ins)
    return known


def _lowerable(ins: Insn) -> bool:
    try:
        _step_module(ins, 4)
    except Unsupported:
        return False
    return True


def _step_module(ins: Insn, length: int) -> ir.Module:
    module = ir.Module(name=ins.name)
    fnty = ir.FunctionType(I32, [ir.PointerType(), I64, I64, I64, I64, I64])
    fn = ir.Function(module, fnty, "step")
    em = _StepEmitter(fn, length)
    _, pc, rd, rs1, rs2, imm = fn.args
    reg = (0, X_SINK) if ins.fmt in WRITES_X else (0, 31)
    operands = {"rd": Operand(rd, *reg), "rs1": Operand(rs1, 0, 31),
                "rs2": Operand(rs2, 0, 31), "imm": Operand(imm, *IMM_RANGES[ins.fmt])}
    if Lowering(em, operands, pc, length).lower(ins.sem):
        em.jump(em.builder.add(pc, ir.Constant(I64, length)))
    return module


# -- the runtime ------------------------------------------------------------------------------

class NativeRuntime:
    """One hart's native tiers: env, native TLB, jump cache and block table, callbacks,
    patched code (the baseline tier) and, if ``compiles``, LLVM's (tier 2). LLVM is loaded
    when tier 2 first has work: a run whose code never gets hot does without it."""

    def __init__(self, hart, handlers: dict[tuple[str, int], Callable], compiles: bool = True
                 ) -> None:
        self.hart = hart
        self.compiles = compiles
        self.handlers = handlers
        self.env = Env()
        self.env_addr = ctypes.addressof(self.env)
        # Native TLB tables (read, write, fetch) per privilege, like the MMU's sets: a trap
        # or return switches.
        self.tables: dict[int, tuple[array, array, array]] = {}
        # The entries filled with translations of the address space (table, index), for
        # flush_local; a slot since refilled with a global one may be among them.
        self.local_slots: list[tuple[array, int]] = []
        self.jumps = array("Q", bytes(16 * JUMP_ENTRIES))
        self.blocks = array("Q", bytes(16 * BLOCK_WAYS << BLOCK_BITS))
        self.ram_addr = hart.mem.ram_address
        self.pending: BaseException | None = None
        # Set by the engine around each native run: the instret its first instruction
        # sees, whether a system instruction's handler must return to the engine, and
        # whether one did.
        self.instret_base = 0
        self.leave_after_system: Callable[[int, int], bool] = lambda next_pc, fallthrough: True
        self.left_after_system = False
        self.restarts = 0  # times the code cache filled up and started over
        # (token, function address) of blocks compiled on the compiler thread, and what
        # failed there; both are for the vCPU thread to take between runs.
        self.compiled: deque[tuple[object, int]] = deque()
        self.failure: BaseException | None = None
        self._batch_done = threading.Event()
        self._batch_done.set()
        # What native code runs through Python handlers, by ``fallback_ref``.
        self.fallbacks: dict[int, tuple[Callable, int, int, int, int]] = {}
        self._object: bytes | None = None  # what LLVM compiled last (the object cache hook)
        self.steps: dict[tuple[str, int], Callable | None] = {}
        env = self.env
        env.x = hart.x.buffer_info()[0]
        env.f = hart.f.buffer_info()[0]
        env.ctl = hart.ctl.buffer_info()[0]
        env.csr = hart.csr.buffer_info()[0]
        self._use_tables(hart.priv)
        env.jumps = self.jumps.buffer_info()[0]
        env.blocks = self.blocks.buffer_info()[0]
        self._callbacks = (LOAD_SLOW(self._load_slow), STORE_SLOW(self._store_slow),
                           EXEC_SLOW(self._exec_slow), EXEC_SLOW(self._exec_system),
                           SUCCESSOR(self._successor))
        env.load_slow, env.store_slow, env.exec_slow, env.exec_system, env.successor = (
            ctypes.cast(cb, ctypes.c_void_p).value for cb in self._callbacks)
        # The engine's way to native code for a pc native code found none for (see
        # _successor), and what interrupted it, for the engine to raise after the run.
        self.native_successor: Callable[[int], int] = lambda pc: 0
        self.interrupted: BaseException | None = None
        CACHE.open(toolchain())
        self.engine = None  # LLVM's, made when first needed (_compiler)
        self._forget_compiled()
        # Copy-and-patch (see stencils): every block native at its first run.
        self.stencils = stencils.library(CACHE.writable_root, spawn=not CACHE.confined) \
            if stencils.supported() else None
        self.area = stencils.CodeArea(STENCIL_AREA) if self.stencils else None
        self._enter: Callable[[int, int, int], int] | None = None  # see entry
        self.counters = array("q", bytes(8 * STENCIL_BLOCKS))
        self._counters_at = self.counters.buffer_info()[0]  # (never resized)
        self.counted: list[object] = []  # the token of each patched block, by counter
        # Where exits jump straight into patched blocks, by code-cache key (patch_block).
        self.linked: dict[int, int] = {}
        # Exits to blocks on their page that have no patched code yet: by the key they
        # wait for, the addresses of their jumps' fields, patched when it comes.
        self.unlinked: dict[int, list[int]] = {}
        # The CSR windows as patched code reads them (stencils.WINDOW_FIELDS), by number.
        self._window_words = array("Q", [
            field for num, w in WINDOWS.items() for field in (
                w.slot, w.read_mask, w.write_mask, w.shift, w.loud_set, w.loud_clear, w.wakes,
                MSTATUS_SD if w.status else 0, MSTATUS_FS_DIRTY_SD if w.fp else 0,
                (num >> 8) & 3)])
        self.windows = {num: self._window_words.buffer_info()[0] + 8 * i * len(
            stencils.WINDOW_FIELDS) for i, num in enumerate(WINDOWS)}
        # What patch_block takes for each kind of instruction, from _choose: by name, in
        # the dict for its length; a CSR access's, by name and CSR, in ``_csr_choices``.
        self._choices: tuple[dict[str, Choice], ...] = ({}, {}, {}, {}, {})
        self._csr_choices: dict[tuple[str, int, int], Choice] = {}
        self._special = tuple(self.stencils[name] for name in (
            stencils.COUNT, stencils.FP_DIRTY, stencils.END, stencils.FALLBACK, stencils.STRADDLE,
            stencils.LINKED)) \
            if self.stencils else ()
        self._chain_addr = self._start_area()
        hart.mmu.mirror = self

    def _forget_compiled(self) -> None:
        self.native_blocks = 0
        # This engine's native code by block key (see native_cache): blocks of the same
        # bytes share it, wherever and whenever they were decoded.
        self.by_key: dict[bytes, int] = {}
        self.loaded_records: set[bytes] = set()  # their digests

    def _compiler(self) -> None:
        """Make sure LLVM's execution engine exists; the caller holds LLVM_LOCK."""
        if self.engine is None:
            self._new_compiler()

    def _new_compiler(self) -> None:
        """A fresh execution engine (the old one's code goes with it); the caller holds
        LLVM_LOCK."""
        target = target_machine()
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target)
        engine.finalize_object()  # the empty module: from here on, each object is a batch's
        engine.set_object_cache(self._object_compiled)
        # A short pipeline does what the lowering leaves to LLVM (the loads of registers a
        # block never reads, constants folded across instructions, branches folded); the
        # lowering already emits SSA at the widths values need. LLVM's standard levels cost
        # about four times as much compile time for little gain on straight-line blocks.
        passes = llvm.create_new_module_pass_manager()
        passes.add_instruction_combine_pass()
        passes.add_simplify_cfg_pass()
        self.passes = passes
        self.pass_builder = llvm.create_pass_builder(target, llvm.PipelineTuningOptions(
            speed_level=0))
        self.target, self.engine = target, engine
        self._forget_compiled()

    def _object_compiled(self, module, buffer: bytes) -> None:
        self._object = bytes(buffer)

    # -- TLB mirror (see Mmu.mirror) --
    def fill(self, access: int, vpn: int, host_page: int, local: bool = True) -> None:
        i = 2 * (vpn & (TLB_ENTRIES - 1))
        if access == ACCESS_EXEC:  # for the block table, which is keyed by host offset
            table = self.tlb_x
            table[i + 1] = host_page
        else:
            table = self.tlb_r if access == ACCESS_READ else self.tlb_w
            table[i + 1] = self.ram_addr + host_page
        table[i] = vpn + 1
        if local and len(self.local_slots) <= LOCAL_SLOTS:  # beyond: flush_local flushes
            self.local_slots.append((table, i))

    def _use_tables(self, priv: int) -> None:
        tables = self.tables.get(priv)
        if tables is None:
            tables = self.tables[priv] = tuple(array("Q", bytes(16 * TLB_ENTRIES))
                                               for _ in range(3))
        self.tlb_r, self.tlb_w, self.tlb_x = tables
        self.env.tlb_r = self.tlb_r.buffer_info()[0]
        self.env.tlb_w = self.tlb_w.buffer_info()[0]
        self.env.tlb_x = self.tlb_x.buffer_info()[0]

    def switch_priv(self, old: int, new: int) -> None:
        self._use_tables(new)  # jump-cache tags carry the privilege: nothing to forget

    def flush(self) -> None:
        for table in (*(t for tables in self.tables.values() for t in tables), self.jumps):
            ctypes.memset(table.buffer_info()[0], 0, 8 * len(table))
        self.local_slots.clear()

    def flush_local(self) -> None:
        """Forget the translations of the address space, keeping the global ones (after
        a context switch, the kernel's pages need no refill from Python), and every
        jump: a virtual pc may hold other code now."""
        slots = self.local_slots
        if len(slots) > LOCAL_SLOTS:
            self.flush()
            return
        for table, i in slots:
            table[i] = 0
        slots.clear()
        ctypes.memset(self.jumps.buffer_info()[0], 0, 8 * len(self.jumps))

    def flush_page(self, vpn: int) -> None:
        """Forget virtual page ``vpn``: its TLB entries and the blocks starting on it."""
        i = 2 * (vpn & (TLB_ENTRIES - 1))
        for tables in self.tables.values():
            for table in tables:
                if table[i] == vpn + 1:
                    table[i] = 0
        first = 2 * JUMP_WAYS * (jump_bucket(vpn << 12) & ~((1 << JUMP_OFFSET_BITS) - 1))
        ctypes.memset(self.jumps.buffer_info()[0] + 8 * first, 0,
                      8 * 2 * JUMP_WAYS << JUMP_OFFSET_BITS)

    def drop_writable(self, page: int | None) -> None:
        """Forget the writable entries of host page ``page`` (None: all). Guest memory
        asks for each page of code it starts watching (~2,000 a boot): emptying the whole
        table each time cost ~7,000 store misses a boot."""
        for _, tlb_w, _ in self.tables.values():
            if page is None:
                ctypes.memset(tlb_w.buffer_info()[0], 0, 8 * len(tlb_w))
                continue
            raw = tlb_w.tobytes()
            host = (self.ram_addr + page).to_bytes(8, "little")
            at = raw.rfind(host)  # (find is ~8x slower on these mostly-zero bytes)
            while at >= 0:
                if at % 16 == 8:  # an entry's host page (its second word): drop its tag
                    tlb_w[at // 8 - 1] = 0
                at = raw.rfind(host, 0, at + 7)

    def forget_jumps(self) -> None:
        """Code or the decoding mode changed: no successor may be assumed. Patched blocks
        that jump straight to others on their page may be running: the budget runs out,
        so they stop at their next block boundary, which checks it."""
        ctypes.memset(self.jumps.buffer_info()[0], 0, 8 * len(self.jumps))
        self.env.budget = 0

    def remember_block(self, key: int, fn_addr: int) -> None:
        """Native code for the block at code-cache ``key`` is at ``fn_addr``."""
        at = 2 * BLOCK_WAYS * (((key * JUMP_HASH) & U64) >> (64 - BLOCK_BITS))
        blocks, tag = self.blocks, key | 1
        way = at + 2 * (BLOCK_WAYS - 1)  # the last way goes if none is free or ours
        for i in range(at, way, 2):
            if blocks[i] == 0 or blocks[i] == tag:
                way = i
                break
        blocks[way], blocks[way + 1] = tag, fn_addr

    def forget_block(self, key: int) -> None:
        self.linked.pop(key, None)
        self.unlinked.pop(key, None)  # (exits of blocks of its page, which go too)
        at = 2 * BLOCK_WAYS * (((key * JUMP_HASH) & U64) >> (64 - BLOCK_BITS))
        blocks, tag = self.blocks, key | 1
        for i in range(at, at + 2 * BLOCK_WAYS, 2):
            if blocks[i] == tag:
                blocks[i] = blocks[i + 1] = 0

    def forget_blocks(self) -> None:
        self.linked.clear()
        self.unlinked.clear()
        ctypes.memset(self.blocks.buffer_info()[0], 0, 8 * len(self.blocks))

    def remember_jump(self, pc: int, mode: int, fn_addr: int) -> None:
        """Native code for privilege and decoding ``mode`` (see ``jump_mode``) starts at
        virtual ``pc``; the tag carries the mode, so a mode change needs no flush."""
        bucket = 4 * jump_bucket(pc)
        tag = (pc | 1) ^ mode
        jumps = self.jumps
        if jumps[bucket] not in (0, tag):  # keep the other way's entry; newest first
            jumps[bucket + 2], jumps[bucket + 3] = jumps[bucket], jumps[bucket + 1]
        jumps[bucket], jumps[bucket + 1] = tag, fn_addr

    # -- callbacks from native code (never let an exception through C) --
    def _load_slow(self, vaddr: int, size: int, access: int) -> int:
        try:
            return self.hart.mmu.load_slow(vaddr, size, access) & ((1 << (8 * size)) - 1)
        except BaseException as e:  # noqa: BLE001 - handed back to Python after the run
            self.pending = e
            self.env.status = TRAP_PENDING if isinstance(e, Trap) else EXCEPTION
            return 0

    def _store_slow(self, vaddr: int, size: int, value: int) -> int:
        try:
            self.hart.mmu.store_slow(vaddr, size, value)
            return EXIT
        except BaseException as e:  # noqa: BLE001
            self.pending = e
            return TRAP_PENDING if isinstance(e, Trap) else EXCEPTION

    def _exec_system(self, ref: int, pc: int) -> int:
        """A system instruction in patched code: its handler, with instret exact for it,
        then ``leave_after_system`` says whether native code must return to the engine
        (``LEAVE``, env.pc the next pc), as after a system block the engine ran."""
        handler, rd, rs1, rs2, imm = self.fallbacks[ref]
        try:
            self.hart.ctl[CTL_INSTRET] = (self.instret_base + self.env.executed) & XLEN_MASK
            next_pc = handler(pc, rd, rs1, rs2, imm)
            if self.leave_after_system(next_pc, (pc + (ref >> 32)) & XLEN_MASK):
                self.env.pc = next_pc
                self.left_after_system = True
                return stencils.LEAVE
            return EXIT
        except BaseException as e:  # noqa: BLE001
            self.pending = e
            return TRAP_PENDING if isinstance(e, Trap) else EXCEPTION

    def _successor(self, pc: int) -> int:
        """Native code found no code for ``pc`` (the jump cache and block table missed):
        the engine decodes and patches it now, if it can, so that native code goes on
        instead of returning to the engine's loop for it (a boot's ~32,000 new blocks each
        cost a return and an entry). 0 leaves it to the loop, which does the same work
        and raises what there is to raise (a fetch fault, say)."""
        try:
            return self.native_successor(pc)
        except Exception:  # noqa: BLE001 - the loop meets it again, where it belongs
            return 0
        except BaseException as e:  # noqa: BLE001 - e.g. KeyboardInterrupt: after the run
            self.interrupted = e
            return 0

    def _exec_slow(self, ref: int, pc: int) -> int:
        handler, rd, rs1, rs2, imm = self.fallbacks[ref]
        try:
            handler(pc, rd, rs1, rs2, imm)
            return EXIT
        except BaseException as e:  # noqa: BLE001
            self.pending = e
            return TRAP_PENDING if isinstance(e, Trap) else EXCEPTION

    # -- copy-and-patch --
    def _start_area(self) -> int:
        """Empty the patched code and counters; the shared exit and the slow paths'
        thunks (see stencils.THUNKS) go first."""
        if self.area is None:
            return 0
        self.area.reset()
        self.counted.clear()
        self.linked.clear()
        self.unlinked.clear()
        chain = self.area.write(self.stencils[stencils.CHAIN_FN].code)
        self.env.chain_slow = self.area.write(self.stencils[stencils.CHAIN_SLOW_FN].code)
        for field, (name, _, _) in stencils.THUNKS.items():
            setattr(self.env, field, self.area.write(self.stencils[name].code))
        self._enter = ENTER_FN(self.area.write(self.stencils[stencils.ENTER_FN].code))
        return chain

    def entry(self, addr: int) -> Callable[[int, int, int], int]:
        """How Python enters the native code at ``addr``: ``entry(env, pc, addr)``. With
        stencils, one function in the code area enters every block, so no block needs a
        ctypes function of its own (~32,000 in a boot; each took microseconds to make)."""
        if self._enter is not None:
            return self._enter
        block = BLOCK_FN(addr)
        return lambda env, pc, _: block(env, pc)

    @property
    def area_full(self) -> bool:
        """Whether patched code or counters ran out: the code cache must start over."""
        return self.area is not None and (
            len(self.counted) >= STENCIL_BLOCKS
            or self.area.size - self.area.used < STENCIL_AREA // 64)

    def patch_block(self, token: object, decoded: list[Decoded], offsets: tuple[int, ...],
                    fp: bool, hot_after: int | None, key: int | None = None,
                    second_half: int | None = None, keep: list[tuple] | None = None
                    ) -> int | None:
        """Native code for a block, from stencils: its address, where it may run at once
        (see stencils.CodeArea); None if the block should stay on the Python tiers
        (as tier 2 would leave it there too). After ``hot_after`` runs it exits with
        status ``HOT``, for tier 2 to compile it (None: never). With ``keep`` (and a
        ``key``; the baseline tier), the code is appended to it as a later run may place
        it, unless it holds a host address (a CSR's window).

        With its code-cache ``key`` (host offset plus mode, as ``remember_block``), its
        exits to blocks on its own page that have patched code jump straight there, and
        later blocks' exits to it jump straight here (see ``forget_jumps``). A block of
        one page-straddling instruction gives the bits of its ``second_half`` instead,
        which its code checks first (leaving to Python if they differ)."""
        if self.stencils is None or self.area_full:
            return None
        started = time.perf_counter()
        choices = self._choices
        count, fp_dirty, end, _, straddle, check = self._special
        slot = len(self.counted)
        counter = self._counters_at + 8 * slot
        base = self.area.next_address()
        chain, length, block_end = self._chain_addr, len(decoded), offsets[-1] + decoded[-1].length
        bits, ram = second_half or 0, self.ram_addr
        code = []
        at = base
        linked = self.linked
        waiting = []  # the key an exit waits for, its jump's field's address, ...
        if key is not None:  # where this block's and later blocks' exits come in
            at += check.size
            code.append(check.fill(0, 0, 0, 0, 0, 0, 0, at, chain, counter, length, block_end,
                                   bits, ram, 0))
            linked[key] = base
            page = key - (key & 4095)
            start = key & 4095
        entry = at
        if second_half is not None:
            at += straddle.size
            code.append(straddle.fill(0, 0, 0, 0, 0, 0, 0, at, chain, counter, length,
                                      block_end, bits, ram, 0))
        # counts runs for tier 2, which takes no system block (a system instruction is
        # alone in its block)
        if self.compiles and hot_after is not None and \
                not self._choose(decoded[0])[1] & CHOSE_SYSTEM:
            at += count.size
            code.append(count.fill(0, 0, 0, 0, 0, 0, 0, at, chain, counter, length, block_end,
                                   bits, ram, 0))
        if fp:
            at += fp_dirty.size
            code.append(fp_dirty.fill(0, 0, 0, 0, 0, 0, 0, at, chain, counter, length,
                                      block_end, bits, ram, 0))
        callbacks = 0
        acc = -1  # the register whose value the accumulator holds (see stencils.ACC_SOURCES)
        if key is None:
            keep = None
        jumps: list[tuple[int, int, int | None]] = []  # for keep: see PatchedCode
        refs: list[int] = []
        for index, d in enumerate(decoded):
            ins, rd, rs1, rs2, imm, size, _, _ = d  # (one unpacking, not six attributes)
            choice = choices[size].get(ins.name)
            if choice is None or choice[1] & CHOSE_CSR:
                choice = self._choose(d)
            stencil, kind, window = choice
            if kind & CHOSE_VARIANTS:
                if rs1 == acc and stencil.via_rs1:
                    stencil = stencil.via_rs1
                elif rs2 == acc and stencil.via_rs2:
                    stencil = stencil.via_rs2
            # (a Python handler may write the register the accumulator holds)
            acc = rd if kind & CHOSE_LEAVES_RD else -1 if kind & CHOSE_REF else acc
            at += stencil.size
            offset = offsets[index]
            exit_ = chain
            aimed = None  # how far from the block's start its jump to chain may go instead
            if kind & CHOSE_STATIC_JUMP and key is not None and \
                    0 <= (target := start + offset + imm) < PAGE_SIZE:
                aimed = offset + imm
                exit_ = linked.get(page + target, 0)
                if not exit_:
                    exit_ = chain
                    if stencil.chain_field >= 0:
                        waiting += (page + target, at - stencil.size + stencil.chain_field)
            if keep is not None:
                if kind & CHOSE_CSR:
                    keep = None  # its window's address would be this process's
                else:
                    if stencil.chain_holes:
                        here = at - stencil.size - base
                        for off, addend in stencil.chain_holes:
                            jumps.append((here + off, addend,
                                          aimed if off == stencil.chain_field else None))
                    if kind & CHOSE_REF:
                        refs.append(index)
            code.append(stencil.fill(rd, rs1, rs2, imm, offset, index,
                                     self._adopt_fallback(d) if kind & CHOSE_REF else 0, at,
                                     exit_, counter, length, block_end, bits, ram, window))
            callbacks += kind & CHOSE_FALLBACK
        if callbacks * 2 > length or (kind & CHOSE_FALLBACK and kind & CHOSE_ENDS_BLOCK):
            if key is not None:  # (no block had this key: the engine decodes a key once)
                del linked[key]
            return None  # as _worth_native: tier 1 runs such blocks faster
        if stencil.continues:
            exit_ = chain
            aimed = None
            if key is not None and (target := start + block_end) < PAGE_SIZE:
                aimed = block_end
                exit_ = linked.get(page + target, 0)
                if not exit_:
                    exit_ = chain
                    if end.chain_field >= 0:
                        waiting += (page + target, at + end.chain_field)
            if keep is not None:
                for off, addend in end.chain_holes:
                    jumps.append((at - base + off, addend,
                                  aimed if off == end.chain_field else None))
            code.append(end.fill(0, 0, 0, 0, 0, 0, 0, at + end.size, exit_, counter, length,
                                 block_end, bits, ram, 0))
        self.counters[slot] = hot_after or 0
        patched = b"".join(code)
        addr = self.area.write(patched)
        assert addr == base
        if key is not None:
            self._arrived(key, base, waiting)
        if keep is not None:
            keep.append((patched, tuple(jumps), tuple(refs)))  # (PatchedCode's fields)
        self.counted.append(token)
        STATS.patched += 1
        STATS.patch_seconds += time.perf_counter() - started
        return entry

    def place_block(self, token: object, decoded: list[Decoded], patched: PatchedCode,
                    key: int) -> int | None:
        """``patch_block`` for a block whose code an earlier run kept (see PatchedCode):
        its bytes copied, its jumps to ``chain`` aimed at this run's (or at the blocks of
        its page they may go to straight), its Python handlers adopted."""
        if self.stencils is None or self.area_full:
            return None
        started = time.perf_counter()
        area = self.area
        base = area.write(patched.code)
        memory, origin, chain = area.memory, area.address, self._chain_addr
        linked = self.linked
        linked[key] = base  # (before aiming: a block may jump to itself)
        start = key & 4095
        page = key - start
        waiting = []
        for off, addend, distance in patched.jumps:
            field = base + off
            aim = chain
            if distance is not None and 0 <= (target := start + distance) < PAGE_SIZE:
                aim = linked.get(page + target, 0)
                if not aim:
                    aim = chain
                    if addend == -4:
                        waiting += (page + target, field)
            stencils.pack_i32(memory, field - origin, aim + addend - field)
        for index in patched.refs:
            self._adopt_fallback(decoded[index])
        self._arrived(key, base, waiting)
        self.counters[len(self.counted)] = 0
        self.counted.append(token)
        STATS.placed += 1
        STATS.place_seconds += time.perf_counter() - started
        return base + self._special[5].size  # (past the check: see patch_block)

    def _arrived(self, key: int, base: int, waiting: list[int]) -> None:
        """The block at ``key`` now has code at ``base``: exits that waited for it jump
        straight there (as QEMU chains a translation block to one translated after it),
        and its own exits in ``waiting`` (key, field address, ...) wait for theirs. (Only
        between runs or from a successor's callback, when the waiting exits' code has
        run already.)"""
        unlinked = self.unlinked
        fields = unlinked.pop(key, None)
        if fields is not None:
            self.area.aim_jumps(fields, base)
        for i in range(0, len(waiting), 2):
            unlinked.setdefault(waiting[i], []).append(waiting[i + 1])

    def _choose(self, d: Decoded) -> Choice:
        """What patching ``d`` takes, the same for every instruction of its kind (its name
        and length, and for a CSR access its CSR): its stencil, CHOSE_ flags and its CSR
        window's address (0 for none)."""
        ins = d.insn
        csr_key = (ins.name, d.length, d.imm) if ins.fmt == "CSR" else None
        choice = self._choices[d.length].get(ins.name) if csr_key is None else \
            self._csr_choices.get(csr_key)
        if choice is None:
            system = "system" in ins.flags
            stencil = stencils.stencil_for(self.stencils, d)
            fallback = stencil is self._special[3]
            choice = (stencil, CHOSE_FALLBACK * fallback | CHOSE_SYSTEM * system
                      | CHOSE_STATIC_JUMP * (ins.fmt in STATIC_JUMPS)
                      | CHOSE_REF * (stencil.calls_handler or system)
                      | CHOSE_ENDS_BLOCK * ("ends_block" in ins.flags)
                      | CHOSE_CSR * (csr_key is not None)
                      | CHOSE_VARIANTS * bool(stencil.via_rs1 or stencil.via_rs2)
                      | CHOSE_LEAVES_RD * stencil.leaves_rd,
                      self.windows.get(d.imm, 0) if system else 0)
            if csr_key is not None:
                self._csr_choices[csr_key] = choice
            # (a CSR access's tells patch_block to ask here, by its CSR)
            self._choices[d.length][ins.name] = choice
        return choice

    def redirect(self, old: int, new: int) -> None:
        """Patched code at ``old`` is superseded by tier 2's at ``new``: its first
        instructions now jump there, so whatever still leads to it (the jump cache, other
        blocks' chains) arrives at the new code. Only between runs."""
        if self.area is not None and self.area.holds(old):
            self.area.overwrite(old, stencils.jump_to(new))

    def hot_block(self) -> object:
        """The token of the patched block whose counter reached zero (status ``HOT``)."""
        return self.counted[(self.env.tval - self.counters.buffer_info()[0]) // 8]

    def reset_patched(self) -> None:
        """Drop all patched code; only between runs, after the engine forgot its blocks."""
        self.forget_jumps()
        self._chain_addr = self._start_area()

    # -- compiling --
    @staticmethod
    def _with_table(module: ir.Module, table: str, names: list[str]) -> str:
        """The IR text of ``module`` plus a ``table`` of the addresses of functions
        ``names``: one look-up finds them all (on the compiler thread, each call into LLVM
        costs a round trip for the GIL). Tables and blocks are named at random, so objects
        from any process can share an engine (see native_cache)."""
        entries = ", ".join(f"ptr @{n}" for n in names)
        return f"{module}\n@{table} = constant [{len(names)} x ptr] [{entries}]\n"

    def _addresses(self, table: str, count: int) -> list[int]:
        return list((ctypes.c_uint64 * count).from_address(
            self.engine.get_global_value_address(table)))

    def _finalize(self, text: str, table: str, count: int) -> tuple[list[int], bytes | None]:
        """Optimize and compile IR ``text``: the ``count`` addresses in its ``table``, and
        the object code. The caller holds LLVM_LOCK."""
        mod = llvm.parse_assembly(text)
        self.passes.run(mod, self.pass_builder)
        self._object = None
        self.engine.add_module(mod)
        self.engine.finalize_object()
        addrs = self._addresses(table, count)
        # The machine code stays with the engine's memory manager; the IR is no longer
        # needed and would otherwise stay resident for every block ever compiled.
        self.engine.remove_module(mod)
        mod.close()
        return addrs, self._object

    def _load(self, record: Record) -> bool:
        """Add ``record``'s object code to the engine and learn its blocks' addresses;
        False if its checksum fails. The caller holds LLVM_LOCK."""
        if record.digest in self.loaded_records:
            return True
        obj = CACHE.payload(record)
        if obj is None:
            return False
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()
        addrs = self._addresses(record.table, len(record.keys))
        self.loaded_records.add(record.digest)
        for key, addr in zip(record.keys, addrs, strict=True):
            self.by_key.setdefault(key, addr)
        self.native_blocks += len(addrs)
        return True

    def native_for(self, key: bytes, decoded: list[Decoded]) -> int | None:
        """Native code for the block of ``decoded`` instructions with ``key``, if this
        engine has it or the disk cache does (then loaded now); None if neither."""
        if not self.compiles:
            return None
        addr = self.by_key.get(key)
        if addr is None:
            record = CACHE.lookup(key)
            if record is None:
                return None
            with LLVM_LOCK:
                self._compiler()
                ok = self._load(record)
            if not ok:
                CACHE.discard(record)
                return None
            CACHE.loaded(record)
            addr = self.by_key[key]
        CACHE.stats.reused += 1
        for d in decoded:
            if not lowers(d.insn) or hands_over(d.insn.sem):
                self._adopt_fallback(d)
        return addr

    def _adopt_fallback(self, d: Decoded) -> int:
        ref = fallback_ref(d)
        if ref not in self.fallbacks:
            self.fallbacks[ref] = (self.handlers[(d.insn.name, d.length)],
                                   d.rd, d.rs1, d.rs2, d.imm)
        return ref

    @property
    def full(self) -> bool:
        return self.native_blocks >= MAX_NATIVE_BLOCKS

    def start_over(self) -> None:
        """Drop all native code; only between runs, and after the engine forgot its blocks.
        A batch on the compiler thread finishes first; the ones still queued and the
        results not yet taken belong to the old code and are dropped."""
        self.forget_jumps()
        self.fallbacks.clear()
        self.steps.clear()
        with LLVM_LOCK:
            self.compiled.clear()
            self.engine = None  # queued batches see another engine and give up
            self._forget_compiled()
        self._chain_addr = self._start_area()
        self.restarts += 1

    @property
    def compiling(self) -> bool:
        """Whether the last batch handed to the compiler thread is not done yet."""
        return not self._batch_done.is_set()

    def compile_later(self, blocks: list[tuple[object, bytes | None, list[Decoded],
                                               tuple[int, ...], bool]]) -> None:
        """Emit each (token, key, decoded, offsets, fp) block's IR now, in one module, and
        have the compiler thread compile it: (token, address) pairs then appear in
        ``compiled``. Blocks that should stay on tier 1 never appear there. A block with
        a ``key`` (the disk cache is on) shares code with others of its key, and the
        batch's object code goes to the disk cache."""
        with LLVM_LOCK:
            self._compiler()  # before counting blocks against it
        module = ir.Module()
        table = f"t{os.urandom(8).hex()}"
        owners: list[list[object]] = []  # the tokens of each function emitted
        keys: list[bytes | None] = []
        emitted: dict[bytes, int] = {}
        for token, key, decoded, offsets, fp in blocks:
            if key is not None:
                if (addr := self.by_key.get(key)) is not None:
                    self.compiled.append((token, addr))
                    continue
                if key in emitted:
                    owners[emitted[key]].append(token)
                    continue
            if self._emit_block(module, f"{table}_{len(owners)}", decoded, offsets, fp):
                if key is not None:
                    emitted[key] = len(owners)
                owners.append([token])
                keys.append(key)
        if not owners:
            return
        text = self._with_table(module, table, [f"{table}_{i}" for i in range(len(owners))])
        engine, done = self.engine, threading.Event()
        self._batch_done = done

        def compile_batch() -> None:
            try:
                if self.engine is engine:  # else the cache started over meanwhile
                    addrs, obj = self._finalize(text, table, len(owners))
                    for tokens, key, addr in zip(owners, keys, addrs, strict=True):
                        self.compiled.extend((token, addr) for token in tokens)
                        if key is not None:
                            self.by_key[key] = addr
                    if obj is not None and None not in keys:
                        CACHE.store(keys, table, obj)
            except BaseException as e:  # noqa: BLE001 - raised on the vCPU thread instead
                self.failure = e
            finally:
                done.set()

        COMPILER.submit(compile_batch)

    def take_compiled(self) -> list[tuple[object, int]]:
        """The (token, address) pairs compiled since the last call (vCPU thread only)."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        compiled = self.compiled
        return [compiled.popleft() for _ in range(len(compiled))]

    @staticmethod
    def wait_compiles() -> None:
        """Wait until every batch handed to the compiler thread is compiled."""
        COMPILER.wait_idle()

    @staticmethod
    def _worth_native(decoded: list[Decoded]) -> bool:
        """Whether native code suits a block: not if it is mostly callbacks (tier 1 runs
        those faster) or control leaves it through a Python handler."""
        native = [lowers(d.insn) for d in decoded]
        if sum(native) * 2 < len(decoded):
            return False
        return native[-1] or "ends_block" not in decoded[-1].insn.flags

    def _emit_block(self, module: ir.Module, name: str, decoded: list[Decoded],
                    offsets: tuple[int, ...], fp: bool) -> bool:
        """Emit function ``name`` for a block, unless it should stay on tier 1."""
        if not self._worth_native(decoded):
            return False
        native = [lowers(d.insn) for d in decoded]
        self.native_blocks += 1
        STATS.compiled += 1
        fn = ir.Function(module, BLOCK_TYPE, name)
        fn.attributes.add("nounwind")
        em = _BlockEmitter(fn, decoded, offsets, fp, _chain(module))
        b = em.builder
        body = b.append_basic_block("body")
        b.branch(body)
        b.position_at_end(body)
        falls = True
        for i, (d, off) in enumerate(zip(decoded, offsets, strict=True)):
            em.index = i
            if not off:
                pc = em.pc0
            elif native[i] and not reads_pc(d.insn.sem):
                pc = None
            else:
                pc = b.add(em.pc0, ir.Constant(I64, off))
            if native[i]:
                if hands_over(d.insn.sem):
                    self._adopt_fallback(d)
                falls = Lowering(em, _operands(d), pc, d.length).lower(d.insn.sem)
            else:
                em.fallback(self._adopt_fallback(d), pc)
                falls = "ends_block" not in d.insn.flags
            if not falls:
                break
        if falls:
            end = offsets[-1] + decoded[-1].length
            em.jump(b.add(em.pc0, ir.Constant(I64, end)))
        em.finish()
        return True

    def step_function(self, ins: Insn, length: int) -> Callable | None:
        """Native code for one instruction with operands as arguments (single steps)."""
        key = (ins.name, length)
        if key not in self.steps:
            fn = None
            if self.compiles and lowers(ins):
                table = f"t{os.urandom(8).hex()}"
                text = self._with_table(_step_module(ins, length), table, ["step"])
                with LLVM_LOCK:
                    self._compiler()
                    (addr,), _ = self._finalize(text, table, 1)
                fn = STEP_FN(addr)
            self.steps[key] = fn
        return self.steps[key]

    # -- running --
    def take_pending(self, status: int) -> BaseException:
        """The trap or exception that stopped a native run with ``status``."""
        if status == TRAP_NATIVE:
            return Trap(self.env.cause, self.env.tval)
        exc, self.pending = self.pending, None
        self.env.status = EXIT
        return exc
