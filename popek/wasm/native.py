"""Tier 2 for WebAssembly: an instance's functions compiled to native code through LLVM.

Each function the tier handles becomes one native function ``status = f(env, io)``:
``io`` holds its arguments on entry and its results on return, ``env`` (:class:`Env`)
what native code shares with Python: the linear memory's address and size, the globals'
values, the fuel, the call depth and the callbacks into Python. Instruction semantics
come from :mod:`popek.wasm.isa` through the engine's lowering (:mod:`popek.engine.lowering`)
with WebAssembly's vocabulary added (:class:`WasmLowering`); control flow, locals, the
operand stack, memory accesses with their bounds checks, calls and fuel are this module's.
Locals and stack slots are stack variables that LLVM promotes to registers.

The rules are the other tiers': a trap leaves memory, globals and fuel as the interpreter
would (memory is the instance's own bytearray, globals and fuel are copied back whenever
control returns to Python), fuel is spent at function entry and loop back edges, and a
function using anything the lowering refuses (floating-point arithmetic, references,
bulk memory, ``memory.grow``) stays on the translation tier; calls to such functions,
to host functions and through tables go back into Python.

An instance's functions are compiled together, in one LLVM module, on the first call
into it, so native functions call each other directly.
"""

from __future__ import annotations

import ast
import ctypes
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

from popek.engine import irtext as ir
from popek.engine import jit
from popek.engine.compiler_thread import LLVM_LOCK
from popek.engine.lowering import I32, I64, Emitted, Lowering, Operand, Unsupported, Value
from popek.wasm import numeric
from popek.wasm.errors import OutOfFuel, Trap
from popek.wasm.isa import Op
from popek.wasm.runtime import OOB_MEMORY
from popek.wasm.translator import _call_target, call_function
from popek.wasm.types import MAX_CALL_DEPTH

if TYPE_CHECKING:
    from popek.wasm.binary import Instr
    from popek.wasm.instance import Instance, WasmFunction

I8 = ir.IntType(8)
NUMERIC = ("i32", "i64", "f32", "f64")
MASKS = {"i32": numeric.M32, "i64": numeric.M64, "f32": numeric.M32, "f64": numeric.M64}

# Exit statuses of native functions.
OK = 0
TRAPPED = 1  # env.trap indexes TRAPS
PENDING = 2  # a call back into Python raised; the exception waits in NativeInstance.pending

TRAPS = ["integer divide by zero", "integer overflow", OOB_MEMORY, "unreachable",
         "call stack exhausted", "all fuel consumed", "invalid conversion to integer"]
_TRAP = {message: i for i, message in enumerate(TRAPS)}

ENV_FIELDS = ("memory", "memory_size", "globals", "fuel", "depth", "trap", "call_slow", "tables",
              "tables_valid", "stack_limit")
# Native frames may use this much of the host thread's C stack (below the outermost native
# entry): a deep recursion of functions with large frames traps before the guard page.
STACK_BUDGET = 4 << 20
_F = {name: i for i, name in enumerate(ENV_FIELDS)}


class Env(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ENV_FIELDS]


NATIVE_FN = ctypes.PYFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)
# call_slow(env, callee, io): callee is a function index, or -1 - i for the i-th
# call_indirect site's (table, type) with the element index in io's last word.
CALL_SLOW = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p)
FRAME_FN = ctypes.CFUNCTYPE(ctypes.c_uint64)
FUNCTION_TYPE = ir.FunctionType(I32, [ir.PTR, ir.PTR])
CALL_SLOW_TYPE = ir.FunctionType(I32, [ir.PTR, I64, ir.PTR])
_names = itertools.count()


DOUBLE = ir.Type("double")
FLOAT_TYPES = {32: ir.Type("float"), 64: DOUBLE}
_FCMP = {ast.Eq: "oeq", ast.NotEq: "une", ast.Lt: "olt", ast.LtE: "ole", ast.Gt: "ogt",
         ast.GtE: "oge"}
_FARITH = {ast.Add: "fadd", ast.Sub: "fsub", ast.Mult: "fmul"}
_QUIET = {32: numeric.F32_QUIET, 64: numeric.F64_QUIET}
_CANON = {32: numeric.F32_CANON, 64: numeric.F64_CANON}
_ROUNDING = {"ceil": "ceil", "floor": "floor", "trunc": "trunc", "nearest": "roundeven"}


class Float:
    """A Python float of the semantics: an LLVM double (binary32 values are exact in it)."""

    def __init__(self, value: ir.Value) -> None:
        self.ir = value


def _double(x: float) -> ir.Value:
    return ir.Value(DOUBLE, f"0x{numeric.b64(x):016X}")


