"""Functions and instances: linking a module's imports, instantiating it, calling exports.

At the Python boundary (``Function.__call__``, host function arguments and results)
integers are unsigned ints of their width (any int is accepted and wrapped) and floats
are Python floats; references are :class:`Function` objects, host objects or None.
"""

from __future__ import annotations

from collections.abc import Callable

from popek.engine.engine import TIERS
from popek.engine.jit import available as jit_available
from popek.wasm import numeric
from popek.wasm.binary import Instr, Module
from popek.wasm.errors import LinkError, Trap, WasmError
from popek.wasm.runtime import (
    DEFAULT_MEMORY_LIMIT,
    Global,
    Memory,
    Segment,
    Table,
    memory_init,
    table_init,
)
from popek.wasm.semantics import BOUND_BARE, HANDLERS
from popek.wasm.types import FuncType, Limits, default_value
from popek.wasm.validate import CALL, CALL_INDIRECT, COMPUTE, FunctionCode

_MASKS = {"i32": numeric.M32, "i64": numeric.M64}
# The tiers by popek's names (as ``popek run --engine``): the highest a function may reach.
# "jit" runs on the translation tier where llvmlite is missing. (WebAssembly has no
# baseline tier: its functions are compiled whole.)
ENGINES = tuple(t for t in TIERS if t != "baseline")
DEFAULT_ENGINE = "jit"


def to_raw(t: str, value: object) -> object:
    """A Python value as the bits a wasm value of type ``t`` holds."""
    if t in _MASKS:
        if not isinstance(value, int):
            raise TypeError(f"expected an int for {t}, got {value!r}")
        return value & _MASKS[t]
    if t == "f32":
        return numeric.b32(float(value))  # type: ignore[arg-type]
    if t == "f64":
        return numeric.b64(float(value))  # type: ignore[arg-type]
    return value


def from_raw(t: str, value: object) -> object:
    if t == "f32":
        return numeric.f32(value)  # type: ignore[arg-type]
    if t == "f64":
        return numeric.f64(value)  # type: ignore[arg-type]
    return value


class Function:
    """A function value: defined in an instance, or provided by the host."""

    type: FuncType
    nparams: int

    def call_raw(self, args: list) -> list:
        raise NotImplementedError

    def __call__(self, *args: object) -> object:
        """Call with Python values; None, one value or a tuple, as the type has results."""
        if len(args) != len(self.type.params):
            raise TypeError(f"expected {len(self.type.params)} arguments, got {len(args)}")
        raw = [to_raw(t, a) for t, a in zip(self.type.params, args, strict=True)]
        results = [from_raw(t, v) for t, v in zip(self.type.results, self.call_raw(raw),
                                                    strict=True)]
        if not results:
            return None
        return results[0] if len(results) == 1 else tuple(results)


class HostFunction(Function):
    """A Python callable as a wasm function: ``func(caller, *args)`` where ``caller`` is the
    calling :class:`Instance` (None when called from Python) and returns None, one value or
    a tuple. Exceptions it raises propagate out of the wasm call unchanged."""

    def __init__(self, params: list[str], results: list[str],
                 func: Callable[..., object]) -> None:
        self.type = FuncType(tuple(params), tuple(results))
        self.nparams = len(params)
        self.func = func
        self.instance = None

    def invoke(self, caller: Instance | None, args: list) -> list:
        values = [from_raw(t, a) for t, a in zip(self.type.params, args, strict=True)]
        out = self.func(caller, *values)
        results = self.type.results
        if out is None:
            out = ()
        elif not isinstance(out, tuple):
            out = (out,)
        if len(out) != len(results):
            raise Trap(f"host function returned {len(out)} values, expected {len(results)}")
        try:
            return [to_raw(t, v) for t, v in zip(results, out, strict=True)]
        except (TypeError, ValueError, OverflowError) as e:
            raise Trap(f"host function returned a bad value: {e}") from None

    def call_raw(self, args: list) -> list:
        return self.invoke(None, args)


