"""Decoded code stays coherent with memory: writes to code drop it, writes beside it don't."""

from __future__ import annotations

import gc
import struct

import pytest

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.engine.engine import TIERS

BASE = 0x8000_0000
ADDI_A0_1 = 0x00150513  # addi a0, a0, 1
EBREAK = 0x00100073
WFI = 0x10500073
MCAUSE, MTVEC = 0x342, 0x305


def machine(tier: str) -> tuple[Hart, PhysicalMemory]:
    mem = PhysicalMemory(BASE, 1 << 16)
    hart = Hart(mem, engine=tier)
    mem.write(BASE + 0x800, struct.pack("<I", WFI))  # trap handler: wait
    hart.csr[MTVEC] = BASE + 0x800
    return hart, mem


def run_from(hart: Hart, pc: int) -> None:
    hart.pc = pc
    hart.ctl[2] = 0
    hart.run(1000)


@pytest.mark.parametrize("tier", TIERS)
def test_store_into_decoded_code_is_seen_next_time(tier: str) -> None:
    hart, mem = machine(tier)
    mem.write(BASE, struct.pack("<II", ADDI_A0_1, EBREAK))
    for _ in range(40):  # hot enough for tier 1 to translate it
        run_from(hart, BASE)
    before = hart.x[10]
    # The guest patches its own code with a store (sw), then runs it again.
    hart.x[5], hart.x[6] = BASE, 0x00250513  # addi a0, a0, 2
    mem.write(BASE + 0x100, struct.pack("<II", 0x0062A023, EBREAK))  # sw t1, 0(t0)
    run_from(hart, BASE + 0x100)
    run_from(hart, BASE)
    assert hart.x[10] == before + 2


@pytest.mark.parametrize("tier", TIERS)
def test_store_beside_code_keeps_it_and_lands(tier: str) -> None:
    hart, mem = machine(tier)
    # Code and a data word share a page; the loop stores to the data word each time.
    code = struct.pack("<III", 0x00A2A823, ADDI_A0_1, EBREAK)  # sw a0, 16(t0); addi; ebreak
    mem.write(BASE, code)
    hart.x[5] = BASE
    for _ in range(40):
        run_from(hart, BASE)
    blocks = dict(hart.engine.blocks)
    assert blocks, "the block should be cached"
    assert struct.unpack("<I", mem.read(BASE + 16, 4))[0] == 39  # the last value stored
    run_from(hart, BASE)
    assert hart.engine.blocks == blocks  # writing beside code did not drop it


@pytest.mark.parametrize("tier", TIERS)
def test_loop_rewriting_its_own_head_runs_the_new_code_from_the_next_block(tier: str) -> None:
    hart, mem = machine(tier)
    # The loop's blocks jump straight to each other (native tiers link blocks on one
    # page); each pass stores to a word of the page, and on pass a4 it stores to t2.
    mem.write(BASE, struct.pack(
        "<IIIIIII", ADDI_A0_1, 0x00158593,  # head: addi a0, a0, 1; addi a1, a1, 1
        0x00E59463,  # bne a1, a4, +8 (past the next instruction)
        0x00038293,  # mv t0, t2
        0x0062A023,  # sw t1, 0(t0)
        0xFED5C6E3,  # blt a1, a3, back to the head
        EBREAK))

    def loop(passes: int, switch_at: int, target: int) -> None:
        hart.x[5], hart.x[7], hart.x[11] = BASE + 0x400, target, 0
        hart.x[13], hart.x[14] = passes, switch_at
        run_from(hart, BASE)
        hart.run(100_000)

    hart.x[6] = 0x00250513  # addi a0, a0, 2
    for _ in range(3):  # every block runs native code, none writes code yet
        loop(20, 10, BASE + 0x404)
    hart.x[10] = 0
    loop(3000, 1000, BASE)  # now pass 1000 rewrites the head
    assert (hart.x[10], hart.x[11]) == (1000 + 2 * 2000, 3000)


@pytest.mark.parametrize("tier", TIERS)
def test_illegal_instruction_replaced_by_valid_one(tier: str) -> None:
    hart, mem = machine(tier)
    mem.write(BASE, struct.pack("<II", 0xFFFFFFFF, EBREAK))
    run_from(hart, BASE)
    assert hart.csr[MCAUSE] == 2  # illegal instruction
    hart.x[5], hart.x[6] = BASE, ADDI_A0_1
    mem.write(BASE + 0x100, struct.pack("<II", 0x0062A023, EBREAK))  # sw t1, 0(t0)
    run_from(hart, BASE + 0x100)
    start = hart.x[10]
    run_from(hart, BASE)
    assert hart.x[10] == start + 1 and hart.csr[MCAUSE] == 3  # ran addi, then ebreak


