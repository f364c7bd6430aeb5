"""The decoder, generated from the instruction declarations.

Candidates are grouped by the bits every pattern of their group fixes (the major
opcode, and the funct3 and funct7 fields where all of the opcode's patterns fix them;
a compressed instruction's quadrant and funct3), and the most specific pattern that
matches wins. Each distinct instruction is decoded once (results are cached by its
bits, and shared): a Linux boot meets ~35,000 distinct ones, so a miss's cost is part
of every cold block's. The cache holds, beside each result, what block decoding asks of
it (its length and flags as the bits below), so the engine's loop over a new block's
instructions makes one dict lookup for each and tests ints, not frozensets of names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from popek.cpu.state import X_SINK
from popek.isa import rv64a, rv64b, rv64fd, rv64i, rv64m, system
from popek.isa.rv64c import CINSNS, CInsn
from popek.isa.spec import FORMATS, Insn

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

# What block decoding needs to know of an instruction (see Insn's flags), as bits.
NEEDS_FP = 1  # "fp"
SYSTEM = 2  # "system"
FP_WRITE = 4  # "fp_write"
ENDS_BLOCK = 8  # "ends_block"
Entry = tuple[Decoded | None, int, int]  # (decoded or None if illegal, length, flags)
# Every instruction decoded so far, by its bits (a compressed one's 16, whose low two bits
# are never 0b11, so no 32-bit instruction's bits are the same number).
ENTRIES: dict[int, Entry] = {}


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


def _flag_bits(flags: frozenset[str]) -> int:
    return (NEEDS_FP * ("fp" in flags) | SYSTEM * ("system" in flags)
            | FP_WRITE * ("fp_write" in flags) | ENDS_BLOCK * ("ends_block" in flags))


_FLAGS = {ins.name: _flag_bits(ins.flags) for ins in ALL_INSNS}
_new = tuple.__new__  # a Decoded without NamedTuple's __new__ (a Python call)


def _entry(ins: Insn, rd: int, rs1: int, rs2: int, imm: int, length: int, word: int,
           c: CInsn | None = None) -> Entry:
    if rd == 0 and "rd_is_fp" not in ins.flags:
        rd = X_SINK
    return _new(Decoded, (ins, rd, rs1, rs2, imm, length, word, c)), length, _FLAGS[ins.name]


def _decode32(word: int) -> Entry:
    key, groups = _TABLE.get(word & 0x7F, _NO_GROUP)
    for mask, match, ins in groups.get(word & key, ()):
        if word & mask == match:
            rd, rs1, rs2, imm = FORMATS[ins.fmt](word)
            return _entry(ins, rd, rs1, rs2, imm, 4, word)
    return None, 4, 0


def _decode16(half: int) -> Entry:
    for mask, match, c in _CTABLE.get(half & _CKEY, ()):
        if half & mask == match:
            expansion = c.expand(half)
            if expansion is None:
                break
            name, rd, rs1, rs2, imm = expansion
            ins = BY_NAME.get(name)
            if ins is None:
                break
            return _entry(ins, rd, rs1, rs2, imm, 2, half, c)
    return None, 2, 0


def entry(bits: int) -> Entry:
    """The instruction whose bits are ``bits`` (16 of them if compressed, else 32), its
    length and flags; callers look in ENTRIES first and come here on a miss."""
    found = ENTRIES.get(bits)
    if found is None:
        found = ENTRIES[bits] = _decode32(bits) if bits & 3 == 3 else _decode16(bits)
    return found


def decode32(word: int) -> Decoded | None:
    """Decode a 32-bit instruction; ``None`` means an illegal encoding."""
    return entry(word)[0] if word & 3 == 3 else None


def decode16(half: int) -> Decoded | None:
    """Decode a compressed instruction into its base instruction; ``None`` if illegal."""
    return entry(half)[0] if half & 3 != 3 else None


def instruction_length(low_half: int) -> int:
    """Length in bytes of the instruction whose first 16 bits are ``low_half``."""
    return 4 if low_half & 3 == 3 else 2


def decode(word: int) -> Decoded | None:
    """Decode the instruction at the start of ``word`` (at least its first 16/32 bits)."""
    if word & 3 == 3:
        return decode32(word & 0xFFFFFFFF)
    return decode16(word & 0xFFFF)
