"""Guest time: the 10 MHz ``mtime`` the harts and CLINT see.

It follows the host's time while the guest runs, measured as the CPU time each
busy hart really got, and host wall time while every hart waits for an
interrupt. So a host that is busy with other work (other guests, other
processes) does not make guest time rush ahead of guest execution: a starved
guest would otherwise spend its few instructions on timer interrupts.

The harts of one guest take turns on one host thread, where real harts would run
side by side: with two busy harts, a second of the thread's CPU time is half a
second of work for each, so it is half a second of guest time. Counted in full,
each hart would get half the instructions per timer tick that a lone hart gets,
and Linux, whose periodic tick catches up missed ticks one by one inside the
timer interrupt, would never get out of that interrupt once a tick costs more
than a tick's worth of instructions (an RCU stall with two harts).

For the same reason a hart never sees a CPU slower than 10 MIPS: a slice of work
adds at most one tick (100 ns) per instruction it retired, however long the host
took over it. The interpreter and tier 1 run about 1 MIPS on a loaded host, where
the SMP kernel's tick (1,300-2,000 instructions a hart) would cost a third to a
half of every hart's 4,000-5,000 instructions per tick, and one slow stretch (a
hart spinning on a lock the other holds, a burst of new code to decode) tipped
the tick over the edge into that stall. Time the host spends between slices
(devices, the scheduler itself) is no hart's work and adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

NS_PER_TICK = 100  # 10 MHz
MAX_NS_PER_INSTRUCTION = NS_PER_TICK  # the slowest CPU a hart may appear to be: 10 MIPS


class GuestClock:
    """A monotonic tick counter that advances by per-hart vCPU time and idle wall time."""

    def __init__(self, cpu_ns: Callable[[], int] = time.thread_time_ns,
                 wall_ns: Callable[[], int] = time.monotonic_ns) -> None:
        """``cpu_ns`` is the vCPU thread's CPU time, ``wall_ns`` the host's monotonic time
        (tests pass clocks of their own to make guest time deterministic)."""
        self._cpu_ns = cpu_ns
        self._wall_ns = wall_ns
        self._base_ns = 0  # guest time when the current slice or idle stretch began
        self._reported_ns = 0  # the latest guest time read: time never goes back
        self._since_cpu = 0
        self._busy = 1  # harts sharing the thread in the current slice
        self._slice_cap_ns = 0  # what the current slice may add at most: 0 between slices
        self._idle_since: int | None = None

    def _elapsed_ns(self) -> int:
        if self._idle_since is not None:
            return self._base_ns + self._wall_ns() - self._idle_since
        worked = min(self._cpu_ns() - self._since_cpu, self._slice_cap_ns)
        return self._base_ns + worked // self._busy

    def ticks(self) -> int:
        ns = max(self._elapsed_ns(), self._reported_ns)
        self._reported_ns = ns
        return ns // NS_PER_TICK

    def start_slice(self, harts: int, budget: int) -> None:
        """A hart starts a slice of about ``budget`` instructions; ``harts`` busy harts
        (this one included) share the thread."""
        self._base_ns = max(self._elapsed_ns(), self._reported_ns)
        self._idle_since = None
        self._busy = harts
        self._slice_cap_ns = budget * MAX_NS_PER_INSTRUCTION
        self._since_cpu = self._cpu_ns()

    def end_slice(self, retired: int) -> None:
        """The slice retired ``retired`` instructions: guest time advanced by the CPU time
        it took, but by no more than ``retired`` ticks."""
        self._slice_cap_ns = min(self._slice_cap_ns, retired * MAX_NS_PER_INSTRUCTION)
        self._base_ns = max(self._elapsed_ns(), self._reported_ns)
        self._slice_cap_ns = 0

    def idle(self) -> None:
        """Every hart waits for an interrupt: time follows the host's wall time until the
        next slice starts."""
        if self._idle_since is None:
            self._base_ns = max(self._elapsed_ns(), self._reported_ns)
            self._idle_since = self._wall_ns()
