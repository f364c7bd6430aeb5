"""Lower instruction semantics (the Python statements in :mod:`popek.isa`) to LLVM IR.

This is the native tier's front end, and like every tier it is derived from the one
declaration: it walks the semantics' syntax tree and emits IR for it. Python's integers
are unbounded, so each value carries the interval it may take; the IR holds it as an
``i128`` bit pattern, read as unsigned when the interval is non-negative and as signed
otherwise. Every operation computes its result interval first and refuses (raising
:class:`Unsupported`) if the pattern could become ambiguous, so a lowered instruction
either means exactly what the Python means or is not lowered at all. Constructs outside
the native vocabulary (CSRs, FP arithmetic, hart services) raise :class:`Unsupported`
too; the native tier then runs that instruction through its Python handler.

Conditional expressions are lowered to branches, never to ``select``: their arms may
divide, and only the taken one may run.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from typing import Protocol

from popek.cpu.state import CTL_RESERVATION, NO_RESERVATION
from popek.engine import irtext as ir
from popek.isa import helpers

I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
I128 = ir.IntType(128)
WIDE = 1 << 128
U64_MAX = (1 << 64) - 1
LOADS = {f"ld{n}": n // 8 for n in (8, 16, 32, 64)}
AMO_LOADS = {f"amo_ld{n}": n // 8 for n in (8, 16, 32, 64)}
STORES = {f"st{n}": n // 8 for n in (8, 16, 32, 64)}
SIGN_EXTENDERS = {"sext8": 8, "sext16": 16, "sext32": 32}  # to an unsigned 64-bit value
SIGNED_READERS = {"signed": 64, "signed32": 32}  # the low bits read as a signed integer
CONSTANTS = {name: value for name in helpers.__all__
             if isinstance(value := getattr(helpers, name), int)}


class Unsupported(Exception):
    """The semantics use something the native tier does not lower."""


@dataclass(frozen=True)
class Value:
    """A Python integer in IR: its ``i128`` bit pattern and the interval it lies in."""

    ir: ir.Value
    lo: int
    hi: int

    @property
    def unsigned(self) -> bool:
        return self.lo >= 0


def _checked(lo: int, hi: int) -> tuple[int, int]:
    """The interval, if an i128 pattern identifies each of its values; else refuse."""
    if (0 <= lo and hi < WIDE) or (-(WIDE >> 1) <= lo and hi < WIDE >> 1):
        return lo, hi
    raise Unsupported(f"an intermediate value may not fit 128 bits: [{lo}, {hi}]")


def entry_alloca(builder: ir.IRBuilder, typ: ir.Type, name: str) -> ir.AllocaInstr:
    """A stack slot in the function's entry block (where mem2reg turns it into SSA)."""
    with builder.goto_entry_block():
        return builder.alloca(typ, name=name)


def _bit_bound(*bounds: int) -> int:
    return max(abs(b).bit_length() for b in bounds) + 1


class Target(Protocol):
    """Where lowered code reads and writes machine state (a block or a single step)."""

    builder: ir.IRBuilder

    def read_x(self, reg: int | ir.Value) -> ir.Value: ...  # an i64

    def write_x(self, reg: int | ir.Value, value: ir.Value) -> None: ...

    def read_state(self, buffer: str, index: int | ir.Value) -> ir.Value: ...  # "f", "ctl"

    def write_state(self, buffer: str, index: int | ir.Value, value: ir.Value) -> None: ...

    def load(self, addr: ir.Value, size: int, writable: bool) -> ir.Value: ...  # i64

    def store(self, addr: ir.Value, size: int, value: ir.Value) -> None: ...

    def trap(self, cause: ir.Value, tval: ir.Value) -> None: ...  # ends the IR block

    def jump(self, target: ir.Value) -> None: ...  # ends the IR block


@dataclass(frozen=True)
class Operand:
    """A decoded operand: a constant (in a block) or a run-time i64 (in a generic step)."""

    value: int | ir.Value
    lo: int
    hi: int


@cache
def parsed(sem: str) -> ast.Module:
    return ast.parse(sem)


