"""LLVM IR written as text: the part of llvmlite.ir's builder interface tier 2 uses.

llvmlite.ir builds an object graph, names every value through a scope, and formats
the graph into text; for code compiled while the guest runs, that cost more than
LLVM's own optimization and code generation (measured on Lua: ~15 ms of a ~20 ms
block compile). This builder appends each instruction's text as it is emitted, so
the same lowering code produces the same IR at a fraction of the cost. LLVM parses
and verifies the text (``llvmlite.binding.parse_assembly``), so a mistake here is an
error at compile time, never wrong code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count


class Type:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class IntType(Type):
    def __init__(self, width: int) -> None:
        super().__init__(f"i{width}")
        self.width = width


class PointerType(Type):
    def __init__(self) -> None:
        super().__init__("ptr")


class FunctionType(Type):
    def __init__(self, ret: Type, args: list[Type]) -> None:
        super().__init__(f"{ret} ({', '.join(map(str, args))})")
        self.return_type = ret
        self.args = args



class Value:
    """An SSA value (or constant) of a type; ``ref`` is how instructions name it."""

    __slots__ = ("type", "ref")

    def __init__(self, type_: Type, ref: str) -> None:
        self.type = type_
        self.ref = ref


class Constant(Value):
    __slots__ = ()

    def __init__(self, type_: Type, value: int) -> None:
        super().__init__(type_, str(value))


class Block:
    """A basic block: its instructions and, once ended, its terminator."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[object] = []  # indented lines, or phis rendered at the end
        self.terminator: str | None = None

    @property
    def is_terminated(self) -> bool:
        return self.terminator is not None


class _Phi(Value):
    __slots__ = ("incoming",)

    def __init__(self, type_: Type, ref: str) -> None:
        super().__init__(type_, ref)
        self.incoming: list[tuple[Value, Block]] = []

    def add_incoming(self, value: Value, block: Block) -> None:
        self.incoming.append((value, block))

    def __str__(self) -> str:
        arms = ", ".join(f"[ {v.ref}, %{b.name} ]" for v, b in self.incoming)
        return f"  {self.ref} = phi {self.type} {arms}"


class Function:
    def __init__(self, module: Module, ftype: FunctionType, name: str) -> None:
        self.name = name
        self.module = module
        self.function_type = ftype
        self.args = [Value(t, f"%a{i}") for i, t in enumerate(ftype.args)]
        self.ref = f"@{name}"  # a function is a pointer value
        self.type = PTR
        self.linkage = ""  # "internal": invisible outside its module
        self.calling_convention = ""  # LLVM's, as "preserve_mostcc"; "" for C's
        self.blocks: list[Block] = []
        self.attributes: set[str] = set()
        self._ids = count()
        module.functions.append(self)

    def fresh(self) -> str:
        return f"%t{next(self._ids)}"

    def append_basic_block(self, name: str = "b") -> Block:
        block = Block(f"{name}.{next(self._ids)}")
        self.blocks.append(block)
        return block

    def __str__(self) -> str:
        params = ", ".join(f"{a.type} {a.ref}" for a in self.args)
        out = [f"define {self.linkage} {self.calling_convention} "
               f"{self.function_type.return_type} @{self.name}({params}) "
               f"{' '.join(sorted(self.attributes))} {{"]
        for block in self.blocks:
            out.append(f"{block.name}:")
            out += map(str, block.lines)
            out.append(f"  {block.terminator or 'unreachable'}")
        out.append("}")
        return "\n".join(out)


class Module:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.functions: list[Function] = []
        self.declarations: set[str] = set()  # of the intrinsics its functions call

    def __str__(self) -> str:
        return "\n".join(sorted(self.declarations)) + "\n\n" + \
            "\n\n".join(str(f) for f in self.functions) + "\n"


_UNSIGNED = {"==": "eq", "!=": "ne", "<": "ult", "<=": "ule", ">": "ugt", ">=": "uge"}
_SIGNED = {"==": "eq", "!=": "ne", "<": "slt", "<=": "sle", ">": "sgt", ">=": "sge"}
PTR = PointerType()
I1 = IntType(1)


