"""A CPU cap a worker enforces on itself, where no cgroup can: a token bucket of CPU time.

Each wall-clock second earns the worker ``cap`` seconds of CPU; running spends them.
When the bucket is empty the worker sleeps (still answering the VMM) until it has
earned back what it overspent, so its long-run use is the cap however long its slices
are. The bucket holds at most one period's allowance, so idle time cannot be saved up
for a burst that would starve the other guests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PERIOD = 0.1  # seconds: how much unused allowance may carry over
MIN_SLEEP = 0.001  # shorter debts are carried, not slept off


class CpuCap:
    """``percent`` of one host core, or None for no cap."""

    def __init__(self, percent: float | None, *,
                 cpu_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.monotonic) -> None:
        self.cpu_clock = cpu_clock
        self.wall_clock = wall_clock
        self.throttled = 0.0  # seconds spent sleeping to honour the cap
        self._last_wall = wall_clock()
        self._last_cpu = cpu_clock()
        self.set(percent)

    def set(self, percent: float | None) -> None:
        if percent is not None and not 0 < percent <= 100:
            raise ValueError(f"CPU cap {percent}% is not in (0, 100]")
        self.share = None if percent is None else percent / 100
        self._tokens = 0.0

    def delay(self) -> float:
        """Seconds to sleep before running again (0.0: run now)."""
        now, cpu = self.wall_clock(), self.cpu_clock()
        earned, spent = now - self._last_wall, cpu - self._last_cpu
        self._last_wall, self._last_cpu = now, cpu
        if self.share is None:
            return 0.0
        self._tokens = min(self.share * PERIOD, self._tokens + earned * self.share - spent)
        delay = -self._tokens / self.share
        return delay if delay >= MIN_SLEEP else 0.0

    def slept(self, seconds: float) -> None:
        self.throttled += seconds
