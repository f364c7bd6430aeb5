"""The decoder, generated from the instruction declarations.

Decoding happens once per instruction per translated block, so it favours being
obviously derived from the declarations over raw speed: candidates are grouped by
major opcode and the most specific pattern that matches wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from popek.cpu.state import X_SINK
from popek.isa import rv64a, rv64b, rv64fd, rv64i, rv64m, system
from popek.isa.rv64c import CINSNS, CInsn
from popek.isa.spec import Insn

ALL_INSNS: list[Insn] = [
    *rv64i.INSNS,
    *rv64m.INSNS,
    *rv64b.INSNS,
    *rv64a.INSNS,
    *rv64fd.INSNS,
    *system.INSNS,
]
BY_NAME: dict[str, Insn] = {i.name: i for i in ALL_INSNS}


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded instruction: what the engines and the disassembler consume."""

    insn: Insn
    rd: int
    rs1: int
    rs2: int
    imm: int
    length: int
    word: int
    compressed: CInsn | None = None


def _by_opcode(insns: list[Insn]) -> dict[int, list[Insn]]:
    table: dict[int, list[Insn]] = {}
    for ins in insns:
        table.setdefault(ins.match & 0x7F, []).append(ins)
    for candidates in table.values():
        candidates.sort(key=lambda i: -bin(i.mask).count("1"))
    return table


_TABLE = _by_opcode(ALL_INSNS)
_CTABLE = sorted(CINSNS, key=lambda c: -bin(c.mask).count("1"))


def _with_sink(ins: Insn, rd: int, rs1: int, rs2: int, imm: int, length: int, word: int,
               c: CInsn | None = None) -> Decoded:
    if rd == 0 and "rd_is_fp" not in ins.flags:
        rd = X_SINK
    return Decoded(ins, rd, rs1, rs2, imm, length, word, c)


@cache
def decode32(word: int) -> Decoded | None:
    """Decode a 32-bit instruction; ``None`` means an illegal encoding."""
    for ins in _TABLE.get(word & 0x7F, ()):
        if word & ins.mask == ins.match:
            rd, rs1, rs2, imm = ins.operands(word)
            return _with_sink(ins, rd, rs1, rs2, imm, 4, word)
    return None


@cache
def decode16(half: int) -> Decoded | None:
    """Decode a compressed instruction into its base instruction; ``None`` if illegal."""
    for c in _CTABLE:
        if half & c.mask == c.match:
            expansion = c.expand(half)
            if expansion is None:
                return None
            name, rd, rs1, rs2, imm = expansion
            ins = BY_NAME.get(name)
            if ins is None:
                return None
            return _with_sink(ins, rd, rs1, rs2, imm, 2, half, c)
    return None


def instruction_length(low_half: int) -> int:
    """Length in bytes of the instruction whose first 16 bits are ``low_half``."""
    return 4 if low_half & 3 == 3 else 2


def decode(word: int) -> Decoded | None:
    """Decode the instruction at the start of ``word`` (at least its first 16/32 bits)."""
    if word & 3 == 3:
        return decode32(word & 0xFFFFFFFF)
    return decode16(word & 0xFFFF)
