"""Tier 1: each wasm function becomes one Python function, derived from the declarations.

Validation fixes the operand stack's height at every instruction, so stack slots become
Python locals (``s0``, ``s1``, ...) as wasm locals do (``l0``, ...), and each instruction's
semantics from :mod:`popek.wasm.isa` is specialized by substituting the slots and the
instance's bound immediates into it: ``i32.add`` at height 3 is ``s1 = (s1 + s2) &
0xffffffff``. Locals, constants and pure results that cannot trap are not stored at all
but substituted into the instruction that consumes them, so ``local.get 0; i32.const 1;
i32.add; local.set 0`` becomes ``l0 = ((l0 + 1) & 0xffffffff)``.
Structured control maps onto Python's: every loop, and every block or if that a branch
targets, is a ``while True:`` whose ``break`` leaves it and whose ``continue`` iterates a
loop; a branch further out sets ``_br`` to its target and each enclosing loop passes it
on. Python nests at most 20 loops, and a switch compiles to one block per case, so a
chain of directly nested blocks becomes one loop over the case positions (a branch sets
the position and continues). A function still nested too deeply stays interpreted.

Calls are Python calls, so Python's recursion limit (raised to about the interpreter's
call depth; Python 3.11 calls between Python functions use no C stack) bounds them, and
its RecursionError becomes the trap "call stack exhausted". Fuel, when the instance has
some, is spent at the same points as in the interpreter (calls and loop iterations), so
the two tiers run out at the same instruction with the same state.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from popek.engine.translator import compiled
from popek.wasm import numeric, semantics
from popek.wasm.binary import Instr
from popek.wasm.errors import OutOfFuel, Trap
from popek.wasm.interpreter import resolve_indirect, run
from popek.wasm.isa import IMM_NAMES, Op
from popek.wasm.types import MAX_CALL_DEPTH, default_value

PYTHON_RECURSION_LIMIT = MAX_CALL_DEPTH + 2000
MAX_TRANSLATED = 50_000  # instructions; compiling takes ~2 KB of memory and ~25 us for each

if TYPE_CHECKING:
    from popek.wasm.instance import Function, Instance, WasmFunction

_OPERAND = re.compile(r"\b([abc])\b")
_ASSIGNED_SLOTS = re.compile(r"((?:s\d+,? ?)+)= ")
_MARK = "\x00"  # brackets the markers in instruction templates
_INLINE_CONSTANTS = {name: hex(getattr(numeric, name)) for name in ("M32", "M64", "S32", "S64")}
_MIN_CHAIN = 3  # directly nested blocks taken as one chain
_MAX_DEFERRED = 200  # characters of a deferred expression (Python limits nesting)


def _call_target(table: object, ftype: object, i: int) -> Function:
    return resolve_indirect((table, ftype), [i])


def call_function(caller: Instance, f: Function, args: list) -> list:
    """Call any function value from translated code; its results as a list."""
    from popek.wasm.instance import HostFunction
    if type(f) is HostFunction:
        return f.invoke(caller, args)
    return f.call_raw(args)


@dataclass
class _Construct:
    kind: str  # block, loop, if, func
    label: int  # its number, for branches passing through enclosing constructs
    height: int  # the operand height its label restores
    params: int
    results: int
    looped: bool = True  # a Python loop, because branches target it
    passed_through: bool = False  # a branch inside it targets a construct further out
    # For a chain of directly nested blocks (a switch's br_table targets) run as one loop:
    # the chain's outermost block (which owns the loop) and this block's position in it.
    chain: _Construct | None = None
    position: int = 0

    @property
    def arity(self) -> int:
        return self.params if self.kind == "loop" else self.results


class _FunctionTranslator:
    def __init__(self, inst: Instance, index: int, fn: WasmFunction, consts: dict) -> None:
        self.inst = inst
        self.fn = fn
        self.module = inst.module
        self.consts = consts  # namespace entries this function's code refers to
        self.name = function_name(index)
        self.lines: list[str] = []
        self.indent = 1
        self.h = 0
        self.dead = False
        self.dead_depth = 0
        self.ctrls: list[_Construct] = []
        self.labels = 0
        # Slots whose value is a local or a constant not yet copied into them: consumers
        # use the expression itself. Control flow merges copy them (flush), and writing a
        # local first copies the slots that still read it.
        self.pending: dict[int, str] = {}
        self.fuel = inst.fuel is not None

    # --- helpers ------------------------------------------------------------------------
    def emit(self, line: str) -> None:
        assigned = _ASSIGNED_SLOTS.match(line)
        if assigned and self.pending:  # deferred values still reading these slots go first
            for slot in re.findall(r"s\d+", assigned.group(1)):
                self.flush(reading=slot)
        self.lines.append("    " * self.indent + line)

    def const(self, name: str, value: object) -> str:
        """Bind an instance object the code refers to under a name derived from the module
        alone, so that every instance of a module translates to the same source (and the
        compiled code is reused)."""
        self.consts[name] = value
        return name

    def operand(self, slot: int) -> str:
        return self.pending.pop(slot, None) or f"s{slot}"

    def flush(self, reading: str | None = None) -> None:
        """Copy deferred values into their slots (those reading local ``reading``, or all)."""
        for slot in sorted(self.pending):
            expr = self.pending.get(slot)
            if expr is not None and (reading is None or re.search(rf"\b{reading}\b", expr)):
                del self.pending[slot]
                self.emit(f"s{slot} = {expr}")

    def slots(self, start: int, n: int) -> str:
        return ", ".join(f"s{start + i}" for i in range(n))

    def block_type(self, bt: object) -> tuple[int, int]:
        if bt is None:
            return 0, 0
        if isinstance(bt, str):
            return 0, 1
        t = self.module.types[bt]
        return len(t.params), len(t.results)

    def spend_fuel(self) -> None:
        if self.fuel:
            self.emit("if I.fuel <= 0:")
            self.emit("    raise OutOfFuel()")
            self.emit("I.fuel -= 1")

    def move(self, target: _Construct) -> None:
        """Put the label's values where the target expects them."""
        n = target.arity
        if n and self.h - n != target.height:
            self.emit(f"{self.slots(target.height, n)} = {self.slots(self.h - n, n)}")

    def innermost_loop(self) -> _Construct:
        """The construct whose Python loop ``break`` and ``continue`` act on (or func)."""
        return next(c for c in reversed(self.ctrls) if c.looped)

    def branch(self, depth: int) -> None:
        target = self.ctrls[-1 - depth]
        if target.kind == "func":
            n = target.results
            self.emit(f"return {self.slots(self.h - n, n)}" if n else "return")
            return
        self.move(target)
        if target.chain is not None:
            self.branch_in_chain(target, depth)
            return
        if target is self.innermost_loop():
            if target.kind == "loop":
                self.spend_fuel()
                self.emit("continue")
            else:
                self.emit("break")
            return
        for c in self.ctrls[len(self.ctrls) - depth:]:
            c.passed_through = c.looped
        self.emit(f"_br = {target.label}")
        self.emit("break")

    def branch_in_chain(self, target: _Construct, depth: int) -> None:
        """To the end of a chained block: resume the chain's loop at that position."""
        chain = target.chain
        assert chain is not None
        if chain is self.innermost_loop():
            if target.position == 0:
                self.emit("break")
            else:
                self.emit(f"_p{chain.label} = {target.position}")
                self.emit("continue")
            return
        for c in self.ctrls[len(self.ctrls) - depth:]:
            c.passed_through = c.looped and c is not chain
        self.emit(f"_p{chain.label} = {target.position}")
        self.emit(f"_br = {chain.label}")
        self.emit("break")

    # --- translation ---------------------------------------------------------------------
    def translate(self, body: list[Instr]) -> str:
        t = self.fn.type
        n_params = len(t.params)
        self.targeted = _branch_targets(body)
        self.body = body
        self.chained_opens = 0  # block opens already taken into a chain
        self.ctrls.append(_Construct("func", -1, 0, 0, len(t.results)))
        for self.at, (op, imm) in enumerate(body[:-1]):
            if self.dead:
                self.skip(op)
                continue
            if op.kind == "control":
                self.control(op, imm)
            else:
                self.compute(op, imm)
        if not self.dead:
            self.flush()
            n = len(t.results)
            self.emit(f"return {self.slots(self.h - n, n)}" if n else "return")
        params = ", ".join(f"l{i}" for i in range(n_params))
        head = [f"def {self.name}({params}):"]
        for i, lt in enumerate(self.fn.compiled.locals):
            head.append(f"    l{n_params + i} = {default_value(lt)!r}")
        if any("_br" in line for line in self.lines):
            head.append("    _br = None")
        if self.fuel:
            head += ["    if I.fuel <= 0:", "        raise OutOfFuel()", "    I.fuel -= 1"]
        return "\n".join(head + self.lines) + "\n"

    def skip(self, op: Op) -> None:
        """Code after an unconditional branch never runs: skip to its construct's end."""
        if op.imm == "blocktype":
            self.dead_depth += 1
        elif op.name == "end" or op.name == "else":
            if self.dead_depth:
                self.dead_depth -= op.name == "end"
                return
            self.dead = False
            self.control(op, None)

    def open_chain(self) -> bool:
        """Open a run of directly nested result-less blocks as one loop, if there is one:
        how compilers lay out a switch (one block per case, a br_table inside the last)."""
        n = 0
        while (self.at + n < len(self.body) and self.body[self.at + n][0].name == "block"
               and self.body[self.at + n][1] is None):
            n += 1
        if n < _MIN_CHAIN or self.labels + 1 not in self.targeted:
            return False
        chain = None
        for position in range(n):
            self.labels += 1
            c = _Construct("block", self.labels, self.h, 0, 0, looped=position == 0,
                           position=position)
            chain = chain or c
            c.chain = chain
            self.ctrls.append(c)
        assert chain is not None
        self.emit(f"_p{chain.label} = {n}")
        self.emit("while True:")
        self.emit(f"    if _p{chain.label} == {n}:")
        self.indent += 2
        self.emit("pass")
        self.chained_opens = n - 1
        return True

    def close_chained(self, c: _Construct) -> None:
        """The end of a chained block: the next position's code follows."""
        chain = c.chain
        assert chain is not None
        if c is chain:
            self.indent -= 1
            self.emit("break")
            self.indent -= 1
            return
        self.emit(f"_p{chain.label} = {c.position}")
        self.indent -= 1
        self.emit(f"if _p{chain.label} == {c.position}:")
        self.indent += 1
        self.emit("pass")

    def open(self, kind: str, bt: object) -> None:
        """Blocks and ifs no branch targets need no Python loop (Python nests 20 at most)."""
        if kind == "block" and self.chained_opens:
            self.chained_opens -= 1
            return
        if kind == "block" and bt is None and self.open_chain():
            return
        params, results = self.block_type(bt)
        self.labels += 1
        looped = kind == "loop" or self.labels in self.targeted
        c = _Construct(kind, self.labels, self.h - params, params, results, looped)
        self.ctrls.append(c)
        if looped:
            self.emit("while True:")
            self.indent += 1

    def close(self) -> None:
        c = self.ctrls.pop()
        if c.chain is not None:
            self.close_chained(c)
            self.h = c.height
            if c is not c.chain:
                return
        elif c.kind == "if":
            self.indent -= 1  # out of the then/else body: both paths leave the construct
        if c.looped and c.chain is None:
            self.emit("break")
            self.indent -= 1
        self.h = c.height + c.results
        outer = self.innermost_loop()
        if c.passed_through and outer.kind != "func":
            # A branch left c for a construct further out: outer is the target, or passes on.
            self.emit("if _br is not None:")
            self.emit(f"    if _br == {outer.label}:")
            self.indent += 2
            self.emit("_br = None")
            if outer.kind == "loop":
                self.spend_fuel()
            self.emit("continue" if outer.kind == "loop" or outer.chain else "break")
            self.indent -= 1
            self.emit("break")
            self.indent -= 1

    def control(self, op: Op, imm: object) -> None:  # noqa: C901 - one case per instruction
        name = op.name
        if name in ("call", "call_indirect"):
            self.call_op(op, imm)
            return
        cond = ""
        if name in ("if", "br_if"):
            cond = _truth(self.operand(self.h - 1))
        elif name == "br_table":
            cond = self.operand(self.h - 1)
        self.flush()
        if name == "unreachable":
            self.emit("raise Trap('unreachable')")
            self.dead = True
        elif name in ("block", "loop"):
            self.open(name, imm)
        elif name == "if":
            self.h -= 1
            self.open("if", imm)
            self.emit(f"if {cond}:")
            self.indent += 1
            self.emit("pass")
        elif name == "else":
            c = self.ctrls[-1]
            self.indent -= 1
            self.emit("else:")
            self.indent += 1
            self.emit("pass")
            self.h = c.height + c.params
        elif name == "end":
            self.close()
        elif name == "br":
            self.branch(imm)
            self.dead = True
        elif name == "br_if":
            self.h -= 1
            self.emit(f"if {cond}:")
            self.indent += 1
            self.branch(imm)
            self.indent -= 1
        elif name == "br_table":
            labels, default = imm
            self.h -= 1
            # Index -> position among the distinct targets (a tuple), then one branch each.
            targets = sorted(set(labels) | {default})
            position = {depth: i for i, depth in enumerate(targets)}
            table = repr(tuple(position[d] for d in labels))
            self.emit(f"_i = {table}[{cond}] if {cond} < {len(labels)} "
                      f"else {position[default]}")
            for i, depth in enumerate(targets):
                if i < len(targets) - 1:
                    self.emit(f"{'if' if i == 0 else 'elif'} _i == {i}:")
                elif i:
                    self.emit("else:")
                self.indent += len(targets) > 1
                self.branch(depth)
                self.indent -= len(targets) > 1
            self.dead = True
        elif name == "return":
            self.branch(len(self.ctrls) - 1)
            self.dead = True

    def call_op(self, op: Op, imm: object) -> None:
        if op.name == "call":
            self.call(self.inst.funcs[imm], None, f"w_func{imm}")
            return
        ftype = self.module.types[imm[0]]
        table = self.const(f"w_table{imm[1]}", self.inst.tables[imm[1]])
        self.h -= 1
        target = f"_call_target({table}, {self.const(f'w_type{imm[0]}', ftype)}, " \
                 f"{self.operand(self.h)})"
        self.call(None, (ftype, target), "")

    def call(self, callee: Function | None, indirect: tuple | None, name: str) -> None:
        from popek.wasm.instance import WasmFunction
        t = callee.type if callee is not None else indirect[0]
        n, r = len(t.params), len(t.results)
        self.h -= n
        args = ", ".join(self.operand(self.h + i) for i in range(n))
        if callee is not None and type(callee) is WasmFunction:
            call = f"{self.const(name, callee)}.fast({args})"
            targets = self.slots(self.h, r)
        else:
            f = self.const(name, callee) if callee is not None else indirect[1]
            call = f"call_function(I, {f}, [{args}])"
            targets = self.slots(self.h, r) + ("," if r == 1 else "")
        self.emit(f"{targets} = {call}" if r else call)
        self.h += r

    def compute(self, op: Op, imm: object) -> None:
        n = len(op.params)
        base = self.h - n
        values = {x: self.operand(base + i) for i, x in enumerate("abc"[:n])}
        self.h = base + len(op.results)
        if op.name == "local.get":
            self.pending[base] = f"l{imm}"
            return
        if op.name.endswith(".const"):
            self.pending[base] = repr(imm)
            return
        if op.name in ("local.set", "local.tee"):
            self.flush(reading=f"l{imm}")
            self.emit(f"l{imm} = {values['a']}")
            if op.name == "local.tee":
                self.pending[base] = f"l{imm}"
            return
        names = IMM_NAMES[op.imm]
        if names:
            bound = self.inst._bind_imm(op.imm, imm)  # noqa: SLF001 - the interpreter's binding
            parts = (bound,) if len(names) == 1 else bound
            for name, key, value in zip(names, _stable_names(op.imm, imm), parts, strict=True):
                values[name] = repr(value) if isinstance(value, int) else self.const(key, value)
            if "idx" in values:
                values["Lidx"] = f"l{values['idx']}"
        values["R"] = f"s{base}"
        text = "".join(values[part] if i & 1 else part for i, part in enumerate(_template(op)))
        if values.get("off") == "0":
            text = text.replace(" + 0\n", "\n", 1)  # the effective address of offset 0
        if op.kind == "compute" and op.results:
            if op.imm == "none" and not op.traps and len(text) < _MAX_DEFERRED:
                self.pending[base] = f"({text})"  # pure: computed where it is consumed
                return
            text = f"s{base} = {text}"
        for line in text.split("\n"):
            if line.strip() != "None":
                self.emit(line)


