"""RV64C: each compressed instruction is declared as its 16-bit pattern and its expansion.

The expansion names the base instruction it stands for and that instruction's
operands, so the compressed form shares the base semantics (and every tier derived
from them); only the instruction length differs. An expansion returns ``None`` for a
reserved encoding, which decodes as an illegal instruction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

Expansion = tuple[str, int, int, int, int]  # base name, rd, rs1, rs2, imm


def _b(w: int, hi: int, lo: int) -> int:
    return (w >> lo) & ((1 << (hi - lo + 1)) - 1)


def _sext(v: int, bits: int) -> int:
    s = 1 << (bits - 1)
    return (v ^ s) - s


def _r(w: int, lo: int) -> int:
    """A 3-bit compressed register field names x8..x15."""
    return 8 + _b(w, lo + 2, lo)


def _ci_imm(w: int) -> int:
    return _sext((_b(w, 12, 12) << 5) | _b(w, 6, 2), 6)


def _cl_w(w: int) -> int:  # c.lw / c.sw offset
    return (_b(w, 12, 10) << 3) | (_b(w, 6, 6) << 2) | (_b(w, 5, 5) << 6)


def _cl_d(w: int) -> int:  # c.ld / c.sd / c.fld / c.fsd offset
    return (_b(w, 12, 10) << 3) | (_b(w, 6, 5) << 6)


def _cj(w: int) -> int:
    return _sext(
        (_b(w, 12, 12) << 11) | (_b(w, 11, 11) << 4) | (_b(w, 10, 9) << 8) | (_b(w, 8, 8) << 10)
        | (_b(w, 7, 7) << 6) | (_b(w, 6, 6) << 7) | (_b(w, 5, 3) << 1) | (_b(w, 2, 2) << 5),
        12,
    )


def _cb(w: int) -> int:
    return _sext(
        (_b(w, 12, 12) << 8) | (_b(w, 11, 10) << 3) | (_b(w, 6, 5) << 6) | (_b(w, 4, 3) << 1)
        | (_b(w, 2, 2) << 5),
        9,
    )


def _addi4spn(w: int) -> Expansion | None:
    imm = (_b(w, 12, 11) << 4) | (_b(w, 10, 7) << 6) | (_b(w, 6, 6) << 2) | (_b(w, 5, 5) << 3)
    return ("addi", _r(w, 2), 2, 0, imm) if imm else None


def _addiw(w: int) -> Expansion | None:
    rd = _b(w, 11, 7)
    return ("addiw", rd, rd, 0, _ci_imm(w)) if rd else None


def _lui_addi16sp(w: int) -> Expansion | None:
    rd = _b(w, 11, 7)
    if rd == 2:
        imm = _sext(
            (_b(w, 12, 12) << 9) | (_b(w, 6, 6) << 4) | (_b(w, 5, 5) << 6) | (_b(w, 4, 3) << 7)
            | (_b(w, 2, 2) << 5),
            10,
        )
        return ("addi", 2, 2, 0, imm) if imm else None
    imm = _ci_imm(w) << 12
    return ("lui", rd, 0, 0, imm) if imm else None


def _shift_imm(name: str) -> Callable[[int], Expansion]:
    def expand(w: int) -> Expansion:
        rd = _r(w, 7)
        return (name, rd, rd, 0, (_b(w, 12, 12) << 5) | _b(w, 6, 2))

    return expand


def _arith(name: str) -> Callable[[int], Expansion]:
    def expand(w: int) -> Expansion:
        rd = _r(w, 7)
        return (name, rd, rd, _r(w, 2), 0)

    return expand


def _lwsp(w: int) -> Expansion | None:
    rd = _b(w, 11, 7)
    imm = (_b(w, 12, 12) << 5) | (_b(w, 6, 4) << 2) | (_b(w, 3, 2) << 6)
    return ("lw", rd, 2, 0, imm) if rd else None


def _ldsp_imm(w: int) -> int:
    return (_b(w, 12, 12) << 5) | (_b(w, 6, 5) << 3) | (_b(w, 4, 2) << 6)


def _ldsp(w: int) -> Expansion | None:
    rd = _b(w, 11, 7)
    return ("ld", rd, 2, 0, _ldsp_imm(w)) if rd else None


def _cr(w: int) -> Expansion | None:
    rd, rs2 = _b(w, 11, 7), _b(w, 6, 2)
    if not _b(w, 12, 12):
        if rs2:
            return ("add", rd, 0, rs2, 0)  # c.mv
        return ("jalr", 0, rd, 0, 0) if rd else None  # c.jr
    if rs2:
        return ("add", rd, rd, rs2, 0)  # c.add
    return ("jalr", 1, rd, 0, 0) if rd else ("ebreak", 0, 0, 0, 0)  # c.jalr / c.ebreak


def _swsp_imm(w: int) -> int:
    return (_b(w, 12, 9) << 2) | (_b(w, 8, 7) << 6)


def _sdsp_imm(w: int) -> int:
    return (_b(w, 12, 10) << 3) | (_b(w, 9, 7) << 6)


@dataclass(frozen=True)
class CInsn:
    """A compressed instruction: 16-bit pattern (MSB first, ``.`` = any) and its expansion."""

    name: str
    pattern: str
    expand: Callable[[int], Expansion | None]

    @cached_property
    def mask(self) -> int:
        bits = self.pattern.replace(" ", "")
        return int("".join("0" if c == "." else "1" for c in bits), 2)

    @cached_property
    def match(self) -> int:
        return int(self.pattern.replace(" ", "").replace(".", "0"), 2)


CINSNS = [
    # Quadrant 0.
    CInsn("c.addi4spn", "000 ........ ... 00", _addi4spn),
    CInsn("c.fld", "001 ... ... .. ... 00",
          lambda w: ("fld", _r(w, 2), _r(w, 7), 0, _cl_d(w))),
    CInsn("c.lw", "010 ... ... .. ... 00", lambda w: ("lw", _r(w, 2), _r(w, 7), 0, _cl_w(w))),
    CInsn("c.ld", "011 ... ... .. ... 00", lambda w: ("ld", _r(w, 2), _r(w, 7), 0, _cl_d(w))),
    CInsn("c.fsd", "101 ... ... .. ... 00",
          lambda w: ("fsd", 0, _r(w, 7), _r(w, 2), _cl_d(w))),
    CInsn("c.sw", "110 ... ... .. ... 00", lambda w: ("sw", 0, _r(w, 7), _r(w, 2), _cl_w(w))),
    CInsn("c.sd", "111 ... ... .. ... 00", lambda w: ("sd", 0, _r(w, 7), _r(w, 2), _cl_d(w))),
    # Quadrant 1.
    CInsn("c.addi", "000 . ..... ..... 01",
          lambda w: ("addi", _b(w, 11, 7), _b(w, 11, 7), 0, _ci_imm(w))),
    CInsn("c.addiw", "001 . ..... ..... 01", _addiw),
    CInsn("c.li", "010 . ..... ..... 01", lambda w: ("addi", _b(w, 11, 7), 0, 0, _ci_imm(w))),
    CInsn("c.lui", "011 . ..... ..... 01", _lui_addi16sp),
    CInsn("c.srli", "100 . 00 ... ..... 01", _shift_imm("srli")),
    CInsn("c.srai", "100 . 01 ... ..... 01", _shift_imm("srai")),
    CInsn("c.andi", "100 . 10 ... ..... 01",
          lambda w: ("andi", _r(w, 7), _r(w, 7), 0, _ci_imm(w))),
    CInsn("c.sub", "100 0 11 ... 00 ... 01", _arith("sub")),
    CInsn("c.xor", "100 0 11 ... 01 ... 01", _arith("xor")),
    CInsn("c.or", "100 0 11 ... 10 ... 01", _arith("or")),
    CInsn("c.and", "100 0 11 ... 11 ... 01", _arith("and")),
    CInsn("c.subw", "100 1 11 ... 00 ... 01", _arith("subw")),
    CInsn("c.addw", "100 1 11 ... 01 ... 01", _arith("addw")),
    CInsn("c.j", "101 ........... 01", lambda w: ("jal", 0, 0, 0, _cj(w))),
    CInsn("c.beqz", "110 ... ... ..... 01", lambda w: ("beq", 0, _r(w, 7), 0, _cb(w))),
    CInsn("c.bnez", "111 ... ... ..... 01", lambda w: ("bne", 0, _r(w, 7), 0, _cb(w))),
    # Quadrant 2.
    CInsn("c.slli", "000 . ..... ..... 10",
          lambda w: ("slli", _b(w, 11, 7), _b(w, 11, 7), 0, (_b(w, 12, 12) << 5) | _b(w, 6, 2))),
    CInsn("c.fldsp", "001 . ..... ..... 10",
          lambda w: ("fld", _b(w, 11, 7), 2, 0, _ldsp_imm(w))),
    CInsn("c.lwsp", "010 . ..... ..... 10", _lwsp),
    CInsn("c.ldsp", "011 . ..... ..... 10", _ldsp),
    CInsn("c.cr", "100 . ..... ..... 10", _cr),
    CInsn("c.fsdsp", "101 ...... ..... 10",
          lambda w: ("fsd", 0, 2, _b(w, 6, 2), _sdsp_imm(w))),
    CInsn("c.swsp", "110 ...... ..... 10", lambda w: ("sw", 0, 2, _b(w, 6, 2), _swsp_imm(w))),
    CInsn("c.sdsp", "111 ...... ..... 10", lambda w: ("sd", 0, 2, _b(w, 6, 2), _sdsp_imm(w))),
]
