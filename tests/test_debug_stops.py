"""A debugger's breakpoints stop every tier at the exact instruction, hot code included.

The loop below runs until tier 1 has translated it (under ``baseline`` and ``jit``, made
it native) and (under ``jit``) tier 2 has
compiled it; a breakpoint set in the middle of its one block must then stop the hart
before that instruction, with the state of every instruction before it and none after.
"""

from __future__ import annotations

import struct

import pytest

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.engine.engine import TIERS

BASE = 0x8000_0000
LOOP = struct.pack("<IIII",
                   0x00150513,  # addi a0, a0, 1
                   0x00258593,  # addi a1, a1, 2
                   0x00360613,  # addi a2, a2, 3
                   0xFF5FF06F)  # j BASE
A0, A1, A2 = 10, 11, 12
HOT = 200_000  # instructions: enough runs of the block for every tier to take it
NATIVE_TIERS = ("baseline", "jit")  # which run such a block as native code


def hot_loop(tier: str) -> Hart:
    mem = PhysicalMemory(BASE, 1 << 16)
    hart = Hart(mem, engine=tier)
    mem.write(BASE, LOOP)
    hart.pc = BASE
    hart.run(HOT)
    hart.engine.finish_compiles()
    hart.run(HOT)
    block = hart.engine.blocks[hart.mem.ram_offset(BASE)]
    assert (block.native is not None) == (tier in NATIVE_TIERS)
    return hart


@pytest.mark.parametrize("tier", TIERS)
def test_a_breakpoint_inside_a_hot_block_stops_before_its_instruction(tier: str) -> None:
    hart = hot_loop(tier)
    hart.engine.set_breakpoints(frozenset({BASE + 8}))
    hart.run(HOT)
    stop = hart.engine.debug_stop
    assert (stop.reason, stop.addr, hart.pc) == ("breakpoint", BASE + 8, BASE + 8)
    n = hart.x[A0]
    assert (hart.x[A1], hart.x[A2]) == (2 * n, 3 * (n - 1))  # a2's addi has not run
    hart.step()  # a step runs the instruction the breakpoint holds
    assert (hart.pc, hart.x[A2], hart.engine.debug_stop) == (BASE + 12, 3 * n, None)
    hart.run(HOT)  # and the next pass through the loop stops again
    assert (hart.pc, hart.x[A0], hart.engine.debug_stop.addr) == (BASE + 8, n + 1, BASE + 8)


@pytest.mark.parametrize("tier", TIERS)
def test_without_breakpoints_the_loop_runs_its_whole_budget_again(tier: str) -> None:
    hart = hot_loop(tier)
    hart.engine.set_breakpoints(frozenset({BASE}))
    hart.run(HOT)
    assert hart.engine.debug_stop is not None and hart.pc == BASE
    hart.engine.set_breakpoints(frozenset())
    before = hart.instret
    assert hart.run(HOT) >= HOT and hart.engine.debug_stop is None
    assert hart.instret - before >= HOT


@pytest.mark.parametrize("tier", TIERS)
def test_code_before_a_breakpoint_that_turns_hot_still_stops_there(tier: str) -> None:
    """The block that ends at the breakpoint runs often enough to be translated and
    compiled in turn; native code must still return to the run loop at the breakpoint
    rather than chain into it."""
    hart = hot_loop(tier)
    hart.engine.set_breakpoints(frozenset({BASE + 8}))
    for passes in range(1200):
        hart.run(HOT)
        if passes == 600:
            hart.engine.finish_compiles()
        assert (hart.pc, hart.engine.debug_stop.addr) == (BASE + 8, BASE + 8)
        hart.step()
    before = hart.engine.blocks[hart.mem.ram_offset(BASE)]
    assert (before.native is not None) == (tier in NATIVE_TIERS)
    first = hart.x[A0]
    hart.run(HOT)
    assert (hart.pc, hart.x[A0]) == (BASE + 8, first + 1)
