"""The one machine runner: slices while harts work, one wait on every host event source
while they all idle, nothing in between.

The guests are tiny bare-metal programs (tests/vmm_guests.py); the host events are real
sockets. Wake-ups are counted, not timed: an idle guest must cost a wait, not a loop.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from popek.machine.config import MachineConfig, NicSpec
from popek.machine.runner import MachineRunner
from popek.machine.virt import VirtMachine
from popek.net.stream import StreamBackend
from tests.vmm_guests import guest

MEM = 32 << 20


def _machine(runner: MachineRunner, program: str, out: bytearray, **board) -> VirtMachine:
    nics = [NicSpec(type="stream", connect="/unused")] * len(board.get("nets", ()))
    config = MachineConfig(kernel=guest(program), mem=MEM, rng=False, nics=nics)
    runner.machine = VirtMachine(config, out.extend, events=runner.sources, **board)
    return runner.machine


def test_an_idle_guest_sleeps_until_a_frame_arrives() -> None:
    """The guest waits in WFI with no timer armed: the runner sleeps in one wait, which
    the frame from the host ends; the driverless NIC then drops it, as hardware would."""
    peer, ours = socket.socketpair()
    runner = MachineRunner()
    out = bytearray()
    machine = _machine(runner, "idle", out, nets=[StreamBackend(ours)])
    while b"idle ready" not in out:
        runner.step()
    for _ in range(3):  # settle into WFI
        runner.step(max_wait=0.01)
    frame = b"\xff" * 12 + b"\x88\xb5" + bytes(50)
    sender = threading.Timer(0.3, peer.sendall, [struct.pack(">I", len(frame)) + frame])
    waits, steps = runner.idle_waits, 0
    start = time.monotonic()
    sender.start()
    while machine.nics[0].counters.rx_not_ready == 0:
        runner.step()
        steps += 1
    assert time.monotonic() - start >= 0.25  # it really waited for the host...
    assert steps == 1 and runner.idle_waits == waits + 1  # ...in one wait, not a loop
    machine.close()
    runner.close()


def test_the_guests_own_timer_ends_an_idle_wait() -> None:
    """Twenty 1 ms SBI timers, each slept through in WFI: every one must end the host's
    wait (a timer that fires as devices update must not leave it waiting forever)."""
    runner = MachineRunner()
    out = bytearray()
    machine = _machine(runner, "timer", out)
    watchdog, bark = socket.socketpair()  # ends a wait that nothing else would
    runner.sources.watch(watchdog.fileno(), lambda: watchdog.recv(1))
    timer = threading.Timer(60, bark.send, [b"!"])
    timer.start()
    try:
        while machine.exit is None and timer.is_alive():
            runner.step()
    finally:
        timer.cancel()
    assert b"woke 20 times" in out and machine.exit == ("poweroff", 0)
    assert runner.idle_waits >= 20  # the guest idled between its timers
    runner.close()


def test_console_and_channel_sources_wake_the_runner_while_paused() -> None:
    """Paused (not running), the runner only waits on its sources, however long."""
    runner = MachineRunner()
    runner.running = False
    out = bytearray()
    _machine(runner, "spin", out)
    a, b = socket.socketpair()
    seen: list[bytes] = []
    runner.sources.watch(a.fileno(), lambda: seen.append(a.recv(100)))
    threading.Timer(0.2, b.sendall, [b"resume"]).start()
    runner.step()
    assert seen == [b"resume"] and out == b""  # woke for the command; ran nothing
    runner.close()


def test_a_nics_backend_outlives_a_reboot() -> None:
    """A reboot replaces the machine, not the cable: the old NIC lets go of the backend's
    descriptor and the new one takes it up."""
    peer, ours = socket.socketpair()
    backend = StreamBackend(ours)
    runner = MachineRunner()
    first = _machine(runner, "idle", bytearray(), nets=[backend])
    first.close()
    assert not runner.sources._handlers  # nothing watched for a machine that is gone
    out = bytearray()
    second = _machine(runner, "idle", out, nets=[backend])
    while b"idle ready" not in out:
        runner.step()
    frame = b"\xff" * 12 + b"\x88\xb5" + bytes(50)
    peer.sendall(struct.pack(">I", len(frame)) + frame)
    while second.nics[0].counters.rx_not_ready == 0:
        runner.step()
    assert first.nics[0].counters.rx_not_ready == 0
    runner.close()