@pytest.mark.parametrize("tier", TIERS)
def test_instruction_straddling_two_pages_sees_a_change_to_either_half(tier: str) -> None:
    hart, mem = machine(tier)
    mem.write(BASE + 0xFFE, struct.pack("<II", ADDI_A0_1, EBREAK))  # halves on two pages
    for _ in range(300):  # hot enough for tier 1 to translate it
        run_from(hart, BASE + 0xFFE)
    assert hart.x[10] == 300
    mem.write(BASE + 0x1000, struct.pack("<H", 0x0025))  # high half: addi a0, a0, 2
    run_from(hart, BASE + 0xFFE)
    assert hart.x[10] == 302
    mem.write(BASE + 0xFFE, struct.pack("<H", 0x0593))  # low half: addi a1, a0, 2
    run_from(hart, BASE + 0xFFE)
    assert hart.x[10] == 302 and hart.x[11] == 304


@pytest.mark.parametrize("tier", TIERS)
def test_loop_through_a_straddling_instruction_stays_native_and_sees_its_second_half(
        tier: str) -> None:
    hart, mem = machine(tier)
    mem.write(BASE + 0xFF8, struct.pack(
        "<IHIII", 0x00158593,  # addi a1, a1, 1
        0x0001,  # c.nop: the next instruction's halves lie on two pages
        ADDI_A0_1, 0xFED5CBE3, EBREAK))  # blt a1, a3, back to the addi
    python_lookups = 0
    block_at = hart.engine._block_at

    def counted(*args):
        nonlocal python_lookups
        python_lookups += 1
        return block_at(*args)

    hart.engine._block_at = counted
    hart.x[13] = 2000
    run_from(hart, BASE + 0xFF8)
    hart.x[13] = 4000
    hart.run(20_000)
    assert (hart.x[10], hart.x[11]) == (4000, 4000)
    if tier in ("baseline", "jit"):  # native code enters it, not Python, once warm
        assert python_lookups < 50, python_lookups
    mem.write(BASE + 0x1000, struct.pack("<H", 0x0025))  # second half: addi a0, a0, 2
    hart.x[13] = 5000
    run_from(hart, BASE + 0xFF8)
    hart.run(20_000)
    assert (hart.x[10], hart.x[11]) == (6000, 5000)


@pytest.mark.parametrize("tier", ["baseline", "jit"])
def test_a_block_gone_native_holds_no_python_tier_function(tier: str) -> None:
    """The run loop enters a native block's code, never again its Python tiers' function:
    the block lets go of that closure and what it holds (the interpreter's ops, tier 1's
    promotion), which over a Linux boot's ~31,000 blocks came to ~36 MiB."""
    hart, mem = machine(tier)
    mem.write(BASE, struct.pack("<III", ADDI_A0_1, ADDI_A0_1, EBREAK))
    key = mem.ram_offset(BASE)
    hart.engine.predecode([key])  # decoded and patched: native from its first run
    block = hart.engine.blocks[key]
    assert block.native is not None
    assert not any(getattr(r, "__closure__", None) for r in gc.get_referents(block))
    run_from(hart, BASE)
    run_from(hart, BASE)
    assert hart.x[10] == 4 and hart.engine.blocks[key] is block
    assert block.native is not None
    assert not any(getattr(r, "__closure__", None) for r in gc.get_referents(block))


@pytest.mark.parametrize("tier", ["baseline", "jit"])
def test_native_code_runs_on_into_blocks_it_meets_for_the_first_time(tier: str) -> None:
    """A chain of 300 blocks never seen before (each an addi and a jump to the next):
    native code asks the engine for each new one and goes on, instead of returning to
    the engine's loop 300 times."""
    hart, mem = machine(tier)
    jump_on = 0x0040006F  # jal x0, +4: the next block
    code = b"".join(struct.pack("<II", ADDI_A0_1, jump_on) for _ in range(300))
    mem.write(BASE + 0x1000, code + struct.pack("<I", EBREAK))
    entries = 0
    enter = hart.engine._enter

    def counted(*args):
        nonlocal entries
        entries += 1
        return enter(*args)

    hart.engine._enter = counted
    run_from(hart, BASE + 0x1000)
    hart.run(10_000)
    assert hart.x[10] == 300
    assert entries < 10, entries
