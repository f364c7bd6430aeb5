"""Guest time: the 10 MHz ``mtime`` the harts and CLINT see.

It follows the host's time while the guest runs, measured as the CPU time the
vCPU thread really got, and host wall time while every hart waits for an
interrupt. So a host that is busy with other work (other guests, other
processes) does not make guest time rush ahead of guest execution: a starved
guest would otherwise spend its few instructions on timer interrupts.
"""

from __future__ import annotations

import time

NS_PER_TICK = 100  # 10 MHz


class GuestClock:
    """A monotonic tick counter that advances by vCPU time and idle wall time."""

    def __init__(self) -> None:
        self._base_ns = 0
        self._since_cpu = time.thread_time_ns()
        self._idle_since: int | None = None

    def _elapsed_ns(self) -> int:
        if self._idle_since is not None:
            return self._base_ns + time.monotonic_ns() - self._idle_since
        return self._base_ns + time.thread_time_ns() - self._since_cpu

    def ticks(self) -> int:
        return self._elapsed_ns() // NS_PER_TICK

    def set_idle(self, idle: bool) -> None:
        """Switch between counting vCPU time (busy) and wall time (all harts idle)."""
        if idle == (self._idle_since is not None):
            return
        self._base_ns = self._elapsed_ns()
        if idle:
            self._idle_since = time.monotonic_ns()
        else:
            self._idle_since = None
            self._since_cpu = time.thread_time_ns()
