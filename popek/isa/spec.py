"""The one declaration of RISC-V instructions that every tier is derived from.

Each :class:`Insn` names an encoding (a bit pattern), how its operand fields are
extracted (a format), how it is written in assembly, and its semantics as a few
lines of Python. The decoder is generated from the patterns, the interpreter and
the block translator from the semantics, and the disassembler from the syntax.

Semantics are Python statements over a fixed vocabulary, so a tier can specialize
them by substitution (for example a translator replaces ``X[rs1]`` by a local):

- ``pc`` the instruction's address; ``rd``, ``rs1``, ``rs2``, ``imm`` the decoded operands
  (a format may pack more into ``imm``, e.g. ``rs3`` and ``rm`` for fused multiply-add);
- ``X`` integer registers (writes to x0 land in a sink slot), ``F`` raw FP register
  bits, ``C`` CSR storage, ``hart`` the hart for slow-path services;
- ``NEXT`` the address of the next instruction (``pc + 4`` or ``pc + 2``);
- memory: ``ld8/ld16/ld32/ld64(addr)`` (zero-extended) and ``st8..st64(addr, value)``;
- the names exported by :mod:`popek.isa.helpers`.

A semantics that transfers control ends in ``return <target>``; otherwise the
generator appends ``return NEXT``. Semantics raise :class:`~popek.cpu.causes.Trap`
before writing any state, so traps are precise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property


def _sext(value: int, bits: int) -> int:
    sign = 1 << (bits - 1)
    return (value ^ sign) - sign


def imm_i(w: int) -> int:
    return _sext(w >> 20, 12)


# (Fields are shifted out inline, without helper calls: a decoder miss, ~35,000 of which a
# Linux boot makes, is part of a cold block's cost.)
def imm_s(w: int) -> int:
    return _sext((w >> 20 & 0xFE0) | (w >> 7 & 0x1F), 12)


def imm_b(w: int) -> int:
    return _sext((w >> 19 & 0x1000) | (w << 4 & 0x800) | (w >> 20 & 0x7E0) | (w >> 7 & 0x1E),
                 13)


def imm_u(w: int) -> int:
    return _sext(w & 0xFFFFF000, 32)


def imm_j(w: int) -> int:
    return _sext((w >> 11 & 0x100000) | (w & 0xFF000) | (w >> 9 & 0x800) | (w >> 20 & 0x7FE),
                 21)


Operands = tuple[int, int, int, int]
"""(rd, rs1, rs2, imm) as the handler receives them."""

# How each format turns a 32-bit word into (rd, rs1, rs2, imm), inline as the immediates.
FORMATS: dict[str, Callable[[int], Operands]] = {
    "R": lambda w: (w >> 7 & 31, w >> 15 & 31, w >> 20 & 31, 0),
    "I": lambda w: (w >> 7 & 31, w >> 15 & 31, 0, imm_i(w)),
    "S": lambda w: (0, w >> 15 & 31, w >> 20 & 31, imm_s(w)),
    "B": lambda w: (0, w >> 15 & 31, w >> 20 & 31, imm_b(w)),
    "U": lambda w: (w >> 7 & 31, 0, 0, imm_u(w)),
    "J": lambda w: (w >> 7 & 31, 0, 0, imm_j(w)),
    "SH6": lambda w: (w >> 7 & 31, w >> 15 & 31, 0, w >> 20 & 63),
    "SH5": lambda w: (w >> 7 & 31, w >> 15 & 31, 0, w >> 20 & 31),
    "CSR": lambda w: (w >> 7 & 31, w >> 15 & 31, 0, w >> 20 & 0xFFF),
    # FP: imm carries the rounding-mode field.
    "RM": lambda w: (w >> 7 & 31, w >> 15 & 31, w >> 20 & 31, w >> 12 & 7),
    # Fused multiply-add: imm = rs3 | rm << 5.
    "R4": lambda w: (w >> 7 & 31, w >> 15 & 31, w >> 20 & 31, w >> 27 & 31 | (w >> 12 & 7) << 5),
    # Atomics: imm = aq << 1 | rl (ordering only; sequential harts need not act on it).
    "AMO": lambda w: (w >> 7 & 31, w >> 15 & 31, w >> 20 & 31, w >> 25 & 3),
    # fence: imm = fm << 8 | pred << 4 | succ.
    "FENCE": lambda w: (0, 0, 0, w >> 20 & 0xFFF),
    "NONE": lambda w: (0, 0, 0, 0),
}

# The values ``imm`` can take in each format (including compressed expansions into it), for
# tiers that compile one instruction for any operands and must bound their arithmetic.
IMM_RANGES: dict[str, tuple[int, int]] = {
    "R": (0, 0), "I": (-2048, 2047), "S": (-2048, 2047), "B": (-4096, 4094),
    "U": (-(1 << 31), (1 << 31) - 4096), "J": (-(1 << 20), (1 << 20) - 2),
    "SH6": (0, 63), "SH5": (0, 31), "CSR": (0, 4095), "RM": (0, 7), "R4": (0, 255),
    "AMO": (0, 3), "FENCE": (0, 4095), "NONE": (0, 0),
}

# Registers each format writes into X (so the decoder can send rd == 0 to the sink).
WRITES_X = frozenset({"R", "I", "U", "J", "SH6", "SH5", "CSR", "AMO"})


@dataclass(frozen=True)
class Insn:
    """One instruction: encoding, operand format, assembly syntax and semantics.

    ``pattern`` is 32 characters of ``0``, ``1`` or ``.`` (don't care), most
    significant bit first; spaces are ignored. ``asm`` is the operand syntax with
    ``{rd}``/``{rs1}``/``{rs2}`` (integer registers), ``{frd}``/``{frs1}``/``{frs2}``/
    ``{frs3}`` (FP registers), ``{imm}`` (signed decimal), ``{uimm}`` (upper immediate,
    ``imm >> 12``), ``{target}`` (``pc + imm``), ``{csr}``, ``{zimm}`` (``rs1`` as a number),
    ``{rm}`` (a rounding-mode suffix) and ``{aqrl}`` (a mnemonic suffix) placeholders.
    ``flags`` holds properties tiers care about:

    - ``ends_block``: control may not fall through, or state that decoding depends on may
      change (jumps, branches, system instructions);
    - ``system``: after it, the engine re-checks interrupts and mode (CSR writes, xRET...);
    - ``fp``: needs the FP unit enabled (mstatus.FS != Off); ``fp_write``: makes FS dirty;
    - ``rd_is_fp``: ``rd`` names an FP register, so x0 is a real destination;
    - ``load`` / ``store`` / ``amo``: touches memory.
    """

    name: str
    pattern: str
    fmt: str
    sem: str
    asm: str = ""
    ext: str = "I"
    flags: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def bits(self) -> str:
        return self.pattern.replace(" ", "")

    @cached_property
    def mask(self) -> int:
        return int("".join("0" if c == "." else "1" for c in self.bits), 2)

    @cached_property
    def match(self) -> int:
        return int(self.bits.replace(".", "0"), 2)

    def operands(self, word: int) -> Operands:
        return FORMATS[self.fmt](word)


def insn(
    name: str, pattern: str, fmt: str, sem: str, asm: str = "", ext: str = "I", flags: str = ""
) -> Insn:
    """Declare an instruction; ``flags`` is a space-separated list."""
    ins = Insn(name, pattern, fmt, sem.strip("\n"), asm, ext, frozenset(flags.split()))
    if len(ins.bits) != 32 or set(ins.bits) - set("01."):
        raise ValueError(f"{name}: pattern must be 32 bits of 0/1/.")
    if fmt not in FORMATS:
        raise ValueError(f"{name}: unknown format {fmt}")
    return ins
