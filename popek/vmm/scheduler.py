"""CPU policy across guests where no cgroup holds them (:mod:`popek.vmm.limits`): weights
become nice levels, caps go to the workers; and every guest's share is measured from the
host's accounting.

Each guest is one worker process, so the host kernel's fair scheduler time-slices
them over every core. A weight (1 to 10000, 100 by default, as cgroup v2's
``cpu.weight``) maps to the nice level whose kernel load weight has the same ratio
to nice 0's (each nice step is a factor of 1.25), so under contention guests share
CPU in proportion to their weights, and an idle guest's share goes to the others. A
cap is a ceiling each worker enforces on itself (:mod:`popek.vmm.throttle`), busy
host or not. Raising a guest above nice 0 needs privilege; without it the weight is
clamped at 100 and the report says so.
"""

from __future__ import annotations

import math
import os
import time

from popek.vmm import procstat

DEFAULT_WEIGHT = 100
MIN_WEIGHT, MAX_WEIGHT = 1, 10000
HOST_CPUS = os.cpu_count() or 1


def nice_for_weight(weight: int) -> int:
    """The nice level whose load weight relative to nice 0 is closest to weight / 100."""
    return max(-20, min(19, round(math.log(DEFAULT_WEIGHT / weight, 1.25))))


def apply_weight(pid: int, weight: int) -> int:
    """Set the worker's nice level for ``weight``; returns the level it got (a worker that
    has already exited keeps none, and its VM is reported by whoever reaps it)."""
    nice = nice_for_weight(weight)
    try:
        try:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        except PermissionError:
            nice = max(nice, os.getpriority(os.PRIO_PROCESS, pid))
            os.setpriority(os.PRIO_PROCESS, pid, nice)
    except ProcessLookupError:
        pass
    return nice


class CpuMeter:
    """Percent of one host core a process used between the last two samples."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.percent = 0.0
        self._last = (time.monotonic(), procstat.cpu_seconds(pid) or 0.0)

    def sample(self) -> None:
        now, cpu = time.monotonic(), procstat.cpu_seconds(self.pid)
        then, before = self._last
        if cpu is None or now - then < 0.05:
            return
        self.percent = 100 * max(0.0, cpu - before) / (now - then)
        self._last = (now, cpu)

    @property
    def host_share(self) -> float:
        """Percent of the whole host (every core)."""
        return self.percent / HOST_CPUS
