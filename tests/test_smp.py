"""Harts take turns on one host thread, yet behave as if they ran side by side."""

from __future__ import annotations

import re

import pytest

from popek.cpu.hart import Hart
from popek.machine.clock import MAX_NS_PER_INSTRUCTION, NS_PER_TICK, GuestClock
from popek.machine.config import MachineConfig
from popek.machine.virt import VirtMachine
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


@pytest.mark.parametrize("host_ns_per_instruction", [10, NS_PER_TICK, 10 * NS_PER_TICK])
@pytest.mark.parametrize("cpus", [1, 2])
def test_each_busy_hart_sees_guest_time_pass_at_its_own_pace(
        cpus: int, host_ns_per_instruction: int) -> None:
    # Host CPU time that passes a fixed time per instruction any hart retires: the
    # thread's time, made deterministic. A lone hart sees its own instructions' time; two
    # busy harts share the thread, and each must still see time pass at its own pace, or
    # a guest's timer interrupts would eat twice its share (Linux stalled in its tick).
    # A host slower than 10 MIPS counts as 10 MIPS: one tick (100 ns) per instruction.
    harts: list[Hart] = []
    clock = GuestClock(cpu_ns=lambda: host_ns_per_instruction * sum(h.instret for h in harts))
    out = _run("timeshare", cpus, clock, harts)
    took = re.findall(rb"hart (\d) time (\d+) instret (\d+)\n", out)
    assert [int(h) for h, _, _ in took] == list(range(cpus)), out
    ticks_per_instruction = min(host_ns_per_instruction, MAX_NS_PER_INSTRUCTION) / NS_PER_TICK
    for _, ticks, instret in took:
        assert int(instret) > 200_000  # many time slices
        assert int(ticks) == pytest.approx(int(instret) * ticks_per_instruction, rel=0.1), out


def test_guest_time_never_goes_back_when_a_slice_ends_early() -> None:
    # The guest read the time a slow host gave it, then the slice stopped (a WFI) after
    # few instructions: the time it already saw stays.
    host_ns = [0]
    clock = GuestClock(cpu_ns=lambda: host_ns[0], wall_ns=lambda: host_ns[0])
    clock.start_slice(harts=1, budget=1000)
    host_ns[0] += 50_000
    seen = clock.ticks()
    assert seen == 500
    clock.end_slice(retired=10)
    assert clock.ticks() == seen
    clock.start_slice(harts=1, budget=1000)
    host_ns[0] += 1_000_000
    clock.end_slice(retired=1000)
    assert clock.ticks() == seen + 1000  # one tick per instruction on this slow host


def test_store_by_another_hart_makes_store_conditional_fail() -> None:
    # Hart 0's lr.d and sc.d lie in different time slices, with hart 1's store between.
    assert _run("lrsc", 2) == b"sc failed\n"
