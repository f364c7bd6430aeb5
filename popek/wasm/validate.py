"""Validation of a decoded module, and the lowering of each function for the tiers.

Every function is type-checked with the specification's algorithm (an operand stack of
value types and a stack of control frames) before anything runs. The same pass knows, at
each branch, the operand stack height and the label's arity, so it also lowers structured
control into flat code with resolved targets: each op is ``(kind, op, imm)`` where control
kinds carry ``(target, arity, height)`` and ``COMPUTE`` ops carry the raw immediate that
instantiation binds to the instance's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from popek.wasm.binary import Instr, Module
from popek.wasm.errors import InvalidModule, MalformedModule
from popek.wasm.isa import BY_CODE, Op
from popek.wasm.types import MAX_PAGES, NUM_TYPES, REF_TYPES, FuncType, Limits

# Lowered op kinds.
COMPUTE, BR, BR_IF, BR_TABLE, IF, JUMP, RETURN, CALL, CALL_INDIRECT, UNREACHABLE = range(10)

LoweredOp = tuple[int, Op | None, object]


@dataclass
class FunctionCode:
    """A validated function, lowered: what every tier starts from."""

    type: FuncType
    locals: list[str]  # the declared locals after the parameters
    code: list[LoweredOp]
    max_height: int


@dataclass
class _Frame:
    opcode: str
    start: tuple[str, ...]
    end: tuple[str, ...]
    height: int
    unreachable: bool = False
    start_pc: int = 0
    fixups: list[int] = field(default_factory=list)  # branches to this frame's end
    if_at: int | None = None  # the IF op to point at the else branch

    @property
    def label_types(self) -> tuple[str, ...]:
        return self.start if self.opcode == "loop" else self.end


def _frozen(imm: object) -> object:
    """Branch immediates are lists while their targets are patched; tuples afterwards."""
    return tuple(_frozen(x) for x in imm) if isinstance(imm, list) else imm


def _fail(message: str) -> None:
    raise InvalidModule(message)


class _Context:
    """What a function body may refer to (the specification's context C)."""

    def __init__(self, m: Module) -> None:
        self.types = m.types
        self.funcs = [i.desc for i in m.imported("func")] + m.funcs
        self.tables = [i.desc for i in m.imported("table")] + m.tables
        self.mems = [i.desc for i in m.imported("memory")] + m.mems
        self.globals = [i.desc for i in m.imported("global")] + [g.type for g in m.globals]
        self.imported_globals = len(m.imported("global"))
        self.elems = [e.type for e in m.elems]
        self.data_count = m.data_count
        self.data_segments = len(m.datas)
        self.refs: set[int] = set()

    def functype(self, func: int) -> FuncType:
        if func >= len(self.funcs):
            _fail("unknown function")
        typeidx = self.funcs[func]
        if typeidx >= len(self.types):
            _fail("unknown type")
        return self.types[typeidx]

    def table(self, idx: int) -> str:
        if idx >= len(self.tables):
            _fail("unknown table")
        return self.tables[idx].elem

    def memory(self) -> None:
        if not self.mems:
            _fail("unknown memory")

    def block_type(self, bt: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if bt is None:
            return (), ()
        if isinstance(bt, str):
            return (), (bt,)
        if bt >= len(self.types):
            _fail("unknown type")
        t = self.types[bt]
        return t.params, t.results

    def data(self, idx: int) -> None:
        if self.data_count is None and idx < self.data_segments:
            raise MalformedModule("data count section required")
        if idx >= (self.data_count or 0):
            _fail("unknown data segment")

    def elem(self, idx: int) -> str:
        if idx >= len(self.elems):
            _fail("unknown elem segment")
        return self.elems[idx]


class _FunctionValidator:
    def __init__(self, ctx: _Context, ftype: FuncType, local_types: list[str]) -> None:
        self.ctx = ctx
        self.ftype = ftype
        self.locals = list(ftype.params) + local_types
        self.vals: list[str | None] = []
        self.ctrls: list[_Frame] = []
        self.code: list[list] = []
        self.max_height = 0

    # The specification's operand and control stack operations.
    def push(self, t: str | None) -> None:
        self.vals.append(t)
        if len(self.vals) > self.max_height:
            self.max_height = len(self.vals)

    def pop(self, expect: str | None = None) -> str | None:
        frame = self.ctrls[-1]
        if len(self.vals) == frame.height:
            if frame.unreachable:
                return expect
            _fail("type mismatch")
        actual = self.vals.pop()
        if expect is not None and actual is not None and actual != expect:
            _fail("type mismatch")
        return actual if actual is not None else expect

    def pop_all(self, types: tuple[str, ...]) -> None:
        for t in reversed(types):
            self.pop(t)

    def push_ctrl(self, opcode: str, start: tuple[str, ...], end: tuple[str, ...]) -> _Frame:
        frame = _Frame(opcode, start, end, len(self.vals), start_pc=len(self.code))
        self.ctrls.append(frame)
        for t in start:
            self.push(t)
        return frame

    def pop_ctrl(self) -> _Frame:
        if not self.ctrls:
            _fail("type mismatch")
        frame = self.ctrls[-1]
        self.pop_all(frame.end)
        if len(self.vals) != frame.height:
            _fail("type mismatch")
        self.ctrls.pop()
        return frame

    def set_unreachable(self) -> None:
        frame = self.ctrls[-1]
        del self.vals[frame.height:]
        frame.unreachable = True

    def label(self, depth: int) -> _Frame:
        if depth >= len(self.ctrls):
            _fail("unknown label")
        return self.ctrls[-1 - depth]

    def branch(self, kind: int, depth: int) -> list:
        """A branch op to the label ``depth`` out; forward targets are patched at its end."""
        frame = self.label(depth)
        op = [kind, None, [frame.start_pc, len(frame.label_types), frame.height]]
        if frame.opcode != "loop":
            frame.fixups.append(op[2])
        return op

    def emit(self, kind: int, op: Op | None, imm: object) -> list:
        lowered = [kind, op, imm]
        self.code.append(lowered)
        return lowered

    def run(self, body: list[Instr]) -> FunctionCode:
        self.push_ctrl("function", (), self.ftype.results)
        for op, imm in body:
            if not self.ctrls:
                _fail("unexpected content after last end")  # decoder forbids it
            if op.kind == "control":
                self.control(op, imm)
            else:
                self.compute(op, imm)
        if self.ctrls:
            raise MalformedModule("unexpected end of section or function")
        code = [x if type(x) is tuple else (x[0], x[1], _frozen(x[2])) for x in self.code]
        return FunctionCode(self.ftype, self.locals[len(self.ftype.params):], code,
                            self.max_height)

    def control(self, op: Op, imm: object) -> None:  # noqa: C901 - one case per instruction
        name = op.name
        if name == "unreachable":
            self.emit(UNREACHABLE, op, None)
            self.set_unreachable()
        elif name in ("block", "loop"):
            params, results = self.ctx.block_type(imm)
            self.pop_all(params)
            self.push_ctrl(name, params, results)
        elif name == "if":
            params, results = self.ctx.block_type(imm)
            self.pop("i32")
            self.pop_all(params)
            frame = self.push_ctrl("if", params, results)
            frame.if_at = len(self.code)
            self.emit(IF, op, [0])
        elif name == "else":
            frame = self.ctrls[-1] if self.ctrls else None
            if frame is None or frame.opcode != "if":
                _fail("else without if")
            self.pop_ctrl()
            jump = self.emit(JUMP, op, [0])
            self.code[frame.if_at][2][0] = len(self.code)
            new = self.push_ctrl("else", frame.start, frame.end)
            new.fixups = frame.fixups + [jump[2]]
        elif name == "end":
            frame = self.pop_ctrl()
            if frame.opcode == "if":
                if frame.start != frame.end:
                    _fail("type mismatch")
                self.code[frame.if_at][2][0] = len(self.code)
            if not self.ctrls:
                self.emit(RETURN, op, len(self.ftype.results))
            for target in frame.fixups:
                target[0] = len(self.code) - (1 if not self.ctrls else 0)
            for t in frame.end:
                self.push(t)
        elif name == "br":
            frame = self.label(imm)
            self.pop_all(frame.label_types)
            self.code.append(self.branch(BR, imm))
            self.set_unreachable()
        elif name == "br_if":
            self.pop("i32")
            frame = self.label(imm)
            self.pop_all(frame.label_types)
            for t in frame.label_types:
                self.push(t)
            self.code.append(self.branch(BR_IF, imm))
        elif name == "br_table":
            labels, default = imm
            self.pop("i32")
            arity = len(self.label(default).label_types)
            targets = []
            for depth in labels:
                types = self.label(depth).label_types
                if len(types) != arity:
                    _fail("type mismatch")
                saved = list(self.vals)
                self.pop_all(types)
                self.vals = saved
                targets.append(self.branch(BR_TABLE, depth)[2])
            self.pop_all(self.label(default).label_types)
            targets.append(self.branch(BR_TABLE, default)[2])
            self.emit(BR_TABLE, op, targets)
            self.set_unreachable()
        elif name == "return":
            self.pop_all(self.ftype.results)
            self.emit(RETURN, op, len(self.ftype.results))
            self.set_unreachable()
        elif name == "call":
            t = self.ctx.functype(imm)
            self.pop_all(t.params)
            for r in t.results:
                self.push(r)
            self.emit(CALL, op, imm)
        elif name == "call_indirect":
            typeidx, table = imm
            if self.ctx.table(table) != "funcref":
                _fail("type mismatch")
            if typeidx >= len(self.ctx.types):
                _fail("unknown type")
            t = self.ctx.types[typeidx]
            self.pop("i32")
            self.pop_all(t.params)
            for r in t.results:
                self.push(r)
            self.emit(CALL_INDIRECT, op, (table, t))

    def compute(self, op: Op, imm: object) -> None:
        t = None if op.imm == "none" else operand_type(self.ctx, op, imm, self.locals)
        if op.name not in _UNTYPED:
            for p in op.reversed_params:
                self.pop(t if p == "t" else p)
            for r in op.results:
                self.push(t if r == "t" else r)
        elif op.name == "select":
            self.pop("i32")
            t1 = self.pop(t)
            t2 = self.pop(t)
            if t is None:
                if any(x is not None and x not in NUM_TYPES for x in (t1, t2)):
                    _fail("type mismatch")
                if t1 is not None and t2 is not None and t1 != t2:
                    _fail("type mismatch")
                t = t1 if t1 is not None else t2
            self.push(t)
        elif op.name in ("drop", "ref.is_null"):
            popped = self.pop()
            if op.name == "ref.is_null":
                if popped is not None and popped not in REF_TYPES:
                    _fail("type mismatch")
                self.push("i32")
        self.code.append(_BARE_COMPUTE[op] if imm is None else (COMPUTE, op, imm))


_BARE_COMPUTE = {op: (COMPUTE, op, None) for op in BY_CODE.values()}  # shared, as in binary
_UNTYPED = frozenset({"select", "drop", "ref.is_null"})  # operand types from the stack


def operand_type(ctx: _Context, op: Op, imm: object, local_types: list[str]) -> str | None:
    """Check an instruction's immediate against the context; the type its ``t`` stands for."""
    kind = op.imm
    if kind == "local":
        if imm >= len(local_types):
            _fail("unknown local")
        return local_types[imm]
    if kind == "global":
        if imm >= len(ctx.globals):
            _fail("unknown global")
        g = ctx.globals[imm]
        if op.name == "global.set" and not g.mutable:
            _fail("global is immutable")
        return g.type
    if kind == "memarg":
        ctx.memory()
        align, _offset = imm
        if (1 << min(align, 32)) > op.size:
            _fail("alignment must not be larger than natural")
    elif kind in ("mem", "mem2"):
        ctx.memory()
    elif kind == "data":
        ctx.memory()
        ctx.data(imm[0])
    elif kind == "dataidx":
        ctx.data(imm)
    elif kind == "table":
        return ctx.table(imm)
    elif kind == "table2":
        if ctx.table(imm[0]) != ctx.table(imm[1]):
            _fail("type mismatch")
    elif kind == "elem_table":
        if ctx.elem(imm[0]) != ctx.table(imm[1]):
            _fail("type mismatch")
    elif kind == "elemidx":
        ctx.elem(imm)
    elif kind == "func":
        ctx.functype(imm)
        if imm not in ctx.refs:
            _fail("undeclared function reference")
    elif kind == "reftype":
        return imm
    elif kind == "valtypes":
        if len(imm) != 1:
            _fail("invalid result arity")
        return imm[0]
    return None


# WebAssembly 2.0's constant instructions (3.0's extended-const would add i32/i64 add, sub
# and mul here: evaluation and typing already take any stack-shaped expression).
_CONST_OPS = {"i32.const", "i64.const", "f32.const", "f64.const", "ref.null", "ref.func",
              "global.get"}


def _const_expr(ctx: _Context, expr: list[Instr], expect: str) -> None:
    """A constant expression (global initializer, segment offset or element); it may read
    imported immutable globals only."""
    types: list[str] = []
    for op, imm in expr[:-1]:
        if op.name not in _CONST_OPS:
            _fail("constant expression required")
        if op.name == "global.get":
            if imm >= ctx.imported_globals:
                _fail("unknown global")
            if ctx.globals[imm].mutable:
                _fail("constant expression required")
        if op.name == "ref.func":
            ctx.functype(imm)
        for p in reversed(op.params):
            if not types or types.pop() != p:
                _fail("type mismatch")
        types.append(operand_type(ctx, op, imm, []) if op.results == ("t",) else op.results[0])
    if types != [expect]:
        _fail("type mismatch")


def _limits(lim: Limits, bound: int, message: str) -> None:
    if lim.min > bound or (lim.max is not None and lim.max > bound):
        _fail(message)
    if lim.max is not None and lim.min > lim.max:
        _fail("size minimum must not be greater than maximum")


def validate(m: Module) -> None:
    """Check every rule of the module; lower each function into ``m.compiled``."""
    ctx = _Context(m)
    for typeidx in ctx.funcs:
        if typeidx >= len(m.types):
            _fail("unknown type")
    for t in ctx.tables:
        _limits(t.limits, 0xFFFFFFFF, "table size must be at most 2^32-1")
    for mem in ctx.mems:
        _limits(mem.limits, MAX_PAGES, "memory size must be at most 65536 pages (4GiB)")
    if len(ctx.mems) > 1:
        _fail("multiple memories")
    # Functions referenced outside function bodies may be taken by ref.func inside them.
    for e in m.elems:
        for expr in e.init:
            ctx.refs.update(imm for op, imm in expr if op.name == "ref.func")
    for g in m.globals:
        ctx.refs.update(imm for op, imm in g.init if op.name == "ref.func")
    ctx.refs.update(e.index for e in m.exports if e.kind == "func")
    for g in m.globals:
        _const_expr(ctx, g.init, g.type.type)
    for e in m.elems:
        for expr in e.init:
            _const_expr(ctx, expr, e.type)
        if e.mode == "active":
            if ctx.table(e.table) != e.type:
                _fail("type mismatch")
            _const_expr(ctx, e.offset, "i32")
    for d in m.datas:
        if d.mode == "active":
            if d.memory >= len(ctx.mems):
                _fail("unknown memory")
            _const_expr(ctx, d.offset, "i32")
    names = set()
    spaces = {"func": ctx.funcs, "table": ctx.tables, "memory": ctx.mems, "global": ctx.globals}
    for e in m.exports:
        if e.name in names:
            _fail("duplicate export name")
        names.add(e.name)
        if e.index >= len(spaces[e.kind]):
            _fail(f"unknown {e.kind}")
    if m.start is not None:
        t = ctx.functype(m.start)
        if t.params or t.results:
            _fail("start function")
    m.compiled = []
    for typeidx, code in zip(m.funcs, m.codes, strict=True):
        v = _FunctionValidator(ctx, m.types[typeidx], code.locals)
        m.compiled.append(v.run(code.body))