class IRBuilder:
    """Appends instructions at the end of the current block of one function."""

    def __init__(self, block: Block, function: Function) -> None:
        self.function = function
        self.block = block
        self._extended: dict[str, Value] = {}  # an extension's result: what it extended

    # -- positioning --
    def append_basic_block(self, name: str = "b") -> Block:
        return self.function.append_basic_block(name)

    def position_at_end(self, block: Block) -> None:
        self.block = block

    @contextmanager
    def goto_entry_block(self) -> Iterator[None]:
        """Emit into the entry block (before its terminator, which is kept apart)."""
        saved = self.block
        self.block = self.function.blocks[0]
        try:
            yield
        finally:
            self.block = saved

    @contextmanager
    def if_then(self, pred: Value, likely: bool | None = None) -> Iterator[None]:
        then_bb, end_bb = self.append_basic_block("if"), self.append_basic_block("endif")
        self.cbranch(pred, then_bb, end_bb)
        self.block = then_bb
        yield
        if not self.block.is_terminated:
            self.branch(end_bb)
        self.block = end_bb

    # -- emission --
    def _emit(self, type_: Type, text: str) -> Value:
        ref = f"%t{next(self.function._ids)}"
        self.block.lines.append(f"  {ref} = {text}")
        return Value(type_, ref)

    def _binary(self, op: str, a: Value, b: Value) -> Value:
        return self._emit(a.type, f"{op} {a.type} {a.ref}, {b.ref}")

    def add(self, a: Value, b: Value) -> Value:
        return self._binary("add", a, b)

    def sub(self, a: Value, b: Value) -> Value:
        return self._binary("sub", a, b)

    def mul(self, a: Value, b: Value) -> Value:
        return self._binary("mul", a, b)

    def and_(self, a: Value, b: Value) -> Value:
        return self._binary("and", a, b)

    def or_(self, a: Value, b: Value) -> Value:
        return self._binary("or", a, b)

    def xor(self, a: Value, b: Value) -> Value:
        return self._binary("xor", a, b)

    def shl(self, a: Value, b: Value) -> Value:
        return self._binary("shl", a, b)

    def lshr(self, a: Value, b: Value, exact: bool = False) -> Value:
        return self._binary("lshr exact" if exact else "lshr", a, b)

    def ashr(self, a: Value, b: Value) -> Value:
        return self._binary("ashr", a, b)

    def udiv(self, a: Value, b: Value) -> Value:
        return self._binary("udiv", a, b)

    def urem(self, a: Value, b: Value) -> Value:
        return self._binary("urem", a, b)

    def sdiv(self, a: Value, b: Value) -> Value:
        return self._binary("sdiv", a, b)

    def srem(self, a: Value, b: Value) -> Value:
        return self._binary("srem", a, b)

    def neg(self, a: Value) -> Value:
        return self._emit(a.type, f"sub {a.type} 0, {a.ref}")

    def not_(self, a: Value) -> Value:
        return self._emit(a.type, f"xor {a.type} {a.ref}, -1")

    def icmp_unsigned(self, op: str, a: Value, b: Value) -> Value:
        return self._emit(I1, f"icmp {_UNSIGNED[op]} {a.type} {a.ref}, {b.ref}")

    def icmp_signed(self, op: str, a: Value, b: Value) -> Value:
        return self._emit(I1, f"icmp {_SIGNED[op]} {a.type} {a.ref}, {b.ref}")

    def _cast(self, op: str, a: Value, type_: Type) -> Value:
        return self._emit(type_, f"{op} {a.type} {a.ref} to {type_}")

    def _extend(self, op: str, a: Value, type_: Type) -> Value:
        wide = self._cast(op, a, type_)
        self._extended[wide.ref] = a
        return wide

    def cast(self, op: str, a: Value, type_: Type) -> Value:
        """Any conversion LLVM names (bitcast, fpext, sitofp, ...)."""
        return self._cast(op, a, type_)

    def fbinary(self, op: str, a: Value, b: Value) -> Value:
        """A floating-point operation: fadd, fsub, fmul, fdiv."""
        return self._binary(op, a, b)

    def fcmp(self, cond: str, a: Value, b: Value) -> Value:
        """A floating-point comparison, ``cond`` as LLVM spells it (oeq, une, olt, ...)."""
        return self._emit(I1, f"fcmp {cond} {a.type} {a.ref}, {b.ref}")

    def zext(self, a: Value, type_: Type) -> Value:
        return self._extend("zext", a, type_)

    def sext(self, a: Value, type_: Type) -> Value:
        return self._extend("sext", a, type_)

    def trunc(self, a: Value, type_: Type) -> Value:
        """``a``'s low bits; the value an extension started from, if that is them."""
        narrow = self._extended.get(a.ref)
        if narrow is not None and narrow.type.text == type_.text:
            return narrow
        return self._cast("trunc", a, type_)

    def select(self, cond: Value, a: Value, b: Value) -> Value:
        return self._emit(a.type, f"select i1 {cond.ref}, {a.type} {a.ref}, {b.type} {b.ref}")

    def phi(self, type_: Type) -> _Phi:
        phi = _Phi(type_, self.function.fresh())
        self.block.lines.append(phi)
        return phi

    def load(self, ptr: Value, typ: Type, align: int | None = None) -> Value:
        suffix = f", align {align}" if align else ""
        return self._emit(typ, f"load {typ}, ptr {ptr.ref}{suffix}")

    def store(self, value: Value, ptr: Value, align: int | None = None) -> None:
        suffix = f", align {align}" if align else ""
        self.block.lines.append(f"  store {value.type} {value.ref}, ptr {ptr.ref}{suffix}")

    def gep(self, ptr: Value, indices: list[Value], inbounds: bool = False,
            source_etype: Type | None = None) -> Value:
        idx = ", ".join(f"{i.type} {i.ref}" for i in indices)
        kind = "getelementptr inbounds" if inbounds else "getelementptr"
        return self._emit(PTR, f"{kind} {source_etype}, ptr {ptr.ref}, {idx}")

    def call(self, fn: Value, ftype: FunctionType, args: list[Value],
             tail: str | bool = False, cc: str = "") -> Value:
        """Call the function ``fn`` points to, whose type is ``ftype`` (and calling
        convention ``cc``, C's if empty)."""
        marker = f"{tail} " if isinstance(tail, str) else ""
        text = f"{marker}call {cc} {ftype.return_type} {fn.ref}(" \
               f"{', '.join(f'{a.type} {a.ref}' for a in args)})"
        return self._emit(ftype.return_type, text)

    def intrinsic(self, name: str, ret: Type, args: list[Value]) -> Value:
        """Call the LLVM intrinsic ``name`` (declared in the module on first use)."""
        types = ", ".join(str(a.type) for a in args)
        self.function.module.declarations.add(f"declare {ret} @{name}({types})")
        operands = ", ".join(f"{a.type} {a.ref}" for a in args)
        return self._emit(ret, f"call {ret} @{name}({operands})")

    def asm(self, ret: Type, template: str, constraints: str, args: list[Value]) -> Value:
        """Inline assembly with side effects (LLVM neither moves, merges nor drops it):
        ``template`` in AT&T syntax, one instruction a line, ``$n`` its operands."""
        text = template.replace("\\", "\\5C").replace('"', "\\22").replace("\n", "\\0A")
        operands = ", ".join(f"{a.type} {a.ref}" for a in args)
        return self._emit(ret, f'call {ret} asm sideeffect "{text}", "{constraints}"({operands})')

    def extract_value(self, aggregate: Value, index: int, type_: Type) -> Value:
        """Member ``index`` (of type ``type_``) of a structure value."""
        return self._emit(type_, f"extractvalue {aggregate.type} {aggregate.ref}, {index}")

    def alloca(self, typ: Type, count: int = 1) -> Value:
        """A stack slot (in the entry block, so LLVM promotes it to SSA registers)."""
        value = Value(PTR, self.function.fresh())
        self.function.blocks[0].lines.insert(0, f"  {value.ref} = alloca {typ}, i32 {count}")
        return value

    # -- terminators --
    def _end(self, text: str) -> None:
        self.block.terminator = text

    def ret(self, value: Value) -> None:
        self._end(f"ret {value.type} {value.ref}")

    def branch(self, target: Block) -> None:
        self._end(f"br label %{target.name}")

    def cbranch(self, cond: Value, then: Block, otherwise: Block) -> None:
        self._end(f"br i1 {cond.ref}, label %{then.name}, label %{otherwise.name}")

    def switch(self, value: Value, default: Block, cases: list[tuple[int, Block]]) -> None:
        arms = " ".join(f"{value.type} {v}, label %{b.name}" for v, b in cases)
        self._end(f"switch {value.type} {value.ref}, label %{default.name} [ {arms} ]")

    def unreachable(self) -> None:
        self._end("unreachable")
