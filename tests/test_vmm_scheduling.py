"""CPU policy arithmetic: weights to nice levels, and the worker's CPU-time token bucket."""

from __future__ import annotations

import pytest

from popek.vmm.scheduler import nice_for_weight
from popek.vmm.throttle import PERIOD, CpuCap


@pytest.mark.parametrize("weight, nice", [(100, 0), (1, 19), (10000, -20), (400, -6),
                                          (25, 6), (125, -1), (80, 1)])
def test_weight_maps_to_the_nice_level_of_the_same_load_ratio(weight: int, nice: int) -> None:
    assert nice_for_weight(weight) == nice


class FakeClocks:
    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.cpu += seconds

    def sleep(self, seconds: float) -> None:
        self.wall += seconds


def _simulate(percent: float | None, slice_seconds: float, total: float) -> float:
    """Run in slices as a worker does, honouring the cap; returns the CPU share used."""
    clocks = FakeClocks()
    cap = CpuCap(percent, cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    while clocks.wall < total:
        delay = cap.delay()
        if delay:
            clocks.sleep(delay)
            cap.slept(delay)
        else:
            clocks.run(slice_seconds)
    return clocks.cpu / clocks.wall


@pytest.mark.parametrize("percent", [10, 25, 50, 90])
@pytest.mark.parametrize("slice_seconds", [0.001, 0.02, 0.3])
def test_long_run_share_is_the_cap_whatever_the_slice_length(
        percent: float, slice_seconds: float) -> None:
    assert _simulate(percent, slice_seconds, 100.0) == pytest.approx(percent / 100, abs=0.01)


def test_no_cap_never_sleeps() -> None:
    assert _simulate(None, 0.01, 10.0) == 1.0


def test_idle_time_cannot_be_saved_up_for_a_burst() -> None:
    clocks = FakeClocks()
    cap = CpuCap(50, cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    clocks.sleep(60)  # a minute idle
    assert cap.delay() == 0.0
    clocks.run(2 * PERIOD)  # earns half of it, and may carry over only half a period
    assert cap.delay() > 0


def test_caps_outside_one_core_are_refused() -> None:
    with pytest.raises(ValueError):
        CpuCap(0)
    with pytest.raises(ValueError):
        CpuCap(150)
