"""Lower instruction semantics (the Python statements in :mod:`popek.isa`) to LLVM IR.

This is the native tier's front end, and like every tier it is derived from the one
declaration: it walks the semantics' syntax tree and emits IR for it. Python's integers
are unbounded, so each value carries the interval it may take, and the IR holds it as a
bit pattern (``i64`` when that identifies every value of the interval, else ``i128``),
read as unsigned when the interval is non-negative and as signed otherwise. Every
operation computes its result interval first and refuses (raising :class:`Unsupported`)
if no 128-bit pattern could identify it, so a lowered instruction either means exactly
what the Python means or is not lowered at all. Constructs outside the native vocabulary
(CSRs, hart services; fused multiply-add on a host without FMA) raise :class:`Unsupported`
too; the native tier then runs that instruction through its Python handler.

Softfloat's helpers become the host's IEEE arithmetic (:mod:`popek.engine.hostfp`), which
has no round-to-nearest-ties-away: an instruction whose rounding mode turns out to be
RMM, or reserved, runs its Python handler instead (see :meth:`Lowering._hand_over_unless`).

Values are emitted lazily, at the width their consumer needs (see :class:`Value`), so
the common ``(X[rs1] + imm) & M64`` becomes one ``i64`` add, and locals and registers
are SSA values the lowering merges itself at joins: LLVM gets little to simplify.

Conditional expressions are lowered to branches, never to ``select``: their arms may
divide, and only the taken one may run.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from popek.cpu.csr import FCSR
from popek.cpu.state import CTL_RESERVATION, NO_RESERVATION
from popek.engine import hostfp
from popek.engine import irtext as ir
from popek.isa import helpers
from popek.isa.softfloat import F32_QNAN, FP_RMM

I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
I128 = ir.IntType(128)
INT_TYPES = {w: ir.IntType(w) for w in (1, 8, 16, 32, 64, 128)}
WIDE = 1 << 128
U64_MAX = (1 << 64) - 1
LOADS = {f"ld{n}": n // 8 for n in (8, 16, 32, 64)}
AMO_LOADS = {f"amo_ld{n}": n // 8 for n in (8, 16, 32, 64)}
STORES = {f"st{n}": n // 8 for n in (8, 16, 32, 64)}
SIGN_EXTENDERS = {"sext8": 8, "sext16": 16, "sext32": 32}  # to an unsigned 64-bit value
SIGNED_READERS = {"signed": 64, "signed32": 32}  # the low bits read as a signed integer
BIT_COUNTS = {"clz": "ctlz", "ctz": "cttz", "cpop": "ctpop"}  # helper: LLVM intrinsic
CONSTANTS = {name: value for name in helpers.__all__
             if isinstance(value := getattr(helpers, name), int)}


class Unsupported(Exception):
    """The semantics use something the native tier does not lower."""


def _fits(lo: int, hi: int, width: int) -> bool:
    """Whether ``width``-bit patterns identify every integer in [lo, hi]."""
    return (0 <= lo and hi >> width == 0) or (-(1 << (width - 1)) <= lo and hi < 1 << (width - 1))


def _checked(lo: int, hi: int) -> tuple[int, int]:
    """The interval, if an i128 pattern identifies each of its values; else refuse."""
    if _fits(lo, hi, 128):
        return lo, hi
    raise Unsupported(f"an intermediate value may not fit 128 bits: [{lo}, {hi}]")


def _width(lo: int, hi: int) -> int:
    """The IR width a value of [lo, hi] is held in when all of it matters."""
    return 64 if _fits(lo, hi, 64) else 128


def _pattern(v: int, width: int) -> int:
    """The low ``width`` bits of ``v``, spelled as LLVM reads an integer constant."""
    v &= (1 << width) - 1
    return v - (1 << width) if v >> (width - 1) else v


def _int(width: int) -> ir.IntType:
    return INT_TYPES.get(width) or ir.IntType(width)


class Value:
    """A Python integer on its way into IR: the interval it lies in, and its bits.

    ``at(b, w)`` emits the value's low ``w`` bits as an ``iw`` (above ``width``, the
    pattern extended by the value's sign). The low bits of a sum, difference, product,
    left shift or bitwise result depend only on the low bits of the operands, so those
    are emitted only when a consumer asks, at the width it asks for: the 65-bit sum in
    ``(X[rs1] + imm) & M64`` becomes an ``i64`` add. A lazy value is asked once, where
    its consumer is emitted, which is always on the path that computed its operands.
    """

    __slots__ = ("lo", "hi", "width")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = _checked(lo, hi)
        self.width = _width(lo, hi)

    @property
    def unsigned(self) -> bool:
        return self.lo >= 0

    def at(self, b: ir.IRBuilder, width: int) -> ir.Value:
        if width <= self.width:
            return self.low(b, width)
        narrow = self.low(b, self.width)
        return (b.zext if self.unsigned else b.sext)(narrow, _int(width))

    def low(self, b: ir.IRBuilder, width: int) -> ir.Value:
        """The low ``width`` bits, ``width`` at most ``self.width``."""
        raise NotImplementedError


class Emitted(Value):
    """A value already in IR, as a pattern of any width that identifies it."""

    __slots__ = ("ir",)

    def __init__(self, value: ir.Value, lo: int, hi: int) -> None:
        super().__init__(lo, hi)
        self.ir = value

    def at(self, b: ir.IRBuilder, width: int) -> ir.Value:
        have = self.ir.type.width
        if width == have:
            return self.ir
        if width < have:
            return b.trunc(self.ir, _int(width))
        return (b.zext if self.unsigned else b.sext)(self.ir, _int(width))


class Const(Value):
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        super().__init__(value, value)
        self.value = value

    def at(self, b: ir.IRBuilder, width: int) -> ir.Value:
        return ir.Constant(_int(width), _pattern(self.value, width))


class Lazy(Value):
    """A value whose low bits ``low(b, w)`` emits on demand (see :class:`Value`)."""

    __slots__ = ("low",)

    def __init__(self, lo: int, hi: int, low: Callable[[ir.IRBuilder, int], ir.Value]) -> None:
        super().__init__(lo, hi)
        self.low = low


def _modular(op: str, x: Value, y: Value, lo: int, hi: int) -> Value:
    """``x op y`` for an operation whose low bits need only the operands' low bits."""
    if lo == hi:
        return Const(lo)

    def low(b: ir.IRBuilder, w: int) -> ir.Value:
        if isinstance(y, Const) and _identity(op, y.value, w):
            return x.at(b, w)  # x & ~0, x + 0, x - 0, x | 0, x ^ 0 in the low bits
        if isinstance(x, Const) and op != "sub" and _identity(op, x.value, w):
            return y.at(b, w)
        if op == "sub" and isinstance(y, Const) and y.value == 1 << (w - 1):
            u = _flipped(x, w)
            if u is not None:  # (u ^ S) - S, S the top bit: u's own bits (signed(u))
                return u.at(b, w)
        return getattr(b, _OPS[op])(x.at(b, w), y.at(b, w))

    return Operation(lo, hi, low, op, x, y)


