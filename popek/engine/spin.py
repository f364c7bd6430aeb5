"""Spin detection: a hart going round a loop that computes nothing.

The harts of one guest take turns on one host thread, so a hart that waits for
another (on a lock the other holds, or in an idle loop that polls for work, as
xv6's scheduler does instead of `wfi`) spends slices the working hart needed: it
cannot see the change it waits for until the other hart runs. Hardware that hosts
virtual CPUs has the same problem, and pause-loop exiting is its answer: a vCPU seen
spinning gives up its time slice.

popek sees a spin without looking at each instruction: where the run loop looks at a
hart anyway (a system instruction's block, at most every SPIN_GLANCE instructions),
and every SPIN_WINDOW instructions between them (where native code leaves its chain
for it), it compares the hart's state with every state it had at that pc before.
The same state within a short stretch of the hart's instructions means that the
hart went round a loop and came back to where it was, having computed nothing: it
waits for memory (or a device) that someone else changes. The state is the integer
registers, the top of the stack and the number of traps taken. The stack counts
because registers alone do not tell: a loop deep in calls keeps its counter in a
caller's frame (xv6 frees its pages one by one with every register the same at each
free's `release`). The traps count because a program that makes a system call each
time round keeps its progress in registers the kernel saved away from its stack
(xv6's trapframe), while a loop that waits does not trap, but for a rare timer tick.
Cutting a slice short only changes how fast this hart runs beside the others, which
real harts do all the time, so a loop misjudged (one that makes its progress in
memory elsewhere) runs slower, never differently.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from popek.cpu.mmu import Mmu
    from popek.cpu.physmem import PhysicalMemory

SPIN_CYCLE_MAX = 1 << 15  # instructions between two identical states that make a spin
# (xv6's idle scheduler goes round its 64 processes in about 13,000)
SPIN_GLANCE = 256  # instructions at least between two looks at system instructions'
# blocks (some code runs one every few instructions): a loop a few times longer still
# shows a state it showed before soon enough, as every state looked at is remembered
SPIN_WINDOW = 4096  # instructions a hart runs without a system instruction before the
# run loop looks anyway (only while other harts wait for the thread: native code that
# spins never leaves its loop otherwise)
STACK_BYTES = 256  # of the stack from sp up that count as the hart's state (a few frames)
MARKS_LIMIT = 4096  # states remembered; past that all are forgotten and marking starts over


class SpinDetector:
    """Remembers the states a hart passed through at the points it was looked at (as
    hashes of pc and state: a collision would only cut a slice) and when."""

    def __init__(self, x: array, mmu: Mmu, mem: PhysicalMemory) -> None:
        self._x = x
        self._mmu = mmu
        self._mem = mem
        self._marks: dict[int, int] = {}  # hash of (pc, state): instructions retired then
        self.traps = 0  # traps the hart took (the engine counts them)

    def _state(self) -> bytes:
        """The integer registers and the stack's top (as far as the page it is in goes,
        if the read TLB maps it: else the registers alone); the traps count too."""
        x = self._x
        sp = x[2]
        page = self._mmu.tlb_r.get(sp >> 12)
        if page is None:
            return x.tobytes()
        start = page + (sp & 4095)
        return x.tobytes() + self._mem.ram[start:min(start + STACK_BYTES, page + 4096)]

    def looped(self, pc: int, retired: int) -> bool:
        """The hart is at ``pc`` having retired ``retired`` instructions in all: True if
        it was here in the same state less than SPIN_CYCLE_MAX instructions ago. Each
        pc keeps every state seen there (an inner loop passes its pcs in a different
        state each time round, until the outer loop comes back)."""
        key = hash((pc, self.traps, self._state()))
        marks = self._marks
        seen = marks.get(key)
        if seen is not None and 0 < retired - seen <= SPIN_CYCLE_MAX:
            # Forgotten, so that the hart, resumed here in this very state, goes on.
            del marks[key]
            return True
        if len(marks) >= MARKS_LIMIT:
            marks.clear()
        marks[key] = retired
        return False
