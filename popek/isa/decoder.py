"""The decoder, generated from the instruction declarations.

Candidates are grouped by the bits every pattern of their group fixes (the major
opcode, and the funct3 and funct7 fields where all of the opcode's patterns fix them;
a compressed instruction's quadrant and funct3), and the most specific pattern that
matches wins. Each distinct instruction is decoded once (results are cached by its
bits, and shared): a Linux boot meets ~35,000 distinct ones, so a miss's cost is part
of every cold block's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

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


class Decoded(NamedTuple):
    """One decoded instruction: what the engines and the disassembler consume. Immutable
    (one is shared by every block holding the same bits) and a tuple, which is built
    three times faster than a frozen dataclass."""

    insn: Insn
    rd: int
    rs1: int
    rs2: int
    imm: int
    length: int
    word: int
    compressed: CInsn | None = None


Candidate = tuple[int, int, Insn | CInsn]  # (mask, match, instruction)


def _grouped(candidates: Sequence[Insn | CInsn]) -> tuple[int, dict[int, list[Candidate]]]:
    """The bits all ``candidates`` fix, and the candidates by those bits' values, most
    specific first."""
    key = -1
    for c in candidates:
        key &= c.mask
    groups: dict[int, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: -bin(c.mask).count("1")):
        groups.setdefault(c.match & key, []).append((c.mask, c.match, c))
    return key, groups


def _by_opcode(insns: list[Insn]) -> dict[int, tuple[int, dict[int, list[Candidate]]]]:
    opcodes: dict[int, list[Insn]] = {}
    for ins in insns:
        opcodes.setdefault(ins.match & 0x7F, []).append(ins)
    return {opcode: _grouped(candidates) for opcode, candidates in opcodes.items()}


_TABLE = _by_opcode(ALL_INSNS)
_CKEY, _CTABLE = _grouped(CINSNS)
_NO_GROUP: tuple[int, dict[int, list[Candidate]]] = (0, {})


def _with_sink(ins: Insn, rd: int, rs1: int, rs2: int, imm: int, length: int, word: int,
               c: CInsn | None = None) -> Decoded:
    if rd == 0 and "rd_is_fp" not in ins.flags:
        rd = X_SINK
    return Decoded(ins, rd, rs1, rs2, imm, length, word, c)


@cache
def decode32(word: int) -> Decoded | None:
    """Decode a 32-bit instruction; ``None`` means an illegal encoding."""
    key, groups = _TABLE.get(word & 0x7F, _NO_GROUP)
    for mask, match, ins in groups.get(word & key, ()):
        if word & mask == match:
            rd, rs1, rs2, imm = ins.operands(word)
            return _with_sink(ins, rd, rs1, rs2, imm, 4, word)
    return None


@cache
def decode16(half: int) -> Decoded | None:
    """Decode a compressed instruction into its base instruction; ``None`` if illegal."""
    for mask, match, c in _CTABLE.get(half & _CKEY, ()):
        if half & mask == match:
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