class WasmFunction(Function):
    def __init__(self, instance: Instance, compiled: FunctionCode) -> None:
        self.instance = instance
        self.compiled = compiled
        self.type = compiled.type
        self.nparams = len(compiled.type.params)
        self.local_defaults = [default_value(t) for t in compiled.locals]
        self.frame_size = self.nparams + len(self.local_defaults) + compiled.max_height + 1
        self.code: list[tuple] = []
        # The translated tier's entry point (positional raw arguments; None, a value or a
        # tuple of results), or None when the instance runs on the interpreter.
        self.fast: Callable[..., object] | None = None

    def call_raw(self, args: list) -> list:
        if self.fast is None:
            from popek.wasm.interpreter import run
            return run(self, list(args))
        try:
            out = self.fast(*args)
        except RecursionError:
            raise Trap("call stack exhausted") from None
        n = len(self.type.results)
        return [] if n == 0 else [out] if n == 1 else list(out)  # type: ignore[arg-type]


Extern = Function | Table | Memory | Global


class Instance:
    """A module instantiated: its functions, tables, memory, globals and exports."""

    def __init__(self, module: Module, imports: dict[str, dict[str, object]] | None,
                 fuel: int | None, max_memory: int | None) -> None:
        self.module = module
        self.fuel = fuel
        funcs, tables, mems, globals_ = _resolve_imports(module, imports or {})
        self.funcs: list[Function] = funcs + [WasmFunction(self, c) for c in module.compiled]
        self.globals: list[Global] = globals_
        for g in module.globals:
            self.globals.append(Global(g.type.type, g.type.mutable, self._const(g.init)))
        self.tables: list[Table] = tables + [
            Table(t.elem, t.limits.min, t.limits.max) for t in module.tables]
        self.mems: list[Memory] = mems + [
            Memory(m.limits.min, m.limits.max,
                   DEFAULT_MEMORY_LIMIT if max_memory is None else max_memory)
            for m in module.mems]
        self.elems = [Segment([self._const(e) for e in seg.init]) for seg in module.elems]
        self.datas = [Segment(seg.init) for seg in module.datas]
        for f in self.funcs[len(funcs):]:
            f.code = [self._bind(op) for op in f.compiled.code]  # type: ignore[attr-defined]
        spaces: dict[str, list] = {"func": self.funcs, "table": self.tables,
                                   "memory": self.mems, "global": self.globals}
        self.exports: dict[str, Extern] = {
            e.name: spaces[e.kind][e.index] for e in module.exports}

    def _const(self, expr: list[Instr]) -> object:
        """Evaluate a validated constant expression with the interpreter's handlers."""
        stack: list = []
        for op, imm in expr[:-1]:
            HANDLERS[op](stack, [], self._bind_imm(op.imm, imm))
        return stack[0]

    def _bind(self, lowered: tuple) -> tuple:
        kind, op, imm = lowered
        if kind == COMPUTE:
            if imm is None:
                return BOUND_BARE[op]
            return (kind, HANDLERS[op], self._bind_imm(op.imm, imm))
        if kind == CALL:
            return (kind, None, self.funcs[imm])
        if kind == CALL_INDIRECT:
            return (kind, None, (self.tables[imm[0]], imm[1]))
        return (kind, None, imm)

    def _bind_imm(self, kind: str, imm: object) -> object:  # noqa: C901 - one case per kind
        if kind == "global":
            return self.globals[imm]
        if kind == "memarg":
            return (self.mems[0].data, imm[1])
        if kind in ("mem", "mem2"):
            return self.mems[0]
        if kind == "data":
            return (self.mems[0], self.datas[imm[0]])
        if kind == "dataidx":
            return self.datas[imm]
        if kind == "table":
            return self.tables[imm]
        if kind == "table2":
            return (self.tables[imm[0]], self.tables[imm[1]])
        if kind == "elem_table":
            return (self.elems[imm[0]], self.tables[imm[1]])
        if kind == "elemidx":
            return self.elems[imm]
        if kind == "func":
            return self.funcs[imm]
        return imm

    def initialize(self) -> None:
        """Apply active segments in order, then run the start function (may trap)."""
        for seg, live in zip(self.module.elems, self.elems, strict=True):
            if seg.mode == "active":
                table_init(self.tables[seg.table], live, self._const(seg.offset), 0,
                           len(live.items))
            if seg.mode != "passive":
                live.drop()
        for seg, live in zip(self.module.datas, self.datas, strict=True):
            if seg.mode == "active":
                memory_init(self.mems[seg.memory], live, self._const(seg.offset), 0,
                            len(live.items))
                live.drop()
        if self.module.start is not None:
            self.funcs[self.module.start].call_raw([])

    @property
    def memory(self) -> Memory | None:
        """The exported memory named "memory" (what WASI host functions work on)."""
        mem = self.exports.get("memory")
        return mem if isinstance(mem, Memory) else None

    def call(self, name: str, *args: object) -> object:
        f = self.exports.get(name)
        if not isinstance(f, Function):
            raise LinkError(f"no exported function {name!r}")
        return f(*args)


