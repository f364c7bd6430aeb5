"""The one declaration of WebAssembly instructions that the decoder, validator, disassembler
and every execution tier are derived from (as :mod:`popek.isa.spec` is for RISC-V).

Each :class:`Op` names its opcode, the kind of immediate that follows it in the binary
format, its operand signature and its semantics:

- ``sig`` is ``"PARAMS -> RESULTS"`` over value types; ``t`` stands for a type the
  validator takes from the immediate or the operand (``local.get``, ``select``, ...).
  Control instructions (``kind == "control"``) have no fixed signature: the validator
  types them and each tier implements them, since they shape the code rather than compute.
- ``sem`` is Python over the popped operands ``a``, ``b``, ``c`` (first-pushed first): an
  expression giving the one result, or a statement when there is none (or, for
  ``kind == "keep"``, a statement after which ``a`` stays as the result). Names it may use:
  those of :mod:`popek.wasm.numeric` and the immediate's bound names (:data:`IMM_NAMES`).
- ``traps`` marks semantics that may trap, which a tier must not reorder or drop.
- Loads and stores declare their access ``size``; a tier checks ``ea = a + off`` against
  the memory and performs the access, after which a load's ``sem`` maps the loaded
  unsigned value ``v`` to the result and a store writes ``b``'s low bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# The names each kind of immediate binds when a function is instantiated, in order: a tier
# passes the bound immediate (one object, or a tuple of several) to the semantics.
IMM_NAMES: dict[str, tuple[str, ...]] = {
    "none": (), "i32": ("imm",), "i64": ("imm",), "f32": ("imm",), "f64": ("imm",),
    "local": ("idx",), "global": ("G",), "memarg": ("M", "off"), "mem": ("MEM",),
    "mem2": ("MEM",), "data": ("MEM", "SEG"), "dataidx": ("SEG",), "table": ("T",),
    "table2": ("T", "T2"), "elem_table": ("SEG", "T"), "elemidx": ("SEG",), "func": ("FN",),
    "reftype": (), "valtypes": (),
    # Control immediates: resolved by the validator, used by the tiers directly.
    "blocktype": (), "label": (), "labels": (), "call": (), "call_indirect": (),
}


@dataclass(frozen=True, eq=False)  # each op is unique: hashed by identity, cheaply
class Op:
    code: int  # one byte, or 0xFC00 | sub-opcode for the 0xFC prefix
    name: str
    imm: str
    sig: str
    sem: str = ""
    kind: str = "compute"  # compute, keep, load, store, control
    size: int = 0
    traps: bool = False  # the semantics may raise a trap (beyond the memory bounds check)

    @cached_property
    def params(self) -> tuple[str, ...]:
        return tuple(self.sig.split("->")[0].split())

    @cached_property
    def results(self) -> tuple[str, ...]:
        return tuple(self.sig.split("->")[1].split())

    @cached_property
    def reversed_params(self) -> tuple[str, ...]:
        return self.params[::-1]


OPS: list[Op] = []


def _op(code: int, name: str, imm: str, sig: str, sem: str = "", kind: str = "compute",
        size: int = 0, traps: bool = False) -> None:
    OPS.append(Op(code, name, imm, sig, sem, kind, size, traps))


def _control(code: int, name: str, imm: str = "none") -> None:
    _op(code, name, imm, "->", kind="control")


# --- control ----------------------------------------------------------------------------
_control(0x00, "unreachable")
_op(0x01, "nop", "none", "->", "None")
_control(0x02, "block", "blocktype")
_control(0x03, "loop", "blocktype")
_control(0x04, "if", "blocktype")
_control(0x05, "else")
_control(0x0B, "end")
_control(0x0C, "br", "label")
_control(0x0D, "br_if", "label")
_control(0x0E, "br_table", "labels")
_control(0x0F, "return")
_control(0x10, "call", "call")
_control(0x11, "call_indirect", "call_indirect")

# --- parametric and variable ------------------------------------------------------------
_op(0x1A, "drop", "none", "t ->", "None")
_op(0x1B, "select", "none", "t t i32 -> t", "a if c else b")
_op(0x1C, "select", "valtypes", "t t i32 -> t", "a if c else b")
_op(0x20, "local.get", "local", "-> t", "L[idx]")
_op(0x21, "local.set", "local", "t ->", "L[idx] = a")
_op(0x22, "local.tee", "local", "t -> t", "L[idx] = a", "keep")
_op(0x23, "global.get", "global", "-> t", "G.value")
_op(0x24, "global.set", "global", "t ->", "G.value = a")
_op(0x25, "table.get", "table", "i32 -> t", "table_get(T, a)")
_op(0x26, "table.set", "table", "i32 t ->", "table_set(T, a, b)")

# --- memory -----------------------------------------------------------------------------
for _code, _name, _t, _size, _sem in [
    (0x28, "i32.load", "i32", 4, "v"), (0x29, "i64.load", "i64", 8, "v"),
    (0x2A, "f32.load", "f32", 4, "v"), (0x2B, "f64.load", "f64", 8, "v"),
    (0x2C, "i32.load8_s", "i32", 1, "sext(v, 8, M32)"), (0x2D, "i32.load8_u", "i32", 1, "v"),
    (0x2E, "i32.load16_s", "i32", 2, "sext(v, 16, M32)"),
    (0x2F, "i32.load16_u", "i32", 2, "v"),
    (0x30, "i64.load8_s", "i64", 1, "sext(v, 8, M64)"), (0x31, "i64.load8_u", "i64", 1, "v"),
    (0x32, "i64.load16_s", "i64", 2, "sext(v, 16, M64)"),
    (0x33, "i64.load16_u", "i64", 2, "v"),
    (0x34, "i64.load32_s", "i64", 4, "sext(v, 32, M64)"),
    (0x35, "i64.load32_u", "i64", 4, "v"),
]:
    _op(_code, _name, "memarg", f"i32 -> {_t}", _sem, "load", _size)
for _code, _name, _t, _size in [
    (0x36, "i32.store", "i32", 4), (0x37, "i64.store", "i64", 8), (0x38, "f32.store", "f32", 4),
    (0x39, "f64.store", "f64", 8), (0x3A, "i32.store8", "i32", 1),
    (0x3B, "i32.store16", "i32", 2), (0x3C, "i64.store8", "i64", 1),
    (0x3D, "i64.store16", "i64", 2), (0x3E, "i64.store32", "i64", 4),
]:
    _op(_code, _name, "memarg", f"i32 {_t} ->", "", "store", _size)
_op(0x3F, "memory.size", "mem", "-> i32", "MEM.pages")
_op(0x40, "memory.grow", "mem", "i32 -> i32", "MEM.grow(a) & M32")

# --- constants and references -----------------------------------------------------------
_op(0x41, "i32.const", "i32", "-> i32", "imm")
_op(0x42, "i64.const", "i64", "-> i64", "imm")
_op(0x43, "f32.const", "f32", "-> f32", "imm")
_op(0x44, "f64.const", "f64", "-> f64", "imm")
_op(0xD0, "ref.null", "reftype", "-> t", "None")
_op(0xD1, "ref.is_null", "none", "t -> i32", "int(a is None)")
_op(0xD2, "ref.func", "func", "-> funcref", "FN")


# --- numeric ----------------------------------------------------------------------------
def _int_ops(t: str, base_test: int, base_arith: int, bits: int) -> None:
    m = "M32" if bits == 32 else "M64"
    s = "S32" if bits == 32 else "S64"
    _op(base_test, f"{t}.eqz", "none", f"{t} -> i32", "int(a == 0)")
    for i, (name, sem) in enumerate([
        ("eq", "a == b"), ("ne", "a != b"), ("lt_s", f"(a ^ {s}) < (b ^ {s})"),
        ("lt_u", "a < b"), ("gt_s", f"(a ^ {s}) > (b ^ {s})"), ("gt_u", "a > b"),
        ("le_s", f"(a ^ {s}) <= (b ^ {s})"), ("le_u", "a <= b"),
        ("ge_s", f"(a ^ {s}) >= (b ^ {s})"), ("ge_u", "a >= b"),
    ]):
        _op(base_test + 1 + i, f"{t}.{name}", "none", f"{t} {t} -> i32", f"int({sem})")
    for i, (name, sem) in enumerate([
        ("clz", f"{bits} - a.bit_length()"), ("ctz", f"ctz(a, {bits})"),
        ("popcnt", "a.bit_count()"),
    ]):
        _op(base_arith + i, f"{t}.{name}", "none", f"{t} -> {t}", sem)
    for i, (name, sem) in enumerate([
        ("add", f"(a + b) & {m}"), ("sub", f"(a - b) & {m}"), ("mul", f"(a * b) & {m}"),
        ("div_s", f"div_s(a, b, {bits})"), ("div_u", "div_u(a, b)"),
        ("rem_s", f"rem_s(a, b, {bits})"), ("rem_u", "rem_u(a, b)"),
        ("and", "a & b"), ("or", "a | b"), ("xor", "a ^ b"),
        ("shl", f"(a << (b & {bits - 1})) & {m}"),
        ("shr_s", f"(((a ^ {s}) - {s}) >> (b & {bits - 1})) & {m}"),
        ("shr_u", f"a >> (b & {bits - 1})"),
        ("rotl", f"rotl(a, b, {bits}, {m})"),
        ("rotr", f"rotl(a, {bits} - (b & {bits - 1}), {bits}, {m})"),
    ]):
        _op(base_arith + 3 + i, f"{t}.{name}", "none", f"{t} {t} -> {t}", sem,
            traps=name[:3] in ("div", "rem"))


def _float_ops(t: str, base_test: int, base_arith: int) -> None:
    un, pk = ("f32", "b32") if t == "f32" else ("f64", "b64")
    sign = "S32" if t == "f32" else "S64"
    for i, (name, op) in enumerate([("eq", "=="), ("ne", "!="), ("lt", "<"), ("gt", ">"),
                                    ("le", "<="), ("ge", ">=")]):
        _op(base_test + i, f"{t}.{name}", "none", f"{t} {t} -> i32",
            f"int({un}(a) {op} {un}(b))")
    for i, (name, sem) in enumerate([
        ("abs", f"a & ~{sign}"), ("neg", f"a ^ {sign}"), ("ceil", f"{t}_ceil(a)"),
        ("floor", f"{t}_floor(a)"), ("trunc", f"{t}_trunc(a)"), ("nearest", f"{t}_nearest(a)"),
        ("sqrt", f"{pk}(fsqrt({un}(a)))"),
    ]):
        _op(base_arith + i, f"{t}.{name}", "none", f"{t} -> {t}", sem)
    for i, (name, sem) in enumerate([
        ("add", f"{pk}({un}(a) + {un}(b))"), ("sub", f"{pk}({un}(a) - {un}(b))"),
        ("mul", f"{pk}({un}(a) * {un}(b))"), ("div", f"{pk}(fdiv({un}(a), {un}(b)))"),
        ("min", f"{t}_min(a, b)"), ("max", f"{t}_max(a, b)"),
        ("copysign", f"(a & ~{sign}) | (b & {sign})"),
    ]):
        _op(base_arith + 7 + i, f"{t}.{name}", "none", f"{t} {t} -> {t}", sem)


_int_ops("i32", 0x45, 0x67, 32)
_int_ops("i64", 0x50, 0x79, 64)
_float_ops("f32", 0x5B, 0x8B)
_float_ops("f64", 0x61, 0x99)

_I32_RANGE = {"s": "-0x80000000, 0x7FFFFFFF", "u": "0, 0xFFFFFFFF"}
_I64_RANGE = {"s": "-0x8000000000000000, 0x7FFFFFFFFFFFFFFF", "u": "0, 0xFFFFFFFFFFFFFFFF"}
for _code, _name, _sig, _sem in [
    (0xA7, "i32.wrap_i64", "i64 -> i32", "a & M32"),
    *[(0xA8 + i, f"i32.trunc_{f}_{s}", f"{f} -> i32", f"trunc({f}(a), {_I32_RANGE[s]}, M32)")
      for i, (f, s) in enumerate([("f32", "s"), ("f32", "u"), ("f64", "s"), ("f64", "u")])],
    (0xAC, "i64.extend_i32_s", "i32 -> i64", "sext(a, 32, M64)"),
    (0xAD, "i64.extend_i32_u", "i32 -> i64", "a"),
    *[(0xAE + i, f"i64.trunc_{f}_{s}", f"{f} -> i64", f"trunc({f}(a), {_I64_RANGE[s]}, M64)")
      for i, (f, s) in enumerate([("f32", "s"), ("f32", "u"), ("f64", "s"), ("f64", "u")])],
    (0xB2, "f32.convert_i32_s", "i32 -> f32", "b32(float(s32(a)))"),
    (0xB3, "f32.convert_i32_u", "i32 -> f32", "b32(float(a))"),
    (0xB4, "f32.convert_i64_s", "i64 -> f32", "int_to_f32(s64(a))"),
    (0xB5, "f32.convert_i64_u", "i64 -> f32", "int_to_f32(a)"),
    (0xB6, "f32.demote_f64", "f64 -> f32", "b32(f64(a))"),
    (0xB7, "f64.convert_i32_s", "i32 -> f64", "b64(float(s32(a)))"),
    (0xB8, "f64.convert_i32_u", "i32 -> f64", "b64(float(a))"),
    (0xB9, "f64.convert_i64_s", "i64 -> f64", "b64(float(s64(a)))"),
    (0xBA, "f64.convert_i64_u", "i64 -> f64", "b64(float(a))"),
    (0xBB, "f64.promote_f32", "f32 -> f64", "b64(f32(a))"),
    (0xBC, "i32.reinterpret_f32", "f32 -> i32", "a"),
    (0xBD, "i64.reinterpret_f64", "f64 -> i64", "a"),
    (0xBE, "f32.reinterpret_i32", "i32 -> f32", "a"),
    (0xBF, "f64.reinterpret_i64", "i64 -> f64", "a"),
    (0xC0, "i32.extend8_s", "i32 -> i32", "sext(a, 8, M32)"),
    (0xC1, "i32.extend16_s", "i32 -> i32", "sext(a, 16, M32)"),
    (0xC2, "i64.extend8_s", "i64 -> i64", "sext(a, 8, M64)"),
    (0xC3, "i64.extend16_s", "i64 -> i64", "sext(a, 16, M64)"),
    (0xC4, "i64.extend32_s", "i64 -> i64", "sext(a, 32, M64)"),
    *[(0xFC00 + i, f"{t}.trunc_sat_{f}_{s}", f"{f} -> {t}",
       f"trunc_sat({f}(a), {(_I32_RANGE if t == 'i32' else _I64_RANGE)[s]}, "
       f"{'M32' if t == 'i32' else 'M64'})")
      for i, (t, f, s) in enumerate([(t, f, s) for t in ("i32", "i64") for f in ("f32", "f64")
                                     for s in ("s", "u")])],
]:
    _op(_code, _name, "none", _sig, _sem, traps=_sem.startswith("trunc("))

# --- bulk memory and tables -------------------------------------------------------------
_op(0xFC08, "memory.init", "data", "i32 i32 i32 ->", "memory_init(MEM, SEG, a, b, c)")
_op(0xFC09, "data.drop", "dataidx", "->", "SEG.drop()")
_op(0xFC0A, "memory.copy", "mem2", "i32 i32 i32 ->", "memory_copy(MEM, a, b, c)")
_op(0xFC0B, "memory.fill", "mem", "i32 i32 i32 ->", "memory_fill(MEM, a, b, c)")
_op(0xFC0C, "table.init", "elem_table", "i32 i32 i32 ->", "table_init(T, SEG, a, b, c)")
_op(0xFC0D, "elem.drop", "elemidx", "->", "SEG.drop()")
_op(0xFC0E, "table.copy", "table2", "i32 i32 i32 ->", "table_copy(T, T2, a, b, c)")
_op(0xFC0F, "table.grow", "table", "t i32 -> i32", "T.grow(b, a) & M32")
_op(0xFC10, "table.size", "table", "-> i32", "len(T.elements)")
_op(0xFC11, "table.fill", "table", "i32 t i32 ->", "table_fill(T, a, b, c)")

BY_CODE: dict[int, Op] = {o.code: o for o in OPS}