def _branch_targets(body: list[Instr]) -> set[int]:
    """The constructs (numbered 1, 2, ... as they open) that some branch targets."""
    targeted: set[int] = set()
    opened: list[int] = []
    count = 0
    for op, imm in body:
        if op.imm == "blocktype":
            count += 1
            opened.append(count)
        elif op.name == "end" and opened:
            opened.pop()
        elif op.name in ("br", "br_if", "br_table"):
            depths = (*imm[0], imm[1]) if op.name == "br_table" else (imm,)
            targeted.update(opened[-1 - d] for d in depths if d < len(opened))
    return targeted


def _truth(expr: str) -> str:
    """A condition: ``(int(x < y))`` tests as ``(x < y)`` without the call."""
    if not (expr.startswith("(int(") and expr.endswith("))")):
        return expr
    depth = 0
    for ch in expr[5:-2]:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:  # int( closes before the end: (int(a) + int(b)), say
            return expr
    return f"({expr[5:-2]})"


def _stable_names(kind: str, imm: object) -> tuple[str, ...]:
    """Names for the parts of a bound immediate (in IMM_NAMES order), from the module."""
    i = imm if isinstance(imm, tuple) else (imm,)
    return {
        "global": (f"w_global{imm}",), "memarg": ("w_memory0_data", ""),
        "mem": ("w_memory0",), "mem2": ("w_memory0",),
        "data": ("w_memory0", f"w_data{i[0]}"), "dataidx": (f"w_data{imm}",),
        "table": (f"w_table{imm}",), "table2": (f"w_table{i[0]}", f"w_table{i[-1]}"),
        "elem_table": (f"w_elem{i[0]}", f"w_table{i[-1]}"), "elemidx": (f"w_elem{imm}",),
        "func": (f"w_func{imm}",),
    }.get(kind, ("",) * len(IMM_NAMES[kind]))