class Operation(Lazy):
    """A lazy ``x op y``, kept apart so consumers can see through sign-bit flips."""

    __slots__ = ("op", "x", "y")

    def __init__(self, lo: int, hi: int, low: Callable[[ir.IRBuilder, int], ir.Value],
                 op: str, x: Value, y: Value) -> None:
        super().__init__(lo, hi, low)
        self.op, self.x, self.y = op, x, y


def _flipped(v: Value, width: int) -> Value | None:
    """The ``u`` of ``v = u ^ S``, S the top bit of ``width`` bits, or None."""
    if isinstance(v, Operation) and v.op == "xor":
        for u, flip in ((v.x, v.y), (v.y, v.x)):
            if isinstance(flip, Const) and flip.value == 1 << (width - 1):
                return u
    return None


def _identity(op: str, constant: int, width: int) -> bool:
    """Whether ``constant``'s low ``width`` bits leave the other operand of ``op`` as is."""
    low = constant & ((1 << width) - 1)
    return low == (1 << width) - 1 if op == "and" else op != "mul" and low == 0


_OPS = {"add": "add", "sub": "sub", "mul": "mul", "and": "and_", "or": "or_", "xor": "xor"}


class Target(Protocol):
    """Where lowered code reads and writes machine state (a block or a single step)."""

    builder: ir.IRBuilder

    def read_x(self, reg: int | ir.Value) -> ir.Value: ...  # an i64

    def write_x(self, reg: int | ir.Value, value: ir.Value) -> None: ...

    def registers(self) -> dict[int, ir.Value]: ...  # the SSA registers now (a copy)

    def set_registers(self, regs: dict[int, ir.Value]) -> None: ...

    def read_state(self, buffer: str, index: int | ir.Value) -> ir.Value: ...  # "f", "ctl"

    def write_state(self, buffer: str, index: int | ir.Value, value: ir.Value) -> None: ...

    def load(self, addr: ir.Value, size: int, writable: bool) -> ir.Value: ...  # i64

    def store(self, addr: ir.Value, size: int, value: ir.Value) -> None: ...

    def trap(self, cause: ir.Value, tval: ir.Value) -> None: ...  # ends the IR block

    def jump(self, target: ir.Value) -> None: ...  # ends the IR block

    # csr_op(csr, kind, value, do_read, do_write): the read value (Unsupported where
    # CSRs stay with Python)
    def csr_op(self, csr: ir.Value, kind: int, value: ir.Value, do_read: ir.Value,
               do_write: ir.Value) -> ir.Value: ...

    # run_handler(): the instruction through its Python handler, which finds and leaves
    # state in memory; False if that ended the IR block (then nothing follows it)
    def run_handler(self) -> bool: ...


