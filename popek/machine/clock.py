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
"""

from __future__ import annotations

import time
from collections.abc import Callable

NS_PER_TICK = 100  # 10 MHz


class GuestClock:
    """A monotonic tick counter that advances by per-hart vCPU time and idle wall time."""

    def __init__(self, cpu_ns: Callable[[], int] = time.thread_time_ns,
                 wall_ns: Callable[[], int] = time.monotonic_ns) -> None:
        """``cpu_ns`` is the vCPU thread's CPU time, ``wall_ns`` the host's monotonic time
        (tests pass clocks of their own to make guest time deterministic)."""
        self._cpu_ns = cpu_ns
        self._wall_ns = wall_ns
        self._base_ns = 0
        self._since_cpu = cpu_ns()
        self._busy = 1  # harts sharing the thread; 0: all wait, time is wall time
        self._idle_since: int | None = None

    def _elapsed_ns(self) -> int:
        if self._idle_since is not None:
            return self._base_ns + self._wall_ns() - self._idle_since
        return self._base_ns + (self._cpu_ns() - self._since_cpu) // self._busy

    def ticks(self) -> int:
        return self._elapsed_ns() // NS_PER_TICK

    def set_busy(self, harts: int) -> None:
        """``harts`` harts now share the vCPU thread; 0 when all wait for an interrupt."""
        if harts == self._busy:
            return
        self._base_ns = self._elapsed_ns()
        self._busy = harts
        if harts:
            self._idle_since = None
            self._since_cpu = self._cpu_ns()
        else:
            self._idle_since = self._wall_ns()