class WasmLowering(Lowering):
    """The engine's lowering with the names WebAssembly's semantics use: its integer
    helpers, and host floats (doubles) for its floating-point semantics."""

    constants = {k: v for k, v in vars(numeric).items() if isinstance(v, int)}

    def __init__(self, fc: _FunctionCompiler, operands: dict[str, Operand]) -> None:
        super().__init__(fc, operands, None, 0)
        self.fc = fc

    def _binop(self, op: ast.operator, x: Value, y: Value) -> Value:
        if isinstance(x, Float) or isinstance(y, Float):
            if not (isinstance(x, Float) and isinstance(y, Float)) or type(op) not in _FARITH:
                raise Unsupported("mixed float arithmetic")
            return Float(self.b.fbinary(_FARITH[type(op)], x.ir, y.ir))  # type: ignore[return-value]
        return super()._binop(op, x, y)

    def _compare(self, op: ast.cmpop, x: Value, y: Value) -> Value:
        if isinstance(x, Float) and isinstance(y, Float):
            return Emitted(self.b.fcmp(_FCMP[type(op)], x.ir, y.ir), 0, 1)
        return super()._compare(op, x, y)

    def _float(self, node: ast.expr) -> ir.Value:
        v = self._expr(node)
        if not isinstance(v, Float):
            raise Unsupported("an integer where a float is expected")
        return v.ir

    def _unpack(self, v: Value, bits: int) -> ir.Value:
        """The float whose bits ``v`` holds, as a double."""
        b = self.b
        x = b.cast("bitcast", v.at(b, bits), FLOAT_TYPES[bits])
        return x if bits == 64 else b.cast("fpext", x, DOUBLE)

    def _pack(self, x: ir.Value, bits: int) -> Value:
        """A double rounded to ``bits`` bits, as bits; any NaN the canonical one."""
        b = self.b
        narrow = x if bits == 64 else b.cast("fptrunc", x, FLOAT_TYPES[bits])
        raw = b.cast("bitcast", narrow, ir.IntType(bits))
        nan = b.fcmp("uno", x, x)
        return Emitted(b.select(nan, ir.Constant(raw.type, _CANON[bits]), raw), 0,
                       (1 << bits) - 1)

    def _call(self, call: ast.Call) -> Value:  # noqa: C901 - one case per helper
        b = self.b
        func, args = call.func, call.args
        if isinstance(func, ast.Attribute) and not args:
            v = self._expr(func.value)
            width = _width_of(v)
            x = v.at(b, width)
            if func.attr == "bit_length":
                clz = b.intrinsic(f"llvm.ctlz.i{width}", x.type, [x, ir.Constant(ir.I1, 0)])
                return Emitted(b.sub(ir.Constant(x.type, width), clz), 0, width)
            if func.attr == "bit_count":
                return Emitted(b.intrinsic(f"llvm.ctpop.i{width}", x.type, [x]), 0, width)
        name = func.id if isinstance(func, ast.Name) else None
        if name in ("f32", "f64"):
            return Float(self._unpack(self._expr(args[0]), int(name[1:])))  # type: ignore[return-value]
        if name in ("b32", "b64"):
            return self._pack(self._float(args[0]), int(name[1:]))
        if name == "fdiv":
            return Float(b.fbinary("fdiv", self._float(args[0]), self._float(args[1])))  # type: ignore[return-value]
        if name == "fsqrt":
            x = self._float(args[0])
            return Float(b.intrinsic("llvm.sqrt.f64", DOUBLE, [x]))  # type: ignore[return-value]
        if name in ("s32", "s64"):
            bits = int(name[1:])
            return Emitted(self._expr(args[0]).at(b, bits), -(1 << (bits - 1)),
                           (1 << (bits - 1)) - 1)
        if name == "float" or name == "int_to_f32":
            v = self._expr(args[0])
            if v.lo < -(1 << 63) or v.hi > numeric.M64:
                raise Unsupported("float() of a value beyond 64 bits")
            target = DOUBLE if name == "float" else FLOAT_TYPES[32]
            x = b.cast("uitofp" if v.unsigned else "sitofp", v.at(b, 64), target)
            if name == "float":
                return Float(x)  # type: ignore[return-value]
            return Emitted(b.cast("bitcast", x, ir.IntType(32)), 0, numeric.M32)
        if name in ("trunc", "trunc_sat"):
            lo, hi, mask = (self._int_constant(a) for a in args[1:])
            return self._truncate(self._float(args[0]), lo, hi, mask, name == "trunc")
        for bits in (32, 64):
            prefix = f"f{bits}_"
            if name and name.startswith(prefix):
                return self._float_bits_op(name[len(prefix):], [self._expr(a) for a in args],
                                           bits)
        if name == "sext":
            v, bits, mask = self._expr(args[0]), self._constant(args[1]), self._constant(args[2])
            wide = b.sext(v.at(b, bits), ir.IntType(mask.bit_length()))
            return Emitted(wide, 0, mask)
        if name == "rotl":
            v, n = self._expr(args[0]), self._expr(args[1])
            width = self._constant(args[2])
            x = v.at(b, width)
            rotated = b.intrinsic(f"llvm.fshl.i{width}", x.type, [x, x, n.at(b, width)])
            return Emitted(rotated, 0, (1 << width) - 1)
        if name in ("div_s", "rem_s", "div_u", "rem_u"):
            return self._division(name, [self._expr(a) for a in args[:2]],
                                  self._constant(args[2]) if len(args) > 2 else None)
        return super()._call(call)

    def _int_constant(self, node: ast.expr) -> int:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self._constant(node.operand)
        return self._constant(node)

    def _truncate(self, x: ir.Value, lo: int, hi: int, mask: int, trapping: bool) -> Value:
        """Float to integer: trapping (NaN, infinities and out of range trap) or saturating."""
        b = self.b
        bits = mask.bit_length()
        signed = lo < 0
        typ = ir.IntType(bits)
        if not trapping:
            kind = "fptosi" if signed else "fptoui"
            v = b.intrinsic(f"llvm.{kind}.sat.i{bits}.f64", typ, [x])
            return Emitted(v, 0, mask)
        with b.if_then(b.fcmp("uno", x, x)):
            self.fc.trap("invalid conversion to integer")
        below = lo - 1
        low_ok = (b.fcmp("ogt", x, _double(below)) if float(below) == below
                  else b.fcmp("oge", x, _double(lo)))
        in_range = b.and_(low_ok, b.fcmp("olt", x, _double(hi + 1)))
        with b.if_then(b.xor(in_range, ir.Constant(ir.I1, 1))):
            self.fc.trap("integer overflow")
        return Emitted(b.cast("fptosi" if signed else "fptoui", x, typ), 0, mask)

    def _float_bits_op(self, name: str, operands: list[Value], bits: int) -> Value:
        """f32_min, f64_nearest, ...: operations on bits, as numeric defines them."""
        b = self.b
        typ = ir.IntType(bits)
        ints = [v.at(b, bits) for v in operands]
        xs = [b.cast("bitcast", i, FLOAT_TYPES[bits]) for i in ints]
        quiet = ir.Constant(typ, _QUIET[bits])
        if name in ("min", "max"):
            (a, c), (x, y) = ints, xs
            is_min = name == "min"
            nan_x, nan_y = b.fcmp("uno", x, x), b.fcmp("uno", y, y)
            nan = b.or_(b.select(nan_x, a, c), quiet)
            equal = b.or_(a, c) if is_min else b.and_(a, c)
            pick = b.select(b.fcmp("olt" if is_min else "ogt", x, y), a, c)
            ordered = b.select(b.fcmp("oeq", x, y), equal, pick)
            return Emitted(b.select(b.or_(nan_x, nan_y), nan, ordered), 0, (1 << bits) - 1)
        if name in _ROUNDING:
            (a,), (x,) = ints, xs
            ftype = FLOAT_TYPES[bits]
            rounded = b.intrinsic(f"llvm.{_ROUNDING[name]}.{ftype}", ftype, [x])
            out = b.select(b.fcmp("uno", x, x), b.or_(a, quiet),
                           b.cast("bitcast", rounded, typ))
            return Emitted(out, 0, (1 << bits) - 1)
        raise Unsupported(f"f{bits}_{name}")

    def _division(self, name: str, operands: list[Value], bits: int | None) -> Value:
        """WebAssembly's trapping division: by zero traps, and so does MIN / -1."""
        b = self.b
        width = bits or max(_width_of(v) for v in operands)
        x, y = (v.at(b, width) for v in operands)
        typ = x.type
        with b.if_then(b.icmp_unsigned("==", y, ir.Constant(typ, 0))):
            self.fc.trap("integer divide by zero")
        if bits is None:
            return Emitted(b.udiv(x, y) if name == "div_u" else b.urem(x, y), 0, (1 << width) - 1)
        overflow = b.and_(b.icmp_signed("==", x, ir.Constant(typ, -(1 << (width - 1)))),
                          b.icmp_signed("==", y, ir.Constant(typ, -1)))
        if name == "div_s":
            with b.if_then(overflow):
                self.fc.trap("integer overflow")
            return Emitted(b.sdiv(x, y), 0, (1 << width) - 1)
        safe = b.select(overflow, ir.Constant(typ, 1), y)  # MIN rem -1 is 0, as rem by 1
        return Emitted(b.srem(x, safe), 0, (1 << width) - 1)