@dataclass(frozen=True)
class Operand:
    """A decoded operand: a constant (in a block) or a run-time i64 (in a generic step)."""

    value: int | ir.Value
    lo: int
    hi: int


@cache
def parsed(sem: str) -> ast.Module:
    return ast.parse(sem)


@cache
def hands_over(sem: str) -> bool:
    """Whether lowered ``sem`` may run its Python handler (it reads a rounding mode)."""
    return any(isinstance(n, ast.Name) and n.id == "fp_rm" for n in ast.walk(parsed(sem)))


@cache
def reads_pc(sem: str) -> bool:
    """Whether ``sem`` reads its instruction's address (``pc`` or ``NEXT``)."""
    return any(isinstance(n, ast.Name) and n.id in ("pc", "NEXT") for n in ast.walk(parsed(sem)))


_COMPARISONS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
                ast.GtE: ">="}


class Lowering:
    """Emits one instruction's semantics into ``target``'s current IR block; ``pc`` may
    be None when the semantics do not read it (see :func:`reads_pc`).

    An instruction set's names (constants, helpers its semantics call) extend the
    vocabulary in a subclass (:class:`popek.wasm.native` for WebAssembly)."""

    constants: dict[str, int] = CONSTANTS
    fp_helpers: dict[str, hostfp.Helper] = hostfp.HELPERS

    def __init__(self, target: Target, operands: dict[str, Operand], pc: ir.Value | None,
                 length: int) -> None:
        self.t = target
        self.b = target.builder
        self.operands = operands
        self.pc = pc
        self.length = length
        self.locals: dict[str, Emitted] = {}
        self.wrote = False  # whether state was written yet (then it may not hand over)
        # Where paths that ran the Python handler instead rejoin, at the instruction's end:
        # (IR block, locals, registers) of each.
        self.handed: list[tuple[ir.Block, dict[str, Emitted], dict[int, ir.Value]]] = []

    # -- statements ---------------------------------------------------------------------
    def lower(self, sem: str) -> bool:
        """Lower ``sem``; True if control may fall through to the next instruction."""
        falls = self._statements(parsed(sem).body)
        if not self.handed:
            return falls
        here = [(self.b.block, self.locals, self.t.registers())] if falls else []
        self._join(self.handed + here)
        return True

    def value(self, sem: str) -> ir.Value:
        """Lower the expression ``sem``, whose value the semantics keep within 64 unsigned
        bits, to an i64."""
        expr = parsed(sem).body[0]
        if not isinstance(expr, ast.Expr):
            raise Unsupported(f"{sem!r} is not an expression")
        return self._u64(self._expr(expr.value))

    def _statements(self, body: list[ast.stmt]) -> bool:
        for stmt in body:
            if not self._statement(stmt):
                return False  # the rest is unreachable
        return True

    def _statement(self, s: ast.stmt) -> bool:
        if isinstance(s, ast.Pass):
            return True
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            target = s.targets[0]
            if _is_reservation(target) and _is_none(s.value):
                return self._assign(target, Const(NO_RESERVATION))
            if isinstance(target, ast.Tuple) and isinstance(s.value, ast.Call):
                values = self._fp_call(s.value)  # r, fl = f64_add(...)
                if len(values) != len(target.elts):
                    raise Unsupported(f"statement {ast.unparse(s)!r}")
                for name, value in zip(target.elts, values, strict=True):
                    self._assign(name, value)
                return True
            return self._assign(target, self._expr(s.value))
        if isinstance(s, ast.AugAssign):  # C[3] |= fl
            return self._assign(s.target, self._binop(s.op, self._expr(s.target),
                                                      self._expr(s.value)))
        if isinstance(s, ast.If):
            return self._if(s)
        if isinstance(s, ast.Return) and s.value is not None:
            self.t.jump(self._u64(self._expr(s.value)))
            return False
        if isinstance(s, ast.Raise) and isinstance(s.exc, ast.Call) and _name(s.exc.func) == "Trap":
            cause, tval = (self._u64(self._expr(a)) for a in s.exc.args)
            self.t.trap(cause, tval)
            return False
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            if _name(s.value.func) == "fp_rm":  # only checks the mode (fcvt.d.s)
                self._expr(s.value)
                return True
            return self._call_statement(s.value)
        raise Unsupported(f"statement {ast.unparse(s)!r}")

    def _assign(self, target: ast.expr, value: Value) -> bool:
        if isinstance(target, ast.Name) and target.id not in self.operands:
            self.locals[target.id] = self._emitted(value)
            return True
        self.wrote = True
        if isinstance(target, ast.Subscript) and _name(target.value) == "X":
            self.t.write_x(self._register(target.slice), self._u64(value))
            return True
        if isinstance(target, ast.Subscript) and _name(target.value) == "F":
            self.t.write_state("f", self._register(target.slice), self._u64(value))
            return True
        if _is_fcsr(target):
            self.t.write_state("csr", FCSR, self._u64(value))
            return True
        if _is_reservation(target):
            self.t.write_state("ctl", CTL_RESERVATION, self._u64(value))
            return True
        raise Unsupported(f"assignment to {ast.unparse(target)!r}")

    def _emitted(self, v: Value) -> Emitted:
        """``v`` emitted here (it is used more than once, or on later paths)."""
        return v if isinstance(v, Emitted) else Emitted(v.at(self.b, v.width), v.lo, v.hi)

    def _if(self, s: ast.If) -> bool:
        b = self.b
        cond = self._truth(self._expr(s.test))
        then_bb = b.append_basic_block("then")
        else_bb = b.append_basic_block("else")
        b.cbranch(cond, then_bb, else_bb)
        before_locals, before_regs = self.locals, self.t.registers()
        arms = []  # (end block, locals, registers) of each arm that falls through
        for bb, body in ((then_bb, s.body), (else_bb, s.orelse)):
            b.position_at_end(bb)
            self.locals = dict(before_locals)
            self.t.set_registers(dict(before_regs))
            if self._statements(body):
                arms.append((b.block, self.locals, self.t.registers()))
        self._join(arms)
        return bool(arms)

    def _join(self, arms: list[tuple[ir.Block, dict[str, Emitted], dict[int, ir.Value]]]
              ) -> None:
        """Continue where the arms that fall through meet: a local or register that
        differs between them becomes a phi (a local defined on only some is dropped)."""
        b = self.b
        join_bb = b.append_basic_block("join")
        if not arms:
            b.position_at_end(join_bb)
            b.unreachable()
            return
        phis: list[tuple[str | int, int, int, int, list[ir.Value]]] = []
        locals_: dict[str, Emitted] = {}
        for name in sorted(set.intersection(*(set(arm[1]) for arm in arms))):
            values = [arm[1][name] for arm in arms]
            if all(v is values[0] for v in values):
                locals_[name] = values[0]
                continue
            lo, hi = min(v.lo for v in values), max(v.hi for v in values)
            width = _width(lo, hi)
            incoming = []
            for (bb, _, _), v in zip(arms, values, strict=True):
                b.position_at_end(bb)
                incoming.append(v.at(b, width))
            phis.append((name, lo, hi, width, incoming))
        regs: dict[int, ir.Value] = {}
        for n in sorted(set.intersection(*(set(arm[2]) for arm in arms))):
            values = [arm[2][n] for arm in arms]
            if all(v is values[0] for v in values):
                regs[n] = values[0]
            else:
                phis.append((n, 0, U64_MAX, 64, values))
        for bb, _, _ in arms:
            b.position_at_end(bb)
            b.branch(join_bb)
        b.position_at_end(join_bb)
        for key, lo, hi, width, incoming in phis:
            phi = b.phi(_int(width))
            for value, (bb, _, _) in zip(incoming, arms, strict=True):
                phi.add_incoming(value, bb)
            if isinstance(key, str):
                locals_[key] = Emitted(phi, lo, hi)
            else:
                regs[key] = phi
        self.locals = locals_
        self.t.set_registers(regs)

    def _call_statement(self, call: ast.Call) -> bool:
        b = self.b
        name = _name(call.func)
        if name in STORES:
            self.wrote = True
            addr, value = (self._expr(a) for a in call.args)
            size = STORES[name]
            low = value.at(b, 8 * size)
            self.t.store(self._u64(addr), size, b.zext(low, I64) if size < 8 else low)
            return True
        if name == "check_aligned":
            addr, size, cause = call.args
            a = self._u64(self._expr(addr))
            misaligned = b.icmp_unsigned(
                "!=", b.and_(a, ir.Constant(I64, self._constant(size) - 1)),
                ir.Constant(I64, 0))
            with b.if_then(misaligned, likely=False):
                self.t.trap(ir.Constant(I64, self._constant(cause)), a)
            return True
        raise Unsupported(f"call {ast.unparse(call)!r}")

    # -- expressions --------------------------------------------------------------------
    def _constant(self, node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.constants:
            return self.constants[node.id]
        raise Unsupported(f"{ast.unparse(node)!r} is not a constant")

    def _register(self, node: ast.expr) -> int | ir.Value:
        if isinstance(node, ast.Name) and node.id in ("rd", "rs1", "rs2"):
            return self.operands[node.id].value
        if isinstance(node, ast.BinOp):  # F[imm & 31]: fused multiply-add's third source
            index = self._expr(node)
            if 0 <= index.lo and index.hi <= 31:
                return index.value if isinstance(index, Const) else index.at(self.b, 64)
        raise Unsupported(f"register {ast.unparse(node)!r}")

    def _expr(self, e: ast.expr) -> Value:  # noqa: C901 - one case per syntax form
        if isinstance(e, ast.Constant) and isinstance(e.value, int):
            return Const(int(e.value))
        if isinstance(e, ast.Name):
            return self._name(e.id)
        if isinstance(e, ast.Subscript) and _name(e.value) == "X":
            reg = self._register(e.slice)
            if isinstance(reg, int) and reg == 0:
                return Const(0)
            return Emitted(self.t.read_x(reg), 0, U64_MAX)
        if isinstance(e, ast.Subscript) and _name(e.value) == "F":
            return Emitted(self.t.read_state("f", self._register(e.slice)), 0, U64_MAX)
        if _is_reservation(e):
            return Emitted(self.t.read_state("ctl", CTL_RESERVATION), 0, U64_MAX)
        if _is_fcsr(e):
            return Emitted(self.t.read_state("csr", FCSR), 0, U64_MAX)
        if isinstance(e, ast.BinOp):
            return self._binop(e.op, self._expr(e.left), self._expr(e.right))
        if isinstance(e, ast.UnaryOp):
            v = self._expr(e.operand)
            if isinstance(e.op, ast.USub):
                return _modular("sub", Const(0), v, -v.hi, -v.lo)
            if isinstance(e.op, ast.Invert):
                return _modular("xor", v, Const(-1), -v.hi - 1, -v.lo - 1)
            if isinstance(e.op, ast.UAdd):
                return v
        if isinstance(e, ast.Compare) and len(e.ops) == 1:
            return self._compare(e.ops[0], self._expr(e.left), self._expr(e.comparators[0]))
        if isinstance(e, ast.IfExp):
            return self._ifexp(e)
        if isinstance(e, ast.Call):
            return self._call(e)
        raise Unsupported(f"expression {ast.unparse(e)!r}")

    def _name(self, name: str) -> Value:
        if name in self.locals:
            return self.locals[name]
        if name in self.constants:
            return Const(self.constants[name])
        if name == "pc":
            return Emitted(self.pc, 0, U64_MAX)
        if name == "NEXT":
            return Emitted(self.b.add(self.pc, ir.Constant(I64, self.length)), 0, U64_MAX)
        if name in self.operands:
            op = self.operands[name]
            if isinstance(op.value, int):
                return Const(op.value)
            return Emitted(op.value, op.lo, op.hi)  # an i64, read as signed if lo < 0
        raise Unsupported(f"name {name!r}")

    def _u64(self, v: Value) -> ir.Value:
        """A value the semantics keep within 64 unsigned bits, as an i64."""
        if v.lo < 0 or v.hi > U64_MAX:
            raise Unsupported(f"value [{v.lo}, {v.hi}] used as 64 unsigned bits")
        return v.at(self.b, 64)

    def _truth(self, v: Value) -> ir.Value:
        if isinstance(v, Emitted) and v.ir.type.width == 1:
            return v.ir
        return self.b.icmp_unsigned("!=", v.at(self.b, v.width), ir.Constant(_int(v.width), 0))

    def _binop(self, op: ast.operator, x: Value, y: Value) -> Value:  # noqa: C901
        corners = [(p, q) for p in (x.lo, x.hi) for q in (y.lo, y.hi)]
        if isinstance(op, ast.Add):
            return _modular("add", x, y, x.lo + y.lo, x.hi + y.hi)
        if isinstance(op, ast.Sub):
            return _modular("sub", x, y, x.lo - y.hi, x.hi - y.lo)
        if isinstance(op, ast.Mult):
            products = [p * q for p, q in corners]
            return _modular("mul", x, y, min(products), max(products))
        if isinstance(op, ast.BitAnd):
            if x.unsigned or y.unsigned:
                hi = min(v.hi for v in (x, y) if v.unsigned)
                return _modular("and", x, y, 0, hi)
            k = _bit_bound(x.lo, x.hi, y.lo, y.hi)
            return _modular("and", x, y, -(1 << k), (1 << k) - 1)
        if isinstance(op, (ast.BitOr, ast.BitXor)):
            name = "or" if isinstance(op, ast.BitOr) else "xor"
            if x.unsigned and y.unsigned:
                return _modular(name, x, y, 0, (1 << max(x.hi, y.hi).bit_length()) - 1)
            k = _bit_bound(x.lo, x.hi, y.lo, y.hi)
            return _modular(name, x, y, -(1 << k), (1 << k) - 1)
        if isinstance(op, (ast.LShift, ast.RShift)):
            if y.lo < 0 or y.hi >= 128:
                raise Unsupported("shift amount outside [0, 128)")
            if isinstance(op, ast.LShift):
                shifted = [p << q for p, q in corners]
                return _left_shift(x, y, min(shifted), max(shifted))
            shifted = [p >> q for p, q in corners]
            # The result needs all of x's bits, at a width wider than any shift amount.
            w = x.width if y.hi < x.width else 128
            fn = self.b.lshr if x.unsigned else self.b.ashr
            return Emitted(fn(x.at(self.b, w), y.at(self.b, w)), min(shifted), max(shifted))
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            return self._floor_division(isinstance(op, ast.FloorDiv), x, y)
        raise Unsupported(f"operator {type(op).__name__}")

    def _floor_division(self, quotient: bool, x: Value, y: Value) -> Value:
        """Python's ``//`` and ``%`` (round toward minus infinity); callers exclude y == 0."""
        b = self.b
        big = max(abs(x.lo), abs(x.hi))
        div_bound = max(abs(y.lo), abs(y.hi)) - 1
        if x.unsigned and y.unsigned:
            if quotient:
                return Emitted(self._divide("udiv", x, y), 0, x.hi)
            return Emitted(self._divide("urem", x, y), 0, max(y.hi - 1, 0))
        x, y = self._emitted(x), self._emitted(y)
        q, r = self._signed_quotient(x, y).at(b, 128), b.sext(self._divide("srem", x, y), I128)
        zero = ir.Constant(I128, 0)
        divisor = y.at(b, 128)
        # Truncating division rounds toward zero; floor differs when the signs differ.
        adjust = b.and_(b.icmp_signed("!=", r, zero),
                        b.icmp_signed("<", b.xor(r, divisor), zero))
        if quotient:
            return Emitted(b.sub(q, b.zext(adjust, I128)), -big - 1, big)
        return Emitted(b.select(adjust, b.add(r, divisor), r), -div_bound, div_bound)

    def _divide(self, op: str, x: Value, y: Value) -> ir.Value:
        """Truncating division of 64-bit operands, done in 64 bits (128-bit division would
        need a runtime library): the one overflowing case, MIN / -1, divides by 1 instead,
        which gives the right remainder (0) and the right low 64 bits of the quotient."""
        b = self.b
        signed = op.startswith("s")
        lo, hi = (-(1 << 63), (1 << 63) - 1) if signed else (0, U64_MAX)
        if any(v.lo < lo or v.hi > hi for v in (x, y)):
            raise Unsupported("division beyond 64-bit operands")
        a, d = x.at(b, 64), y.at(b, 64)
        if not signed:
            return getattr(b, op)(a, d)
        return getattr(b, op)(a, b.select(self._overflows(a, d), ir.Constant(I64, 1), d))

    def _overflows(self, a: ir.Value, d: ir.Value) -> ir.Value:
        b = self.b
        return b.and_(b.icmp_signed("==", a, ir.Constant(I64, -(1 << 63))),
                      b.icmp_signed("==", d, ir.Constant(I64, -1)))

    def _signed_quotient(self, x: Emitted, y: Emitted) -> Value:
        """Truncating ``x / y``: MIN / -1 = 2**63, which only the 128-bit pattern holds."""
        big = max(abs(x.lo), abs(x.hi))
        q = Emitted(self._divide("sdiv", x, y), -(1 << 63), (1 << 63) - 1)

        def low(b: ir.IRBuilder, w: int) -> ir.Value:
            if w <= 64:
                return q.at(b, w)
            overflow = self._overflows(x.at(b, 64), y.at(b, 64))
            return b.select(overflow, ir.Constant(_int(w), 1 << 63), q.at(b, w))

        return Lazy(-big, big, low)

    def _compare(self, op: ast.cmpop, x: Value, y: Value) -> Value:
        lo, hi = _checked(min(x.lo, y.lo), max(x.hi, y.hi))  # both read the same way
        sym = _COMPARISONS.get(type(op))
        if sym is None:
            raise Unsupported(f"comparison {type(op).__name__}")
        w = _width(lo, hi)
        cmp = self.b.icmp_unsigned if lo >= 0 else self.b.icmp_signed
        u, v = _flipped(x, w), _flipped(y, w)
        if lo >= 0 and u is not None and v is not None:
            x, y, cmp = u, v, self.b.icmp_signed  # (u ^ S) < (v ^ S) unsigned: u < v signed
        return Emitted(cmp(sym, x.at(self.b, w), y.at(self.b, w)), 0, 1)

    def _ifexp(self, e: ast.IfExp) -> Value:
        b = self.b
        cond = self._truth(self._expr(e.test))
        arms = []
        then_bb = b.append_basic_block("ifexp.then")
        else_bb = b.append_basic_block("ifexp.else")
        join_bb = b.append_basic_block("ifexp.join")
        b.cbranch(cond, then_bb, else_bb)
        for bb, node in ((then_bb, e.body), (else_bb, e.orelse)):
            b.position_at_end(bb)
            arms.append((self._expr(node), b.block))
        lo, hi = min(v.lo for v, _ in arms), max(v.hi for v, _ in arms)
        width = _width(*_checked(lo, hi))
        incoming = []
        for v, bb in arms:  # each arm's value is emitted on its own path
            b.position_at_end(bb)
            incoming.append((v.at(b, width), bb))
            b.branch(join_bb)
        b.position_at_end(join_bb)
        phi = b.phi(_int(width))
        for value, bb in incoming:
            phi.add_incoming(value, bb)
        return Emitted(phi, lo, hi)

    def _call(self, call: ast.Call) -> Value:
        b = self.b
        name = _name(call.func)
        args = call.args
        if name == "csr_op":
            csr, kind, value, do_read, do_write = args
            return Emitted(self.t.csr_op(
                self._u64(self._expr(csr)), self._constant(kind), self._u64(self._expr(value)),
                self._truth(self._expr(do_read)), self._truth(self._expr(do_write))),
                0, U64_MAX)
        if name in LOADS or name in AMO_LOADS:
            size = LOADS.get(name) or AMO_LOADS[name]
            v = self.t.load(self._u64(self._expr(args[0])), size, name in AMO_LOADS)
            return Emitted(v, 0, (1 << (8 * size)) - 1)
        if name in SIGN_EXTENDERS:
            low = self._expr(args[0]).at(b, SIGN_EXTENDERS[name])
            return Emitted(b.sext(low, I64), 0, U64_MAX)
        if name in SIGNED_READERS:
            bits = SIGNED_READERS[name]
            v = self._expr(args[0])
            if bits == 64:
                self._u64(v)  # signed() reads a register value; elsewhere it means more
            return Emitted(v.at(b, bits), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        if name in ("div_trunc", "rem_trunc"):
            x, y = (self._emitted(self._expr(a)) for a in args)
            big = max(abs(x.lo), abs(x.hi))
            if name == "div_trunc":
                return self._signed_quotient(x, y)
            bound = min(big, max(abs(y.lo), abs(y.hi)))
            return Emitted(self._divide("srem", x, y), -bound, bound)
        if name in BIT_COUNTS:  # clz(v, bits), ctz(v, bits): of the low ``bits`` bits
            width = self._constant(args[1]) if len(args) > 1 else 64
            v = self._expr(args[0])
            if v.lo < 0 or v.hi >> width:
                raise Unsupported(f"{name} of a value wider than {width} bits")
            x = v.at(b, width)
            extra = [ir.Constant(I1, 0)] if name != "cpop" else []  # zero input: ``width``
            count = b.intrinsic(f"llvm.{BIT_COUNTS[name]}.i{width}", _int(width), [x, *extra])
            return Emitted(count if width == 64 else b.zext(count, I64), 0, width)
        if name == "rev8":
            return Emitted(b.intrinsic("llvm.bswap.i64", I64, [self._u64(self._expr(args[0]))]),
                           0, U64_MAX)
        if name == "int" and len(args) == 1:
            return self._expr(args[0])
        if name == "fp_unbox32":  # a single not NaN-boxed reads as the canonical NaN
            v = self._u64(self._expr(args[0]))
            boxed = b.icmp_unsigned("==", b.lshr(v, ir.Constant(I64, 32)),
                                    ir.Constant(I64, 0xFFFFFFFF))
            low = b.and_(v, ir.Constant(I64, 0xFFFFFFFF))
            return Emitted(b.select(boxed, low, ir.Constant(I64, F32_QNAN)), 0, 0xFFFFFFFF)
        if name == "fp_rm":
            return self._rounding_mode(*(self._expr(a) for a in args))
        if name in self.fp_helpers:
            values = self._fp_call(call)
            if len(values) == 1:
                return values[0]
        raise Unsupported(f"call {ast.unparse(call)!r}")

    # -- floating point -----------------------------------------------------------------
    def _rounding_mode(self, field: Value, fcsr: Value) -> Value:
        """``fp_rm(field, fcsr)``: the instruction's mode (7: fcsr.frm's), RNE..RMM; a
        reserved one runs the handler, which raises the illegal-instruction trap."""
        b = self.b
        if isinstance(field, Const) and field.value != 7:
            mode: Value = field
        else:
            dynamic = b.and_(b.lshr(fcsr.at(b, 64), ir.Constant(I64, 5)), ir.Constant(I64, 7))
            f = field.at(b, 64)
            mode = Emitted(b.select(b.icmp_unsigned("==", f, ir.Constant(I64, 7)), dynamic, f),
                           0, 7)
        self._hand_over_unless(self._below(mode, FP_RMM + 1))
        return mode if isinstance(mode, Const) else Emitted(mode.at(b, 64), 0, FP_RMM)

    def _below(self, v: Value, bound: int) -> Value:
        return Const(int(v.value < bound)) if isinstance(v, Const) else \
            self._compare(ast.Lt(), v, Const(bound))

    def _fp_call(self, call: ast.Call) -> tuple[Value, ...]:
        """A softfloat helper's results, from the host's arithmetic; in RMM, which the
        host does not have, the instruction runs its Python handler instead."""
        name = _name(call.func)
        helper = self.fp_helpers.get(name or "")
        if helper is None:
            raise Unsupported(f"call {ast.unparse(call)!r}")
        operands = [self._u64(self._expr(a)) for a in call.args[:helper.operands]]
        rm = None
        if helper.rounds:
            mode = self._expr(call.args[helper.operands])
            self._hand_over_unless(self._below(mode, FP_RMM))
            rm = mode.at(self.b, 64)
        results = helper.emit(self.b, operands, rm)
        return tuple(Emitted(v, lo, hi) for v, (lo, hi) in zip(results, helper.results,
                                                                strict=True))

    def _hand_over_unless(self, keep: Value) -> None:
        """Go on where ``keep`` holds; elsewhere run the instruction's Python handler,
        whose path rejoins at the instruction's end (see ``lower``). Semantics compute
        before they write (traps are precise), so the handler never repeats a write."""
        if isinstance(keep, Const) and keep.value:
            return
        if self.wrote:
            raise Unsupported("semantics hand over to their handler after a write")
        b = self.b
        on_bb, handler_bb = b.append_basic_block("native"), b.append_basic_block("handler")
        b.cbranch(ir.Constant(I1, 0) if isinstance(keep, Const) else self._truth(keep),
                  on_bb, handler_bb)
        b.position_at_end(handler_bb)
        regs = self.t.registers()
        if self.t.run_handler():
            self.handed.append((b.block, dict(self.locals), self.t.registers()))
        self.t.set_registers(regs)
        b.position_at_end(on_bb)


def _left_shift(x: Value, y: Value, lo: int, hi: int) -> Value:
    """``x << y``: its low bits need only x's low bits, at a width wider than y."""
    def low(b: ir.IRBuilder, w: int) -> ir.Value:
        k = w if y.hi < w else (64 if y.hi < 64 else 128)
        shifted = b.shl(x.at(b, k), y.at(b, k))
        return shifted if k == w else b.trunc(shifted, _int(w))

    return Const(lo) if lo == hi else Lazy(lo, hi, low)


def _bit_bound(*bounds: int) -> int:
    return max(abs(b).bit_length() for b in bounds) + 1


def _name(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else None


def _is_reservation(node: ast.expr) -> bool:
    """``hart.reservation``: the LR/SC reservation, kept in the hart's control buffer."""
    return (isinstance(node, ast.Attribute) and _name(node.value) == "hart"
            and node.attr == "reservation")


def _is_fcsr(node: ast.expr) -> bool:
    """``C[3]``: fcsr, whose frm FP semantics read and whose fflags they accrue."""
    return (isinstance(node, ast.Subscript) and _name(node.value) == "C"
            and isinstance(node.slice, ast.Constant) and node.slice.value == FCSR)


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None