@cache
def _template(op: Op) -> list[str]:
    """The op's code with its operands and immediates as markers (odd items of the list),
    so that specializing one instruction is joining strings."""
    a, b, result = (f"{_MARK}{x}{_MARK}" for x in ("a", "b", "R"))
    if op.kind == "load":
        text = "\n".join(semantics.load_lines(op, a, result))
    elif op.kind == "store":
        text = "\n".join(semantics.store_lines(op, a, b))
    else:
        text = op.sem.replace("L[idx]", f"{_MARK}Lidx{_MARK}")
        text = _OPERAND.sub(lambda m: f"{_MARK}{m.group(1)}{_MARK}", text)
    for name in IMM_NAMES[op.imm]:
        text = re.sub(rf"\b{name}\b", f"{_MARK}{name}{_MARK}", text)
    for name, value in _INLINE_CONSTANTS.items():  # a literal costs less than a global
        text = re.sub(rf"\b{name}\b", value, text)
    return text.split(_MARK)


def function_name(index: int) -> str:
    return f"wasm_function_{index}"


def translate_instance(inst: Instance) -> None:
    """Give every function defined in ``inst`` a compiled ``fast`` entry point."""
    ns = semantics.namespace()
    ns.update(Trap=Trap, OutOfFuel=OutOfFuel, I=inst, _call_target=_call_target,
              call_function=call_function)
    first = len(inst.module.imported("func"))
    for offset, code in enumerate(inst.module.codes):
        fn = inst.funcs[first + offset]
        fn.fast = _lazy(inst, first + offset, fn, code.body, ns)  # type: ignore[attr-defined]


def _lazy(inst: Instance, index: int, fn: WasmFunction, body: list[Instr],
          ns: dict) -> Callable:
    """A stand-in that translates the function on its first call, then calls it.

    A function Python cannot compile (blocks nested deeper than Python's 20), or so long
    that compiling it would cost the host more than interpreting it, stays on the
    interpreter."""
    def first_call(*args: object) -> object:
        fn.fast = _interpreted(fn)
        if len(body) <= MAX_TRANSLATED:
            source = _FunctionTranslator(inst, index, fn, ns).translate(body)
            try:
                exec(compiled(source), ns)  # noqa: S102 - generated from our declarations
                fn.fast = ns[function_name(index)]
            except (SyntaxError, RecursionError, MemoryError):
                pass
        return fn.fast(*args)

    if sys.getrecursionlimit() < PYTHON_RECURSION_LIMIT:
        sys.setrecursionlimit(PYTHON_RECURSION_LIMIT)
    return first_call


def _interpreted(fn: WasmFunction) -> Callable:
    n = len(fn.type.results)

    def call(*args: object) -> object:
        out = run(fn, list(args))
        return None if n == 0 else out[0] if n == 1 else tuple(out)

    return call
