"""Fuzz target: the instruction decoder, and the disassembler derived from it.

Guest code is arbitrary bytes. The input is read as the engine reads a block: a 16-bit
parcel, then 32 bits if its low bits say so. Every word must decode to an instruction
whose operands are in range, or to ``None`` (the illegal-instruction trap); the
disassembler must spell every parcel sequence objdump would take, including the lengths
the decoder does not know (48-bit and longer).
"""

from __future__ import annotations

from popek.cpu.state import X_SINK
from popek.isa import disasm
from popek.isa.decoder import decode, instruction_length
from popek.isa.disasm import Disassembler, parcel_length
from tests.fuzz.harness import Target

PC = 0x8020_0000
# The disassembler caches a plan per encoding it meets, which is bounded by the file it
# reads; here every input brings new encodings, so its cache is emptied now and then.
PLAN_CACHE_LIMIT = 1 << 16
EXTENSIONS = frozenset({"zihintpause", "zicsr", "zifencei"})


def one(data: bytes) -> None:
    # objdump's spelling of a few encodings depends on the file's extensions.
    dis = Disassembler(extensions=EXTENSIONS if len(data) % 2 else frozenset())
    off = 0
    while off + 2 <= len(data):
        half = int.from_bytes(data[off:off + 2], "little")
        length = parcel_length(half)
        if off + length > len(data):
            break
        check_word(dis, PC + off, int.from_bytes(data[off:off + length], "little"), length)
        off += length
    if disasm._word_plan.cache_info().currsize > PLAN_CACHE_LIMIT:
        disasm._word_plan.cache_clear()


def check_word(dis: Disassembler, pc: int, word: int, length: int) -> None:
    """``word`` (``length`` bytes at ``pc``) decodes sanely, and disassembles."""
    if length <= 4:
        _check_decoded(word)
    text = dis.format(pc, word, length)
    assert isinstance(text, str) and text, (hex(word), text)


def _check_decoded(word: int) -> None:
    d = decode(word)
    if d is None:
        return
    assert d.length == instruction_length(word & 0xFFFF), (hex(word), d)
    assert d.word == word & (0xFFFF_FFFF if d.length == 4 else 0xFFFF), (hex(word), d)
    assert 0 <= d.rd <= X_SINK and 0 <= d.rs1 < 32 and 0 <= d.rs2 < 32, (hex(word), d)
    assert isinstance(d.imm, int), (hex(word), d)


TARGET = Target(one=one, ci_runs=30_000, max_len=64)