_TYPE_IDS: dict[object, int] = {}


def _type_id(ftype: object) -> int:
    """A number for each function type (0 for none), the same in every instance."""
    return _TYPE_IDS.setdefault(ftype, len(_TYPE_IDS) + 1)


def _numeric(ftype: object) -> bool:
    return all(t in NUMERIC for t in (*ftype.params, *ftype.results))  # type: ignore[attr-defined]


def _width_of(v: Value) -> int:
    """The width of the wasm integer a value of the semantics is (32 or 64 bits)."""
    if v.lo < 0 or v.hi > numeric.M64:
        raise Unsupported("an operand outside 64 unsigned bits")
    return 32 if v.hi <= numeric.M32 else 64


class _Construct:
    """An open block, loop, if or the function body, as branches to it see it."""

    def __init__(self, kind: str, height: int, params: int, results: int,
                 end: ir.Block, head: ir.Block | None = None) -> None:
        self.kind, self.height, self.params, self.results = kind, height, params, results
        self.end, self.head = end, head
        self.orelse: ir.Block | None = None

    @property
    def arity(self) -> int:
        return self.params if self.kind == "loop" else self.results


class _FunctionCompiler:
    """Emits one wasm function; also the lowering's target (only ``builder`` and traps are
    used: WebAssembly's semantics read no registers)."""

    def __init__(self, native: NativeInstance, fn: ir.Function, index: int,
                 wfn: WasmFunction) -> None:
        self.native, self.inst, self.wfn = native, native.inst, wfn
        self.fn = fn
        self.env, self.io = fn.args
        self.builder = b = ir.IRBuilder(fn.append_basic_block("entry"), fn)
        self.nparams = wfn.nparams
        self.locals = [b.alloca(I64) for _ in range(self.nparams + len(wfn.compiled.locals))]
        self.slots = [b.alloca(I64) for _ in range(wfn.compiled.max_height + 1)]
        self.h = 0
        self.ctrls: list[_Construct] = []
        self.fuel = self.inst.fuel is not None
        self.exit_status = fn.append_basic_block("exit")

    # -- the lowering's Target --
    def registers(self) -> dict[int, ir.Value]:
        return {}

    def set_registers(self, regs: dict[int, ir.Value]) -> None:
        pass

    def trap(self, message: str) -> None:
        """Leave with the trap ``message`` (ends the IR block)."""
        b = self.builder
        b.store(ir.Constant(I64, _TRAP[message]), self.field("trap"))
        self.leave(ir.Constant(I32, TRAPPED))

    # -- helpers --
    def field(self, name: str) -> ir.Value:
        return self.builder.gep(self.env, [ir.Constant(I32, _F[name])], source_etype=I64)

    def get(self, name: str, typ: ir.Type = I64) -> ir.Value:
        return self.builder.load(self.field(name), typ)

    def leave(self, status: ir.Value) -> None:
        """Return ``status``, the call depth given back."""
        b = self.builder
        depth = self.field("depth")
        b.store(b.sub(b.load(depth, I64), ir.Constant(I64, 1)), depth)
        b.ret(status)

    def slot(self, i: int) -> ir.Value:
        return self.builder.load(self.slots[i], I64)

    def set_slot(self, i: int, value: ir.Value) -> None:
        self.builder.store(value, self.slots[i])

    def io_word(self, i: int) -> ir.Value:
        return self.builder.gep(self.io, [ir.Constant(I32, i)], source_etype=I64)

    def spend_fuel(self) -> None:
        if not self.fuel:
            return
        b = self.builder
        fuel = self.field("fuel")
        left = b.load(fuel, I64)
        with b.if_then(b.icmp_signed("<=", left, ir.Constant(I64, 0))):
            self.trap("all fuel consumed")
        b.store(b.sub(left, ir.Constant(I64, 1)), fuel)

    def block_type(self, bt: object) -> tuple[int, int]:
        if bt is None:
            return 0, 0
        if isinstance(bt, str):
            return 0, 1
        t = self.inst.module.types[bt]
        return len(t.params), len(t.results)

    # -- the function --
    def compile(self, body: list[Instr]) -> None:
        b = self.builder
        if not _numeric(self.wfn.type) or any(t not in NUMERIC for t in self.wfn.compiled.locals):
            raise Unsupported("references in the function's parameters, results or locals")
        depth = self.field("depth")
        d = b.add(b.load(depth, I64), ir.Constant(I64, 1))
        b.store(d, depth)
        frame = b.cast("ptrtoint", b.intrinsic("llvm.frameaddress.p0", ir.PTR,
                                                [ir.Constant(I32, 0)]), I64)
        exhausted = b.or_(b.icmp_unsigned(">", d, ir.Constant(I64, MAX_CALL_DEPTH)),
                          b.icmp_unsigned("<", frame, self.get("stack_limit")))
        with b.if_then(exhausted):
            self.trap("call stack exhausted")
        for i in range(self.nparams):
            b.store(b.load(self.io_word(i), I64), self.locals[i])
        for i in range(self.nparams, len(self.locals)):
            b.store(ir.Constant(I64, 0), self.locals[i])
        self.spend_fuel()
        results = len(self.wfn.type.results)
        self.ctrls.append(_Construct("func", 0, 0, results, self.exit_status))
        dead_depth = 0
        dead = False
        for op, imm in body[:-1]:
            if dead:
                if op.imm == "blocktype":
                    dead_depth += 1
                    continue
                if op.name not in ("end", "else"):
                    continue
                if dead_depth:
                    dead_depth -= op.name == "end"
                    continue
                dead = False
            if op.kind == "control":
                dead = self.control(op, imm)
            else:
                self.compute(op, imm)
        self.goto(self.exit_status)
        b.position_at_end(self.exit_status)
        for i in range(results):
            b.store(self.slot(i), self.io_word(i))
        self.leave(ir.Constant(I32, OK))

    def move(self, target: _Construct) -> None:
        n = target.arity
        if n and self.h - n != target.height:
            values = [self.slot(self.h - n + i) for i in range(n)]
            for i, v in enumerate(values):
                self.set_slot(target.height + i, v)

    def goto(self, block: ir.Block) -> None:
        """Fall through to ``block``, unless the current block already ended."""
        if not self.builder.block.is_terminated:
            self.builder.branch(block)

    def branch(self, depth: int) -> None:
        target = self.ctrls[-1 - depth]
        self.move(target)
        if target.kind == "loop":
            self.spend_fuel()
            self.builder.branch(target.head)
        else:
            self.builder.branch(target.end)

    def control(self, op: Op, imm: object) -> bool:  # noqa: C901 - one case per instruction
        """Emit a control instruction; True if the code after it is unreachable."""
        b = self.builder
        name = op.name
        if name == "unreachable":
            self.trap("unreachable")
            return True
        if name in ("block", "loop", "if"):
            params, results = self.block_type(imm)
            if name == "if":
                self.h -= 1
                cond = b.icmp_unsigned("!=", self.slot(self.h), ir.Constant(I64, 0))
            c = _Construct(name, self.h - params, params, results, b.append_basic_block(name))
            self.ctrls.append(c)
            if name == "loop":
                c.head = b.append_basic_block("head")
                b.branch(c.head)
                b.position_at_end(c.head)
            elif name == "if":
                then, c.orelse = b.append_basic_block("then"), b.append_basic_block("else")
                b.cbranch(cond, then, c.orelse)
                b.position_at_end(then)
            return False
        if name == "else":
            c = self.ctrls[-1]
            self.goto(c.end)
            b.position_at_end(c.orelse)
            c.orelse = None
            self.h = c.height + c.params
            return False
        if name == "end":
            c = self.ctrls.pop()
            self.goto(c.end)
            if c.orelse is not None:  # an if without else: its params are its results
                b.position_at_end(c.orelse)
                b.branch(c.end)
            b.position_at_end(c.end)
            self.h = c.height + c.results
            return False
        if name == "br":
            self.branch(imm)
            return True
        if name == "br_if":
            self.h -= 1
            cond = b.icmp_unsigned("!=", self.slot(self.h), ir.Constant(I64, 0))
            taken, rest = b.append_basic_block("br_if"), b.append_basic_block("fall")
            b.cbranch(cond, taken, rest)
            b.position_at_end(taken)
            self.branch(imm)
            b.position_at_end(rest)
            return False
        if name == "br_table":
            labels, default = imm
            self.h -= 1
            index = self.slot(self.h)
            arms = {}
            for depth in sorted(set(labels) | {default}):
                arms[depth] = b.append_basic_block("case")
            b.switch(index, arms[default], [(i, arms[d]) for i, d in enumerate(labels)])
            for depth, block in arms.items():
                b.position_at_end(block)
                self.branch(depth)
            return True
        if name == "return":
            self.branch(len(self.ctrls) - 1)
            return True
        if name == "call":
            self.call(imm, self.inst.funcs[imm].type, None)
            return False
        if name == "call_indirect":
            type_index, table = imm
            self.h -= 1
            self.call(-1 - self.native.indirect_site(table, type_index),
                      self.inst.module.types[type_index], self.slot(self.h))
            return False
        raise Unsupported(f"control instruction {name}")

    def call(self, callee: int, ftype: object, element: ir.Value | None) -> None:
        b = self.builder
        if not _numeric(ftype):
            raise Unsupported("a call passing references")
        n, r = len(ftype.params), len(ftype.results)
        io = b.alloca(I64, max(n, r) + 1)
        self.h -= n
        for i in range(n):
            b.store(self.slot(self.h + i), b.gep(io, [ir.Constant(I32, i)], source_etype=I64))
        target = self.native.names.get(callee)
        if target is not None:
            status = b.call(ir.Value(ir.PTR, f"@{target}"), FUNCTION_TYPE, [self.env, io])
        elif element is not None:
            status = self.call_indirect(callee, ftype, element, io)
        else:
            status = self.call_slow(callee, io)
        failed = b.icmp_unsigned("!=", status, ir.Constant(I32, OK))
        with b.if_then(failed):
            b.ret(status)  # the callee gave its depth back; this frame's is the caller's
        for i in range(r):
            self.set_slot(self.h + i,
                          b.load(b.gep(io, [ir.Constant(I32, i)], source_etype=I64), I64))
        self.h += r

    def call_slow(self, callee: int, io: ir.Value) -> ir.Value:
        slow = self.get("call_slow", ir.PTR)
        return self.builder.call(slow, CALL_SLOW_TYPE, [self.env, ir.Constant(I64, callee), io])

    def call_indirect(self, site: int, ftype: object, element: ir.Value, io: ir.Value
                      ) -> ir.Value:
        """Through the table's mirror (see :meth:`NativeInstance.mirror_tables`) when it is
        valid and the element is a native function of the expected type; else in Python,
        which also traps as the other tiers do."""
        b = self.builder
        n = len(ftype.params)  # type: ignore[attr-defined]
        table, _ = self.native.indirect[-1 - site]
        fast, slow, done = (b.append_basic_block(x) for x in ("fast", "slow", "called"))
        mirror = b.load(b.gep(self.get("tables", ir.PTR), [ir.Constant(I32, 2 * table)],
                              source_etype=I64), ir.PTR)
        size = b.load(b.gep(self.get("tables", ir.PTR), [ir.Constant(I32, 2 * table + 1)],
                            source_etype=I64), I64)
        usable = b.and_(b.icmp_unsigned("!=", self.get("tables_valid"), ir.Constant(I64, 0)),
                        b.icmp_unsigned("<", element, size))
        check = b.append_basic_block("check")
        b.cbranch(usable, check, slow)
        b.position_at_end(check)
        entry = b.gep(mirror, [b.add(element, element)], source_etype=I64)
        type_id = b.load(entry, I64)
        address = b.load(b.gep(entry, [ir.Constant(I32, 1)], source_etype=I64), ir.PTR)
        expected = ir.Constant(I64, _type_id(ftype))
        b.cbranch(b.icmp_unsigned("==", type_id, expected), fast, slow)
        b.position_at_end(fast)
        fast_status = b.call(address, FUNCTION_TYPE, [self.env, io])
        fast_end = b.block
        b.branch(done)
        b.position_at_end(slow)
        b.store(element, b.gep(io, [ir.Constant(I32, n)], source_etype=I64))
        slow_status = self.call_slow(site, io)
        slow_end = b.block
        b.branch(done)
        b.position_at_end(done)
        status = b.phi(I32)
        status.add_incoming(fast_status, fast_end)
        status.add_incoming(slow_status, slow_end)
        return status

    def compute(self, op: Op, imm: object) -> None:
        b = self.builder
        n = len(op.params)
        base = self.h - n
        self.h = base + len(op.results)
        name = op.name
        if name == "local.get":
            self.set_slot(base, b.load(self.locals[imm], I64))
        elif name in ("local.set", "local.tee"):
            b.store(self.slot(base), self.locals[imm])
        elif name.endswith(".const"):
            self.set_slot(base, ir.Constant(I64, imm & MASKS[op.results[0]]))  # type: ignore[operator]
        elif name == "drop" or name == "nop":
            pass
        elif name in ("global.get", "global.set"):
            if self.inst.globals[imm].type not in NUMERIC:
                raise Unsupported("a reference global")
            ptr = b.gep(self.get("globals", ir.PTR), [ir.Constant(I32, imm)], source_etype=I64)
            if name == "global.get":
                self.set_slot(base, b.load(ptr, I64))
            else:
                b.store(self.slot(base), ptr)
        elif op.kind in ("load", "store"):
            self.access(op, imm, base)
        elif op.kind == "compute" and op.imm == "none" and len(op.results) == 1:
            # Every value is numeric (functions touching references are refused), so an
            # operand of a type-generic instruction (select's t) is 64 bits or fewer.
            operands = {x: Operand(self.slot(base + i), 0, MASKS.get(t, numeric.M64))
                        for i, (x, t) in enumerate(zip("abc", op.params, strict=False))}
            self.set_slot(base, WasmLowering(self, operands).value(op.sem))
        else:
            raise Unsupported(name)

    def access(self, op: Op, imm: object, base: int) -> None:
        """A load or store: the effective address checked against the memory's size."""
        b = self.builder
        size = op.size
        offset = imm[1]  # type: ignore[index]
        ea = b.add(self.slot(base), ir.Constant(I64, offset))
        end = b.add(ea, ir.Constant(I64, size))
        with b.if_then(b.icmp_unsigned(">", end, self.get("memory_size"))):
            self.trap(OOB_MEMORY)
        ptr = b.gep(self.get("memory", ir.PTR), [ea], source_etype=I8)
        typ = ir.IntType(8 * size)
        if op.kind == "load":
            v = b.load(ptr, typ, align=1)
            v = b.zext(v, I64) if size < 8 else v
            operands = {"v": Operand(v, 0, (1 << (8 * size)) - 1)}
            self.set_slot(base, WasmLowering(self, operands).value(op.sem))
        else:
            value = self.slot(base + 1)
            b.store(b.trunc(value, typ) if size < 8 else value, ptr, align=1)


