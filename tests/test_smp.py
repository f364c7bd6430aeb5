"""Harts take turns on one host thread, yet behave as if they ran side by side."""

from __future__ import annotations

import re

import pytest

from popek.cpu.hart import Hart
from popek.machine.clock import NS_PER_TICK, GuestClock
from popek.machine.virt import MachineConfig, VirtMachine
from tests.vmm_guests import guest


def _run(name: str, cpus: int, clock: GuestClock | None = None,
         harts: list[Hart] | None = None) -> bytes:
    """Run guest ``name`` until it powers off; its console output. ``harts`` receives the
    machine's harts (for a clock that counts their instructions)."""
    out = bytearray()
    machine = VirtMachine(MachineConfig(kernel=guest(name), mem=32 << 20, cpus=cpus, rng=False),
                          out.extend, clock=clock)
    if harts is not None:
        harts.extend(machine.harts)
    for _ in range(10_000):
        if machine.exit is not None:
            assert machine.exit == ("poweroff", 0), bytes(out)
            return bytes(out)
        machine.run_slice()
    raise AssertionError(f"guest {name} did not power off; it said {bytes(out[-200:])!r}")


@pytest.mark.parametrize("cpus", [1, 2])
def test_each_busy_hart_sees_guest_time_pass_at_its_own_pace(cpus: int) -> None:
    # Host CPU time that passes one tick per instruction any hart retires: the thread's
    # time, made deterministic. A lone hart sees one tick per instruction; two busy harts
    # share the thread, and each must still see one tick per instruction of its own, or
    # a guest's timer interrupts would eat twice its share (Linux stalled in its tick).
    harts: list[Hart] = []
    clock = GuestClock(cpu_ns=lambda: NS_PER_TICK * sum(h.instret for h in harts))
    out = _run("timeshare", cpus, clock, harts)
    took = re.findall(rb"hart (\d) time (\d+) instret (\d+)\n", out)
    assert [int(h) for h, _, _ in took] == list(range(cpus)), out
    for _, ticks, instret in took:
        assert int(instret) > 200_000  # many time slices
        assert int(ticks) == pytest.approx(int(instret), rel=0.1), out


def test_store_by_another_hart_makes_store_conditional_fail() -> None:
    # Hart 0's lr.d and sc.d lie in different time slices, with hart 1's store between.
    assert _run("lrsc", 2) == b"sc failed\n"