def _resolve_imports(module: Module, imports: dict[str, dict[str, object]]) -> tuple:
    funcs: list[Function] = []
    tables: list[Table] = []
    mems: list[Memory] = []
    globals_: list[Global] = []
    for imp in module.imports:
        value = imports.get(imp.module, {}).get(imp.name)
        if value is None:
            raise LinkError(f"unknown import {imp.module}.{imp.name}")
        ok = False
        if imp.kind == "func" and isinstance(value, Function):
            ok = value.type == module.types[imp.desc]  # type: ignore[index]
            funcs.append(value)
        elif imp.kind == "table" and isinstance(value, Table):
            ok = value.elem == imp.desc.elem and Limits(  # type: ignore[attr-defined]
                len(value.elements), value.max).fits_in(imp.desc.limits)  # type: ignore[attr-defined]
            tables.append(value)
        elif imp.kind == "memory" and isinstance(value, Memory):
            ok = Limits(value.pages, value.max_pages).fits_in(
                imp.desc.limits)  # type: ignore[attr-defined]
            mems.append(value)
        elif imp.kind == "global" and isinstance(value, Global):
            ok = (value.type, value.mutable) == (imp.desc.type,  # type: ignore[attr-defined]
                                                 imp.desc.mutable)  # type: ignore[attr-defined]
            globals_.append(value)
        if not ok:
            raise LinkError(f"incompatible import type for {imp.module}.{imp.name}")
    return funcs, tables, mems, globals_


def instantiate(module: Module, imports: dict[str, dict[str, object]] | None = None, *,
                fuel: int | None = None, max_memory: int | None = None,
                engine: str | None = None) -> Instance:
    """Link and initialize an instance of a validated module.

    ``fuel`` bounds the wasm calls and loop iterations it may execute (:class:`OutOfFuel`);
    ``max_memory`` bounds each memory's size in bytes (default 1 GiB; growth beyond it fails
    as the specification allows, with -1). ``engine`` is the highest tier its functions may
    reach, by ``popek run``'s names (default ``jit``; ``interp`` is the oracle).
    Raises :class:`LinkError` or, from a segment or the start function, :class:`Trap`.
    """
    engine = engine or DEFAULT_ENGINE
    if engine not in ENGINES:
        raise WasmError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if max_memory is not None and max_memory < 0:
        raise WasmError("max_memory must not be negative")
    inst = Instance(module, imports, fuel, max_memory)
    if engine != "interp":
        from popek.wasm.translator import translate_instance
        translate_instance(inst)
    if engine == "jit" and jit_available():
        from popek.wasm.native import compile_instance
        compile_instance(inst)
    inst.initialize()
    return inst