class NativeInstance:
    """The native code of one instance, and the state it shares with Python."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.env = Env()
        self.env_address = ctypes.addressof(self.env)
        self.numeric_globals = [g for g in inst.globals]
        self.global_values = (ctypes.c_uint64 * max(1, len(inst.globals)))()
        self.env.globals = ctypes.addressof(self.global_values)
        self.call_slow = CALL_SLOW(self._call_slow)
        self.env.call_slow = ctypes.cast(self.call_slow, ctypes.c_void_p).value or 0
        self.pending: BaseException | None = None
        self.indirect: list[tuple[int, int]] = []  # call_indirect sites: (table, type)
        self.names: dict[int, str] = {}  # function index -> native function's name
        self.compiled: list[int] = []  # the functions that run natively, by index
        self.addresses: dict[int, int] = {}  # id() of each defined function: its code
        self.table_words = (ctypes.c_uint64 * max(2, 2 * len(inst.tables)))()
        self.env.tables = ctypes.addressof(self.table_words)
        self.mirrors: list[ctypes.Array] = []

    def mirror_tables(self) -> None:
        """Copy every table's elements where native code reads them: per element, its type
        and its native code, or 0 where only Python can call it (a host function, another
        instance's, a null). Valid until Python runs again (:meth:`enter`)."""
        self.mirrors = []
        for i, table in enumerate(self.inst.tables):
            words = (ctypes.c_uint64 * max(2, 2 * len(table.elements)))()
            for j, f in enumerate(table.elements):
                address = self.addresses.get(id(f))
                if address:
                    words[2 * j] = _type_id(f.type)  # type: ignore[union-attr]
                    words[2 * j + 1] = address
            self.mirrors.append(words)
            self.table_words[2 * i] = ctypes.addressof(words)
            self.table_words[2 * i + 1] = len(table.elements)
        self.env.tables_valid = 1

    def indirect_site(self, table: int, type_index: int) -> int:
        site = (table, type_index)
        if site not in self.indirect:
            self.indirect.append(site)
        return self.indirect.index(site)

    # -- state crossing between Python and native code --
    def enter(self) -> None:
        """Native code is about to run: give it Python's view of the state."""
        inst, env = self.inst, self.env
        env.tables_valid = 0
        if inst.mems:
            data = inst.mems[0].data
            env.memory = _address(data)
            env.memory_size = len(data)
        if inst.fuel is not None:
            env.fuel = inst.fuel
        values = self.global_values
        for i, g in enumerate(inst.globals):
            if g.type in NUMERIC:
                values[i] = g.value

    def leave(self) -> None:
        """Python is about to run: give it native code's view of the state."""
        inst, env = self.inst, self.env
        if inst.fuel is not None:
            inst.fuel = env.fuel
        values = self.global_values
        for i, g in enumerate(inst.globals):
            if g.mutable and g.type in NUMERIC:
                g.value = values[i]

    def _call_slow(self, env: int, callee: int, io: int) -> int:
        """Native code calls a function only Python can run (or an indirect call Python
        checks). Nothing may escape a ctypes callback, so an exception waits in
        ``pending``: native code then returns at once, Python's state being the current
        one (the entry point then does not copy native state back)."""
        depth = self.env.depth
        try:
            self.leave()
            inst = self.inst
            if callee >= 0:
                f = inst.funcs[callee]
                words = (ctypes.c_uint64 * (len(f.type.params) + 1)).from_address(io)
            else:
                table, type_index = self.indirect[-1 - callee]
                ftype = inst.module.types[type_index]
                words = (ctypes.c_uint64 * (len(ftype.params) + 1)).from_address(io)
                f = _call_target(inst.tables[table], ftype, words[len(ftype.params)])
            args = list(words[:len(f.type.params)])
            results = call_function(inst, f, args)
            out = (ctypes.c_uint64 * max(1, len(results))).from_address(io)
            for i, v in enumerate(results):
                out[i] = v
            self.enter()
            if callee < 0:
                self.mirror_tables()
            self.env.depth = depth
            return OK
        except RecursionError:
            self.pending = Trap("call stack exhausted")
        except BaseException as e:  # noqa: BLE001 - re-raised in Python by the caller
            self.pending = e
        self.env.depth = depth
        return PENDING

    # -- compiling --
    def compile(self) -> dict[int, Callable]:
        """Native entry points for every function the tier handles, by function index."""
        inst = self.inst
        first = len(inst.module.imported("func"))
        prefix = f"wasm{next(_names)}_"
        bodies = {first + offset: code.body for offset, code in enumerate(inst.module.codes)}
        self.names = {index: f"{prefix}{index}" for index in bodies}
        module = ir.Module()
        accepted = []
        for index, body in bodies.items():
            fn = ir.Function(module, FUNCTION_TYPE, self.names[index])
            try:
                _FunctionCompiler(self, fn, index, inst.funcs[index]).compile(body)
                accepted.append(index)
            except Unsupported:
                # Native callers reach it through Python (the translation tier).
                fn.blocks.clear()
                b = ir.IRBuilder(fn.append_basic_block("entry"), fn)
                slow = b.load(b.gep(fn.args[0], [ir.Constant(I32, _F["call_slow"])],
                                    source_etype=I64), ir.PTR)
                b.ret(b.call(slow, CALL_SLOW_TYPE, [fn.args[0], ir.Constant(I64, index),
                                                    fn.args[1]]))
        if not accepted:
            return {}
        try:
            code = _ENGINE.compile(str(module), list(self.names.values()))
        except RuntimeError:  # LLVM refused the IR: a lowering bug must not stop the program
            return {}
        self.compiled = accepted
        addresses = dict(zip(self.names, code, strict=True))
        self.addresses = {id(inst.funcs[i]): addresses[i] for i in self.names}
        return {index: self._entry(inst.funcs[index], addresses[index]) for index in accepted}

    def _entry(self, wfn: WasmFunction, address: int) -> Callable:
        """The Python entry point (the translation tier's calling convention)."""
        native = NATIVE_FN(address)
        n, r = wfn.nparams, len(wfn.type.results)
        io = (ctypes.c_uint64 * max(1, n, r))()
        io_address = ctypes.addressof(io)
        env = self.env_address

        def call(*args: int) -> object:
            self.enter()
            io[:n] = args
            depth = self.env.depth
            if not depth:  # the outermost native frame: the stack budget starts here
                self.env.stack_limit = _ENGINE.stack_pointer() - STACK_BUDGET
            status = native(env, io_address)
            self.env.depth = depth
            if status == PENDING:  # Python's state is the current one
                e, self.pending = self.pending, None
                raise e  # type: ignore[misc]
            self.leave()
            if status != OK:
                raise self._failure()
            return None if r == 0 else io[0] if r == 1 else tuple(io[:r])

        call.native = native  # type: ignore[attr-defined] # keeps the code's callers apart
        return call

    def _failure(self) -> BaseException:
        message = TRAPS[self.env.trap]
        return OutOfFuel() if message == "all fuel consumed" else Trap(message)


def _address(data: bytearray) -> int:
    """The address of a bytearray's contents, without holding an export on it (which
    would forbid growing it)."""
    if not data:
        return 0
    view = (ctypes.c_char * 1).from_buffer(data)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class _Engine:
    """One LLVM execution engine for all instances' native code (never freed)."""

    def __init__(self) -> None:
        self.engine = None
        self.frame_address: Callable[[], int] | None = None

    def compile(self, text: str, names: list[str]) -> list[int]:
        with LLVM_LOCK:
            if self.engine is None:
                llvm = jit.binding()
                target = jit.target_machine()
                self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target)
                # The stack variables become registers (SROA) and the CFG is tidied: on
                # the benchmark's kernels, instruction combining (RISC-V blocks' pipeline)
                # took 40% of the compile time for no measurable speed, and LLVM's standard
                # levels cost several times more, which a first call pays.
                self.passes = llvm.create_new_module_pass_manager()
                self.passes.add_sroa_pass()
                self.passes.add_simplify_cfg_pass()
                self.pass_builder = llvm.create_pass_builder(
                    target, llvm.PipelineTuningOptions(speed_level=0))
            llvm = jit.binding()
            mod = llvm.parse_assembly(text)
            mod.verify()
            self.passes.run(mod, self.pass_builder)
            self.engine.add_module(mod)
            self.engine.finalize_object()
            return [self.engine.get_function_address(name) for name in names]

    def stack_pointer(self) -> int:
        """About where the C stack is now (a native function's frame address)."""
        if self.frame_address is None:
            text = ("declare ptr @llvm.frameaddress.p0(i32)\n"
                    "define i64 @popek_wasm_frame() {\n"
                    "  %f = call ptr @llvm.frameaddress.p0(i32 0)\n"
                    "  %i = ptrtoint ptr %f to i64\n  ret i64 %i\n}\n")
            (address,) = self.compile(text, ["popek_wasm_frame"])
            self.frame_address = FRAME_FN(address)
        return self.frame_address()


_ENGINE = _Engine()


def compile_instance(inst: Instance) -> None:
    """Give ``inst``'s functions native entry points, on the first call into any of them
    (after :func:`popek.wasm.translator.translate_instance`, whose entry points stay for
    the functions this tier does not handle)."""
    first = len(inst.module.imported("func"))
    funcs = inst.funcs[first:]
    translated = [f.fast for f in funcs]
    state: dict[str, bool] = {}

    def stand_in(f: WasmFunction, fallback: Callable) -> Callable:
        def first_call(*args: object) -> object:
            if not state:
                state["compiled"] = True
                for g, fast in zip(funcs, translated, strict=True):
                    g.fast = fast
                native = NativeInstance(inst)
                inst.native = native  # type: ignore[attr-defined]
                for index, entry in native.compile().items():
                    inst.funcs[index].fast = entry  # type: ignore[attr-defined]
            return f.fast(*args)  # type: ignore[misc]
        return first_call

    for f, fast in zip(funcs, translated, strict=True):
        f.fast = stand_in(f, fast)  # type: ignore[attr-defined]