class Lowering:
    """Emits one instruction's semantics into ``target``'s current IR block."""

    def __init__(self, target: Target, operands: dict[str, Operand], pc: ir.Value,
                 length: int) -> None:
        self.t = target
        self.b = target.builder
        self.operands = operands
        self.pc = pc
        self.length = length
        self.locals: dict[str, tuple[ir.AllocaInstr, int, int]] = {}

    # -- statements ---------------------------------------------------------------------
    def lower(self, sem: str) -> bool:
        """Lower ``sem``; True if control may fall through to the next instruction."""
        return self._statements(parsed(sem).body)

    def _statements(self, body: list[ast.stmt]) -> bool:
        for stmt in body:
            if not self._statement(stmt):
                return False  # the rest is unreachable
        return True

    def _statement(self, s: ast.stmt) -> bool:
        if isinstance(s, ast.Pass):
            return True
        if isinstance(s, ast.Assign) and len(s.targets) == 1:
            if _is_reservation(s.targets[0]) and _is_none(s.value):
                return self._assign(s.targets[0], self._const(NO_RESERVATION))
            return self._assign(s.targets[0], self._expr(s.value))
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
            return self._call_statement(s.value)
        raise Unsupported(f"statement {ast.unparse(s)!r}")

    def _assign(self, target: ast.expr, value: Value) -> bool:
        if isinstance(target, ast.Subscript) and _name(target.value) == "X":
            self.t.write_x(self._register(target.slice), self._u64(value))
            return True
        if isinstance(target, ast.Subscript) and _name(target.value) == "F":
            self.t.write_state("f", self._register(target.slice), self._u64(value))
            return True
        if _is_reservation(target):
            self.t.write_state("ctl", CTL_RESERVATION, self._u64(value))
            return True
        if isinstance(target, ast.Name) and target.id not in self.operands:
            # A local may be assigned on several paths: one slot, holding the pattern of
            # whichever value came last, read within the union of their intervals.
            slot = self.locals.get(target.id)
            if slot is None:
                slot = (entry_alloca(self.b, I128, target.id), value.lo, value.hi)
            lo, hi = min(slot[1], value.lo), max(slot[2], value.hi)
            self.locals[target.id] = (slot[0], *_checked(lo, hi))
            self.b.store(value.ir, slot[0])
            return True
        raise Unsupported(f"assignment to {ast.unparse(target)!r}")

    def _if(self, s: ast.If) -> bool:
        cond = self._truth(self._expr(s.test))
        then_bb = self.b.append_basic_block("then")
        else_bb = self.b.append_basic_block("else")
        join_bb = self.b.append_basic_block("join")
        self.b.cbranch(cond, then_bb, else_bb)
        falls = False
        for bb, body in ((then_bb, s.body), (else_bb, s.orelse)):
            self.b.position_at_end(bb)
            if self._statements(body):
                self.b.branch(join_bb)
                falls = True
        self.b.position_at_end(join_bb)
        if not falls:
            self.b.unreachable()
        return falls

    def _call_statement(self, call: ast.Call) -> bool:
        name = _name(call.func)
        if name in STORES:
            addr, value = (self._expr(a) for a in call.args)
            size = STORES[name]
            low = self.b.trunc(value.ir, ir.IntType(8 * size))
            self.t.store(self._u64(addr), size, self.b.zext(low, I64) if size < 8 else low)
            return True
        if name == "check_aligned":
            addr, size, cause = call.args
            a = self._u64(self._expr(addr))
            misaligned = self.b.icmp_unsigned(
                "!=", self.b.and_(a, ir.Constant(I64, self._constant(size) - 1)),
                ir.Constant(I64, 0))
            with self.b.if_then(misaligned, likely=False):
                self.t.trap(ir.Constant(I64, self._constant(cause)), a)
            return True
        raise Unsupported(f"call {ast.unparse(call)!r}")

    # -- expressions --------------------------------------------------------------------
    def _constant(self, node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise Unsupported(f"{ast.unparse(node)!r} is not a constant")

    def _const(self, v: int) -> Value:
        return Value(ir.Constant(I128, v % WIDE), v, v)

    def _register(self, node: ast.expr) -> int | ir.Value:
        if isinstance(node, ast.Name) and node.id in ("rd", "rs1", "rs2"):
            return self.operands[node.id].value
        raise Unsupported(f"register {ast.unparse(node)!r}")

    def _expr(self, e: ast.expr) -> Value:  # noqa: C901 - one case per syntax form
        b = self.b
        if isinstance(e, ast.Constant) and isinstance(e.value, int):
            return self._const(int(e.value))
        if isinstance(e, ast.Name):
            return self._name(e.id)
        if isinstance(e, ast.Subscript) and _name(e.value) == "X":
            return Value(b.zext(self.t.read_x(self._register(e.slice)), I128), 0, U64_MAX)
        if isinstance(e, ast.Subscript) and _name(e.value) == "F":
            raw = self.t.read_state("f", self._register(e.slice))
            return Value(b.zext(raw, I128), 0, U64_MAX)
        if _is_reservation(e):
            raw = self.t.read_state("ctl", CTL_RESERVATION)
            return Value(b.zext(raw, I128), 0, U64_MAX)
        if isinstance(e, ast.BinOp):
            return self._binop(e.op, self._expr(e.left), self._expr(e.right))
        if isinstance(e, ast.UnaryOp):
            v = self._expr(e.operand)
            if isinstance(e.op, ast.USub):
                return Value(b.neg(v.ir), *_checked(-v.hi, -v.lo))
            if isinstance(e.op, ast.Invert):
                return Value(b.not_(v.ir), *_checked(-v.hi - 1, -v.lo - 1))
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
            alloca, lo, hi = self.locals[name]
            return Value(self.b.load(alloca), lo, hi)
        if name in CONSTANTS:
            return self._const(CONSTANTS[name])
        if name == "pc":
            return Value(self.b.zext(self.pc, I128), 0, U64_MAX)
        if name == "NEXT":
            nxt = self.b.add(self.pc, ir.Constant(I64, self.length))
            return Value(self.b.zext(nxt, I128), 0, U64_MAX)
        if name in self.operands:
            op = self.operands[name]
            if isinstance(op.value, int):
                return self._const(op.value)
            return Value(self.b.sext(op.value, I128), op.lo, op.hi)
        raise Unsupported(f"name {name!r}")

    def _u64(self, v: Value) -> ir.Value:
        """A value the semantics keep within 64 unsigned bits, as an i64."""
        if v.lo < 0 or v.hi > U64_MAX:
            raise Unsupported(f"value [{v.lo}, {v.hi}] used as 64 unsigned bits")
        return self.b.trunc(v.ir, I64)

    def _truth(self, v: Value) -> ir.Value:
        return self.b.icmp_unsigned("!=", v.ir, ir.Constant(I128, 0))

    def _binop(self, op: ast.operator, x: Value, y: Value) -> Value:  # noqa: C901
        b = self.b
        corners = [(p, q) for p in (x.lo, x.hi) for q in (y.lo, y.hi)]
        if isinstance(op, ast.Add):
            return Value(b.add(x.ir, y.ir), *_checked(x.lo + y.lo, x.hi + y.hi))
        if isinstance(op, ast.Sub):
            return Value(b.sub(x.ir, y.ir), *_checked(x.lo - y.hi, x.hi - y.lo))
        if isinstance(op, ast.Mult):
            products = [p * q for p, q in corners]
            return Value(b.mul(x.ir, y.ir), *_checked(min(products), max(products)))
        if isinstance(op, ast.BitAnd):
            if x.unsigned or y.unsigned:
                hi = min(v.hi for v in (x, y) if v.unsigned)
                return Value(b.and_(x.ir, y.ir), 0, hi)
            k = _bit_bound(x.lo, x.hi, y.lo, y.hi)
            return Value(b.and_(x.ir, y.ir), *_checked(-(1 << k), (1 << k) - 1))
        if isinstance(op, (ast.BitOr, ast.BitXor)):
            fn = b.or_ if isinstance(op, ast.BitOr) else b.xor
            if x.unsigned and y.unsigned:
                return Value(fn(x.ir, y.ir), 0, (1 << max(x.hi, y.hi).bit_length()) - 1)
            k = _bit_bound(x.lo, x.hi, y.lo, y.hi)
            return Value(fn(x.ir, y.ir), *_checked(-(1 << k), (1 << k) - 1))
        if isinstance(op, (ast.LShift, ast.RShift)):
            if y.lo < 0 or y.hi >= 128:
                raise Unsupported("shift amount outside [0, 128)")
            if isinstance(op, ast.LShift):
                shifted = [p << q for p, q in corners]
                return Value(b.shl(x.ir, y.ir), *_checked(min(shifted), max(shifted)))
            shifted = [p >> q for p, q in corners]
            fn = b.lshr if x.unsigned else b.ashr
            return Value(fn(x.ir, y.ir), min(shifted), max(shifted))
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
                return Value(self._divide("udiv", x, y), 0, x.hi)
            return Value(self._divide("urem", x, y), 0, max(y.hi - 1, 0))
        q, r = self._divide("sdiv", x, y), self._divide("srem", x, y)
        zero = ir.Constant(I128, 0)
        # Truncating division rounds toward zero; floor differs when the signs differ.
        adjust = b.and_(b.icmp_signed("!=", r, zero),
                        b.icmp_signed("<", b.xor(r, y.ir), zero))
        if quotient:
            return Value(b.sub(q, b.zext(adjust, I128)), *_checked(-big - 1, big))
        return Value(b.select(adjust, b.add(r, y.ir), r), *_checked(-div_bound, div_bound))

    def _divide(self, op: str, x: Value, y: Value) -> ir.Value:
        """Truncating division of 64-bit operands, done in 64 bits (128-bit division would
        need a runtime library): the one overflowing case, MIN / -1, is handled apart."""
        b = self.b
        signed = op.startswith("s")
        lo, hi = (-(1 << 63), (1 << 63) - 1) if signed else (0, U64_MAX)
        if any(v.lo < lo or v.hi > hi for v in (x, y)):
            raise Unsupported("division beyond 64-bit operands")
        a, d = b.trunc(x.ir, I64), b.trunc(y.ir, I64)
        if not signed:
            return b.zext(getattr(b, op)(a, d), I128)
        overflow = b.and_(b.icmp_signed("==", a, ir.Constant(I64, lo)),
                          b.icmp_signed("==", d, ir.Constant(I64, -1)))
        result = b.sext(getattr(b, op)(a, b.select(overflow, ir.Constant(I64, 1), d)), I128)
        if op == "sdiv":  # MIN / -1 = 2**63, which only the 128-bit pattern holds
            result = b.select(overflow, ir.Constant(I128, 1 << 63), result)
        return result

    def _compare(self, op: ast.cmpop, x: Value, y: Value) -> Value:
        lo, hi = min(x.lo, y.lo), max(x.hi, y.hi)
        _checked(lo, hi)  # both read the same way
        names = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
                 ast.GtE: ">="}
        sym = names.get(type(op))
        if sym is None:
            raise Unsupported(f"comparison {type(op).__name__}")
        cmp = self.b.icmp_unsigned if lo >= 0 else self.b.icmp_signed
        return Value(self.b.zext(cmp(sym, x.ir, y.ir), I128), 0, 1)

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
            v = self._expr(node)
            arms.append((v, b.block))
            b.branch(join_bb)
        b.position_at_end(join_bb)
        lo, hi = _checked(min(v.lo for v, _ in arms), max(v.hi for v, _ in arms))
        phi = b.phi(I128)
        for v, bb in arms:
            phi.add_incoming(v.ir, bb)
        return Value(phi, lo, hi)

    def _call(self, call: ast.Call) -> Value:
        b = self.b
        name = _name(call.func)
        args = call.args
        if name in LOADS or name in AMO_LOADS:
            size = LOADS.get(name) or AMO_LOADS[name]
            v = self.t.load(self._u64(self._expr(args[0])), size, name in AMO_LOADS)
            return Value(b.zext(v, I128), 0, (1 << (8 * size)) - 1)
        if name in SIGN_EXTENDERS:
            low = b.trunc(self._expr(args[0]).ir, ir.IntType(SIGN_EXTENDERS[name]))
            return Value(b.zext(b.sext(low, I64), I128), 0, U64_MAX)
        if name in SIGNED_READERS:
            bits = SIGNED_READERS[name]
            v = self._expr(args[0])
            if bits == 64:
                self._u64(v)  # signed() reads a register value; elsewhere it means more
            low = b.trunc(v.ir, ir.IntType(bits))
            return Value(b.sext(low, I128), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        if name in ("div_trunc", "rem_trunc"):
            x, y = (self._expr(a) for a in args)
            big = max(abs(x.lo), abs(x.hi))
            if name == "div_trunc":
                return Value(self._divide("sdiv", x, y), *_checked(-big, big))
            bound = min(big, max(abs(y.lo), abs(y.hi)))
            return Value(self._divide("srem", x, y), *_checked(-bound, bound))
        if name == "int" and len(args) == 1:
            return self._expr(args[0])
        raise Unsupported(f"call {ast.unparse(call)!r}")


def _name(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else None


def _is_reservation(node: ast.expr) -> bool:
    """``hart.reservation``: the LR/SC reservation, kept in the hart's control buffer."""
    return (isinstance(node, ast.Attribute) and _name(node.value) == "hart"
            and node.attr == "reservation")


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None
