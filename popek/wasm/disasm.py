"""``popek wasm disasm``: the code section in the text format, as ``wasm2wat`` prints it.

Functions are printed unfolded (one instruction a line), with wasm2wat's numbering
comments (or the names of a "name" section), label annotations and number syntax, so the
two outputs can be compared.
"""

from __future__ import annotations

from collections.abc import Iterator

from popek.wasm import numeric
from popek.wasm.binary import Instr, Module
from popek.wasm.isa import Op

_NATURAL_ALIGN = {1: 0, 2: 1, 4: 2, 8: 3}
_NAMED = {"call": 1, "func": 1, "global": 7}  # immediates wasm2wat names: name map used


def float_text(bits: int, width: int) -> str:
    """A float as wasm2wat writes it: hexadecimal, ``inf`` or ``nan:0x...``."""
    exp_bits, frac_bits = (8, 23) if width == 32 else (11, 52)
    sign = "-" if bits >> (width - 1) else ""
    exp = (bits >> frac_bits) & ((1 << exp_bits) - 1)
    frac = bits & ((1 << frac_bits) - 1)
    if exp == (1 << exp_bits) - 1:
        if frac == 0:
            return f"{sign}inf"
        if frac == 1 << (frac_bits - 1):
            return f"{sign}nan"
        return f"{sign}nan:{frac:#x}"
    if exp == 0 and frac == 0:
        return f"{sign}0x0p+0"
    bias = (1 << (exp_bits - 1)) - 1
    point = ""
    if exp == 0:  # subnormal: normalized, and wabt keeps the point of 0x1.p-149
        shift = frac_bits - frac.bit_length() + 1
        frac = (frac << shift) & ((1 << frac_bits) - 1)
        e = 1 - bias - shift
        point = "."
    else:
        e = exp - bias
    digits = (frac_bits + 3) // 4
    hex_frac = f"{frac << (4 * digits - frac_bits):0{digits}x}".rstrip("0")
    return f"{sign}0x1{'.' + hex_frac if hex_frac else point}p{e:+d}"


def float_comment(bits: int, width: int) -> str:
    """wasm2wat's decimal note after a float constant (C's %g)."""
    value = numeric.f32(bits) if width == 32 else numeric.f64(bits)
    sign = "-" if bits >> (width - 1) else ""
    return f" (;={sign}{abs(value):g};)"


def _signed(v: int, bits: int) -> int:
    return v - (1 << bits) if v >> (bits - 1) else v


def _blocktype(module: Module, bt: object) -> str:
    if bt is None:
        return ""
    if isinstance(bt, str):
        return f" (result {bt})"
    t = module.types[bt] if bt < len(module.types) else None
    text = ""
    if t is not None:
        if t.params:
            text += f" (param {' '.join(t.params)})"
        if t.results:
            text += f" (result {' '.join(t.results)})"
    return text


def _immediate(op: Op, imm: object, depth: int,  # noqa: C901 - one case per kind
               names: dict[int, dict[int, str]]) -> str:
    kind = op.imm
    if kind in _NAMED:
        named = names.get(_NAMED[kind], {})
        return f" ${named[imm]}" if imm in named else f" {imm}"
    if kind in ("none", "mem", "mem2"):
        return ""
    if kind == "i32":
        return f" {_signed(imm, 32)}"
    if kind == "i64":
        return f" {_signed(imm, 64)}"
    if kind in ("f32", "f64"):
        width = int(kind[1:])
        return f" {float_text(imm, width)}{float_comment(imm, width)}"
    if kind == "label":
        return f" {imm} (;@{depth - imm};)"
    if kind == "labels":
        labels, default = imm
        return "".join(f" {n} (;@{depth - n};)" for n in (*labels, default))
    if kind == "memarg":
        align, offset = imm
        text = f" offset={offset}" if offset else ""
        if align != _NATURAL_ALIGN[op.size]:
            text += f" align={1 << align}"
        return text
    if kind == "call_indirect":
        typeidx, table = imm
        return f"{f' {table}' if table else ''} (type {typeidx})"
    if kind == "reftype":
        return " func" if imm == "funcref" else " extern"
    if kind == "valtypes":
        return f" (result {' '.join(imm)})"
    if kind == "data":
        return f" {imm[0]}"
    if kind == "table2":
        return f" {imm[0]} {imm[1]}" if imm[0] or imm[1] else ""
    if kind == "elem_table":
        return f" {imm[1]} {imm[0]}" if imm[1] else f" {imm[0]}"
    return f" {imm}"


def function_lines(module: Module, body: list[Instr]) -> Iterator[str]:
    depth = 0
    for op, imm in body[:-1]:  # the final end closes the function
        if op.name in ("end", "else"):
            indent = "  " * (depth + 1)
            if op.name == "end":
                depth -= 1
            yield f"{indent}{op.name}"
            continue
        indent = "  " * (depth + 2)
        if op.imm == "blocktype":
            depth += 1
            yield f"{indent}{op.name}{_blocktype(module, imm)}  ;; label = @{depth}"
        else:
            yield f"{indent}{op.name}{_immediate(op, imm, depth, module.names)}"


def disassemble(module: Module) -> Iterator[str]:
    """The text of every defined function, numbered after the imported ones."""
    first = len(module.imported("func"))
    for i, (typeidx, code) in enumerate(zip(module.funcs, module.codes, strict=True)):
        t = module.types[typeidx]
        name = module.names.get(1, {}).get(first + i)
        head = f"  (func {f'${name}' if name else f'(;{first + i};)'} (type {typeidx})"
        if t.params:
            head += f" (param {' '.join(t.params)})"
        if t.results:
            head += f" (result {' '.join(t.results)})"
        lines = list(function_lines(module, code.body))
        if code.locals:
            lines.insert(0, f"    (local {' '.join(code.locals)})")
        if not lines:
            yield head + ")"
            continue
        yield head
        yield from lines[:-1]
        yield lines[-1] + ")"
