"""Decoding the WebAssembly binary format into a :class:`Module` (no validation yet).

Every way bytes can fail to be a module raises :class:`MalformedModule` with the
specification's wording; instruction immediates are read as :mod:`popek.wasm.isa` declares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from popek.wasm.errors import MalformedModule
from popek.wasm.isa import BY_CODE, Op
from popek.wasm.types import (
    MAX_LOCALS,
    VALUE_TYPE_CODES,
    FuncType,
    GlobalType,
    Limits,
    MemoryType,
    TableType,
)

MAGIC = b"\0asm"
VERSION = b"\1\0\0\0"

Instr = tuple[Op, object]
"""An instruction and its decoded immediate (None, an int, or a tuple)."""


@dataclass
class Import:
    module: str
    name: str
    kind: str  # func, table, memory, global
    desc: object  # type index, TableType, MemoryType or GlobalType


@dataclass
class Export:
    name: str
    kind: str
    index: int


@dataclass
class GlobalDef:
    type: GlobalType
    init: list[Instr]


@dataclass
class ElemSegment:
    type: str
    init: list[list[Instr]]  # one constant expression per element
    mode: str  # active, passive, declarative
    table: int = 0
    offset: list[Instr] | None = None


@dataclass
class DataSegment:
    init: bytes
    mode: str  # active or passive
    memory: int = 0
    offset: list[Instr] | None = None


@dataclass
class Code:
    locals: list[str]
    body: list[Instr]


@dataclass
class Module:
    types: list[FuncType] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    funcs: list[int] = field(default_factory=list)  # type index of each defined function
    tables: list[TableType] = field(default_factory=list)
    mems: list[MemoryType] = field(default_factory=list)
    globals: list[GlobalDef] = field(default_factory=list)
    exports: list[Export] = field(default_factory=list)
    start: int | None = None
    elems: list[ElemSegment] = field(default_factory=list)
    datas: list[DataSegment] = field(default_factory=list)
    data_count: int | None = None
    codes: list[Code] = field(default_factory=list)
    compiled: list[object] = field(default_factory=list)  # filled in by validation
    # From the "name" custom section: subsection id (1 functions, 7 globals, ...) -> names.
    names: dict[int, dict[int, str]] = field(default_factory=dict)

    def imported(self, kind: str) -> list[Import]:
        return [i for i in self.imports if i.kind == kind]


def _last_byte_fits(b: int, used: int, signed: bool) -> bool:
    """Whether the unused high bits of a LEB128 number's longest last byte only extend it."""
    if signed:
        return (b & 0x7F) >> (used - 1) in (0, 0x7F >> (used - 1))
    return (b & 0x7F) >> used == 0


