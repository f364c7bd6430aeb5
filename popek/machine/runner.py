"""The one machine runner: ``popek run`` and VMM workers run their guests through it.

It gives the harts slices while they have work and, between slices, looks once (without
waiting) at every host event source. When every hart waits for an interrupt it sleeps in
one ``poll`` on all of them at once, until the guest's next timer deadline: the
console's stdin (``popek run``), the VMM's command channel (a worker), each NIC
backend's socket. Whatever becomes ready is handled at once (a frame is put in the
guest's buffers and its interrupt raised), so an idle guest costs no CPU and still
wakes within the wait's latency, with no polling anywhere.

Event sources register a descriptor and what to call (:meth:`EventSources.watch`); the
machine (rebuilt on a guest reboot) and the sources (which outlive it) are separate, so
``runner.machine`` can be replaced between steps.
"""

from __future__ import annotations

import selectors
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from popek.machine.virt import VirtMachine
    from popek.vmm.throttle import CpuCap

Callback = Callable[[], None]


class EventSources:
    """Host descriptors to wait on, each with what to call when it is readable or writable.

    Implements :class:`popek.devices.device.HostEvents` for the devices."""

    def __init__(self) -> None:
        # poll, not epoll: a few descriptors, and stdin may be a plain file (always
        # readable, until its end), which epoll refuses.
        self._selector = selectors.PollSelector()
        self._handlers: dict[int, tuple[Callback | None, Callback | None]] = {}
        self.wakeups = 0  # waits that ended because a source was ready

    def watch(self, fd: int, readable: Callback | None,
              writable: Callback | None = None) -> None:
        old = self._handlers.get(fd)
        if old == (readable, writable) or (old is None and readable is writable is None):
            return
        events = (selectors.EVENT_READ if readable else 0) | \
            (selectors.EVENT_WRITE if writable else 0)
        if not events:
            del self._handlers[fd]
            self._selector.unregister(fd)
            return
        if old is None:
            self._selector.register(fd, events)
        else:
            self._selector.modify(fd, events)
        self._handlers[fd] = (readable, writable)

    def dispatch(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` seconds (None: until a source is ready; 0: just look)
        and call the handlers of every ready source."""
        ready = self._selector.select(timeout)
        if ready:
            self.wakeups += 1
        for key, mask in ready:
            # Look the handler up now: an earlier one may have changed or dropped it.
            readable, writable = self._handlers.get(key.fd, (None, None))
            if mask & selectors.EVENT_READ and readable is not None:
                readable()
            if mask & selectors.EVENT_WRITE and writable is not None:
                writable()

    def close(self) -> None:
        self._selector.close()


class MachineRunner:
    """Steps one machine: slices while harts run, one wait on every event source when
    they all idle. ``running`` False (a paused VM) waits on the sources alone; ``cap``
    (a VMM worker's CPU cap) makes it sleep off CPU time used beyond its share."""

    def __init__(self, cap: CpuCap | None = None) -> None:
        self.sources = EventSources()
        self.machine: VirtMachine | None = None
        self.running = True
        self.cap = cap
        self.idle_waits = 0  # waits entered because every hart was idle
        self._frozen_clock: dict | None = None

    def pause(self) -> None:
        """Stop the harts and the guest's clock: a paused guest does not see time jump."""
        if self.running:
            self._frozen_clock = self.machine.clint.save_state()
            self.running = False

    def hold_clock(self) -> None:
        """Paused, put the guest's clock back where it stopped (a snapshot records it)."""
        if not self.running:
            self.machine.clint.load_state(self._frozen_clock)

    def resume(self) -> None:
        """Run the harts again, the guest's clock carrying on where it stood."""
        if not self.running:
            self.machine.clint.load_state(self._frozen_clock)
            self.running = True

    def step(self, max_wait: float | None = None) -> None:
        """One turn: a slice of every runnable hart, or a wait of up to the guest's next
        deadline (and at most ``max_wait`` seconds); then the ready sources' handlers."""
        timeout = max_wait
        if self.running:
            delay = self.cap.delay() if self.cap is not None else 0.0
            if delay:
                self.cap.slept(delay)
                timeout = _earliest(timeout, delay)
            elif self.machine.run_slice():
                timeout = 0.0
            else:
                self.idle_waits += 1
                timeout = _earliest(timeout, self.machine.idle_seconds())
        self.sources.dispatch(timeout)

    def close(self) -> None:
        self.sources.close()


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)