class Reader:
    """A cursor over bytes that reads the binary format's primitives."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise MalformedModule("unexpected end")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def bytes(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise MalformedModule("unexpected end")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return bytes(out)

    def _leb(self, bits: int, signed: bool) -> int:
        result = shift = 0
        max_bytes = (bits + 6) // 7
        for i in range(max_bytes):
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if i == max_bytes - 1 and not _last_byte_fits(b, bits - 7 * i, signed):
                    raise MalformedModule("integer too large")
                if signed and b & 0x40:
                    result -= 1 << shift
                return result
        raise MalformedModule("integer representation too long")

    def u32(self) -> int:
        pos = self.pos
        if pos < self.end and (b := self.data[pos]) < 0x80:  # one byte: most numbers
            self.pos = pos + 1
            return b
        return self._leb(32, False)

    def s32(self) -> int:
        pos = self.pos
        if pos < self.end and (b := self.data[pos]) < 0x80:
            self.pos = pos + 1
            return b - 0x80 if b & 0x40 else b
        return self._leb(32, True)

    def s33(self) -> int:
        return self._leb(33, True)

    def s64(self) -> int:
        return self._leb(64, True)

    def name(self) -> str:
        raw = self.bytes(self.u32())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedModule("malformed UTF-8 encoding") from None

    def count(self) -> int:
        """A vector length, which cannot exceed the bytes left (each element takes one)."""
        n = self.u32()
        if n > self.end - self.pos:
            raise MalformedModule("unexpected end")
        return n

    def valtype(self) -> str:
        code = self.byte()
        if code not in VALUE_TYPE_CODES:
            raise MalformedModule("malformed value type")
        return VALUE_TYPE_CODES[code]

    def reftype(self) -> str:
        code = self.byte()
        if code not in (0x70, 0x6F):
            raise MalformedModule("malformed reference type")
        return VALUE_TYPE_CODES[code]

    def limits(self) -> Limits:
        flag = self.byte()
        if flag not in (0, 1):
            raise MalformedModule("integer too large" if flag & 0x80 else "malformed limits flags")
        lo = self.u32()
        return Limits(lo, self.u32() if flag == 1 else None)


_I32 = 0xFFFFFFFF
_I64 = 0xFFFFFFFFFFFFFFFF


def _blocktype(r: Reader) -> object:
    b = r.data[r.pos] if r.pos < r.end else None
    if b == 0x40:
        r.pos += 1
        return None
    if b in VALUE_TYPE_CODES:
        r.pos += 1
        return VALUE_TYPE_CODES[b]
    idx = r.s33()
    if idx < 0:
        raise MalformedModule("malformed value type")
    return idx


def _zero_byte(r: Reader) -> int:
    if r.byte() != 0:
        raise MalformedModule("zero byte expected")
    return 0


_IMM_READERS = {
    "none": lambda r: None,
    "i32": lambda r: r.s32() & _I32,
    "i64": lambda r: r.s64() & _I64,
    "f32": lambda r: struct.unpack("<I", r.bytes(4))[0],
    "f64": lambda r: struct.unpack("<Q", r.bytes(8))[0],
    "local": Reader.u32, "global": Reader.u32, "func": Reader.u32, "call": Reader.u32,
    "label": Reader.u32, "table": Reader.u32, "dataidx": Reader.u32, "elemidx": Reader.u32,
    "memarg": lambda r: (r.u32(), r.u32()),
    "mem": _zero_byte,
    "mem2": lambda r: (_zero_byte(r), _zero_byte(r)),
    "data": lambda r: (r.u32(), _zero_byte(r)),
    "table2": lambda r: (r.u32(), r.u32()),
    "elem_table": lambda r: (r.u32(), r.u32()),
    "call_indirect": lambda r: (r.u32(), r.u32()),
    "reftype": Reader.reftype,
    "valtypes": lambda r: tuple(r.valtype() for _ in range(r.count())),
    "labels": lambda r: (tuple(r.u32() for _ in range(r.count())), r.u32()),
    "blocktype": _blocktype,
}


# Each op's immediate reader (None for none), looked up once per instruction.
_OP_READERS = {op: None if op.imm == "none" else _IMM_READERS[op.imm] for op in BY_CODE.values()}
# One shared instruction tuple for each op without immediates: a list slot per instruction
# is all a module's code then costs for them (hostile modules may be all such bytes).
_BARE = {op: (op, None) for op in BY_CODE.values()}


def read_expr(r: Reader) -> list[Instr]:
    """Instructions up to and including the ``end`` that closes the expression."""
    out: list[Instr] = []
    depth = 0
    data, by_code, readers = r.data, BY_CODE, _OP_READERS
    while True:
        if r.pos >= r.end:
            raise MalformedModule("unexpected end")
        code = data[r.pos]
        r.pos += 1
        if code == 0xFC:
            code = 0xFC00 | r.u32()
        op = by_code.get(code)
        if op is None:
            raise MalformedModule("illegal opcode")
        read = readers[op]
        out.append(_BARE[op] if read is None else (op, read(r)))
        if op.imm == "blocktype":
            depth += 1
        elif op.code == 0x0B:
            if depth == 0:
                return out
            depth -= 1


def _import(r: Reader) -> Import:
    module, name = r.name(), r.name()
    kind = r.byte()
    if kind == 0:
        return Import(module, name, "func", r.u32())
    if kind == 1:
        return Import(module, name, "table", _tabletype(r))
    if kind == 2:
        return Import(module, name, "memory", MemoryType(r.limits()))
    if kind == 3:
        return Import(module, name, "global", _globaltype(r))
    raise MalformedModule("malformed import kind")


def _tabletype(r: Reader) -> TableType:
    t = r.reftype()
    return TableType(r.limits(), t)


def _globaltype(r: Reader) -> GlobalType:
    t = r.valtype()
    mut = r.byte()
    if mut not in (0, 1):
        raise MalformedModule("malformed mutability")
    return GlobalType(t, bool(mut))


def _functype(r: Reader) -> FuncType:
    if r.byte() != 0x60:
        raise MalformedModule("malformed function type")
    params = tuple(r.valtype() for _ in range(r.count()))
    return FuncType(params, tuple(r.valtype() for _ in range(r.count())))


def _func_ref_exprs(r: Reader) -> list[list[Instr]]:
    return [[(BY_CODE[0xD2], r.u32()), (BY_CODE[0x0B], None)] for _ in range(r.count())]


def _elem(r: Reader) -> ElemSegment:
    flags = r.u32()
    if flags > 7:
        raise MalformedModule("malformed elements segment kind")
    table, offset, mode = 0, None, "active"
    if flags & 1:
        mode = "declarative" if flags & 2 else "passive"
    else:
        if flags & 2:
            table = r.u32()
        offset = read_expr(r)
    if flags & 4:  # expressions
        t = "funcref" if flags == 4 else r.reftype()
        init = [read_expr(r) for _ in range(r.count())]
    else:
        if flags & 3 and r.byte() != 0:
            raise MalformedModule("malformed element kind")
        t, init = "funcref", _func_ref_exprs(r)
    return ElemSegment(t, init, mode, table, offset)


def _data(r: Reader) -> DataSegment:
    flags = r.u32()
    if flags == 1:
        return DataSegment(r.bytes(r.u32()), "passive")
    if flags not in (0, 2):
        raise MalformedModule("malformed data segment kind")
    mem = r.u32() if flags == 2 else 0
    offset = read_expr(r)
    return DataSegment(r.bytes(r.u32()), "active", mem, offset)


def _code(r: Reader) -> Code:
    size = r.u32()
    end = r.pos + size
    if end > r.end:
        raise MalformedModule("unexpected end")
    body = Reader(r.data, r.pos, end)
    local_types: list[str] = []
    total = 0
    for _ in range(body.count()):
        n = body.u32()
        total += n
        if total > MAX_LOCALS:
            raise MalformedModule("too many locals")
        local_types += [body.valtype()] * n
    instrs = read_expr(body)
    if not body.at_end():
        raise MalformedModule("section size mismatch")
    r.pos = end
    return Code(local_types, instrs)


_NAME_MAPS = (1, 4, 5, 6, 7, 8, 9)  # functions, types, tables, memories, globals, elems, data


def _names(r: Reader) -> dict[int, dict[int, str]]:
    """The name maps of a "name" custom section; as a custom section it cannot make the
    module malformed, so what is broken in it just names nothing."""
    names: dict[int, dict[int, str]] = {}
    try:
        while not r.at_end():
            kind, size = r.byte(), r.u32()
            if kind in _NAME_MAPS:
                sub = Reader(r.data, r.pos, min(r.pos + size, r.end))
                names[kind] = {sub.u32(): sub.name() for _ in range(sub.count())}
            r.pos += size
    except MalformedModule:
        pass
    return names


_SECTION_ORDER = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 12: 10, 10: 11, 11: 12}


def decode(data: bytes) -> Module:
    """The module in ``data``; raises :class:`MalformedModule` on any encoding error."""
    if data[:4] != MAGIC:
        raise MalformedModule("magic header not detected")
    if data[4:8] != VERSION:
        raise MalformedModule("unknown binary version")
    m = Module()
    r = Reader(data, 8)
    last = 0
    func_count = None
    while not r.at_end():
        sid = r.byte()
        size = r.u32()
        if size > r.end - r.pos:
            raise MalformedModule("section size mismatch: unexpected end")
        s = Reader(data, r.pos, r.pos + size)
        if sid == 0:
            if s.name() == "name":
                m.names = _names(s)
        else:
            order = _SECTION_ORDER.get(sid)
            if order is None:
                raise MalformedModule("malformed section id")
            if order <= last:
                raise MalformedModule("unexpected content after last section")
            last = order
            _section(m, sid, s)
            if sid == 3:
                func_count = len(m.funcs)
            if not s.at_end():
                raise MalformedModule("section size mismatch")
        r.pos += size
    if len(m.codes) != (func_count or 0):
        raise MalformedModule("function and code section have inconsistent lengths")
    if m.data_count is not None and m.data_count != len(m.datas):
        raise MalformedModule("data count and data section have inconsistent lengths")
    return m


def _section(m: Module, sid: int, s: Reader) -> None:
    if sid == 1:
        m.types = [_functype(s) for _ in range(s.count())]
    elif sid == 2:
        m.imports = [_import(s) for _ in range(s.count())]
    elif sid == 3:
        m.funcs = [s.u32() for _ in range(s.count())]
    elif sid == 4:
        m.tables = [_tabletype(s) for _ in range(s.count())]
    elif sid == 5:
        m.mems = [MemoryType(s.limits()) for _ in range(s.count())]
    elif sid == 6:
        m.globals = [GlobalDef(_globaltype(s), read_expr(s)) for _ in range(s.count())]
    elif sid == 7:
        m.exports = []
        for _ in range(s.count()):
            name = s.name()
            kind = s.byte()
            if kind > 3:
                raise MalformedModule("malformed export kind")
            m.exports.append(Export(name, ("func", "table", "memory", "global")[kind], s.u32()))
    elif sid == 8:
        m.start = s.u32()
    elif sid == 9:
        m.elems = [_elem(s) for _ in range(s.count())]
    elif sid == 12:
        m.data_count = s.u32()
    elif sid == 10:
        m.codes = [_code(s) for _ in range(s.count())]
    elif sid == 11:
        m.datas = [_data(s) for _ in range(s.count())]
