"""Guest threads: how popek runs the threads of one process on one host thread.

Every guest thread is a greenlet (a coroutine with its own Python stack) on the
process's single host thread, and the threads share the one hart, address space and
code cache: switching threads swaps the registers, pc, FP state and signal mask in
and out of the hart, and drops any LR reservation, as the kernel does at a context
switch. Only one guest thread runs at a time, so AMOs and LR/SC stay atomic with no
host locking, and decoded or compiled code serves every thread. Host threads would buy
nothing here: the GIL lets one of them run Python at a time, and Python signal handlers
and ``signal.signal`` belong to the main thread.

A thread runs for a time slice of instructions, then the next runnable one gets the
hart. A system call that must wait (futex, poll, read of an empty pipe, sleep, wait4)
waits through :meth:`Scheduler.wait`: the thread parks with the descriptors and
deadline it waits for and the *hub* (the greenlet that owns the scheduler) runs the
other threads; once none can run, the hub blocks in one host ``poll`` over every
parked thread's descriptors, the signal wakeup pipe and the nearest deadline, and
resumes the threads whose wait may have ended. A parked thread therefore never stops
the others, and the call's Python frames simply continue where they parked.
"""

from __future__ import annotations

import select
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from greenlet import greenlet

from popek.cpu.csr import FCSR
from popek.user.control import ControlFlow, Interrupted
from popek.user.signals import SA_RESTART, ThreadSignals

if TYPE_CHECKING:
    from collections.abc import Callable

    from popek.user.process import Process
    from popek.user.syscalls.futex import Waiter

SLICE = 100_000  # instructions a thread runs before the next runnable one gets the hart
# Thread ids above any host pid (pid_max is at most 2^22), so a tid never names a process.
THREAD_ID_BASE = 1 << 22
MAX_THREADS = 4096  # per process: a clone beyond fails with EAGAIN, as at RLIMIT_NPROC
NREGS = 32
POLL_INTERVAL = 0.002  # seconds: how often the hub looks at the host while threads run


class ThreadExit(ControlFlow):
    """The running thread ends (exit with other threads left): unwind its stack."""


@dataclass
class Wait:
    """What a parked thread waits for."""

    fds: list[tuple[int, int]]
    deadline: float | None  # time.monotonic()
    any_signal: bool


@dataclass(eq=False)
class Thread:
    """One guest thread: its registers while it is off the hart, and its kernel state."""

    tid: int
    x: list[int] = field(default_factory=lambda: [0] * NREGS)
    f: list[int] = field(default_factory=lambda: [0] * NREGS)
    fcsr: int = 0
    pc: int = 0
    signals: ThreadSignals = field(default_factory=ThreadSignals)
    clear_child_tid: int = 0  # CLONE_CHILD_CLEARTID / set_tid_address
    robust_list: int = 0  # set_robust_list's head
    glet: greenlet | None = None
    wait: Wait | None = None
    instret: int = 0  # instructions it retired: each thread counts its own
    comm: bytes = b""  # its name (prctl PR_SET_NAME, pthread_setname_np)


class Scheduler:
    """The threads of one process and the hub that switches between them."""

    def __init__(self, process: Process) -> None:
        self.process = process
        main = Thread(tid=process.pid, signals=process.signals.thread)
        self.threads: dict[int, Thread] = {main.tid: main}
        self.current = main
        self.on_hart: Thread | None = main  # whose registers the hart holds
        self.runnable: deque[Thread] = deque()
        self.parked: dict[Thread, None] = {}  # an ordered set
        self.polled = 0.0  # when the hub last looked at the host
        self.hub: greenlet | None = None
        self.next_tid = THREAD_ID_BASE
        self.futexes: dict[int, list[Waiter]] = {}  # futex address -> its wait queue
        self.exited_instret = 0  # instructions retired by threads that have ended
        self.signal_epoch = 0  # counts host signals seen, for waits that any signal ends
        # Greenlets of threads dropped by fork or execve: kept, so that collecting them
        # never unwinds their stale frames onto the hart.
        self.abandoned: list[greenlet] = []

    # -- life cycle ---------------------------------------------------------------------
    def run(self) -> None:
        """The hub: run threads until the process exits (ControlFlow ends it)."""
        self.hub = greenlet.getcurrent()
        main = self.current
        main.glet = greenlet(lambda: self._body(main), parent=self.hub)
        self.runnable.append(main)
        while True:
            if self.parked and (not self.runnable
                                or time.monotonic() - self.polled >= POLL_INTERVAL):
                self._poll_host(block=not self.runnable)
            thread = self.runnable.popleft()
            self._load(thread)
            thread.glet.switch()

    def _body(self, thread: Thread) -> None:
        process = self.process
        try:
            while True:
                if process.before_slice is not None:
                    process.before_slice()  # a debugger's turn (the first: before any instruction)
                process.run_slice()
                process.end_of_slice()
                if len(self.threads) > 1:
                    self.runnable.append(thread)
                    self._to_hub()
        except ThreadExit:
            self.exited_instret += process.hart.instret

    def instructions_retired(self) -> int:
        """By every thread of the process, ended ones included."""
        on_hart = self.process.hart.instret
        return self.exited_instret + sum(on_hart if t is self.on_hart else t.instret
                                         for t in self.threads.values())

    def spawn(self, regs: list[int], pc: int) -> Thread:
        """A new thread (clone) starting at ``pc`` with ``regs`` and the running thread's
        mask and FP state; it runs once the caller's slice ends or it waits."""
        hart = self.process.hart
        signals = self.process.signals
        thread = Thread(tid=self.next_tid, x=regs, f=list(hart.f), fcsr=hart.csr[FCSR], pc=pc,
                        signals=ThreadSignals(mask=signals.mask), comm=self.current.comm)
        self.next_tid += 1
        thread.glet = greenlet(lambda: self._body(thread), parent=self.hub)
        self.threads[thread.tid] = thread
        signals.set_threads([*signals.threads, thread.signals])
        self.runnable.append(thread)
        return thread

    def exit_thread(self) -> None:
        """The running thread ends (never returns); the last thread's exit is the caller's."""
        thread = self.current
        del self.threads[thread.tid]
        signals = self.process.signals
        signals.set_threads([t for t in signals.threads if t is not thread.signals])
        self.on_hart = None
        raise ThreadExit()

    def keep_only_current(self, tid: int) -> None:
        """After fork or execve only the calling thread is left, and its id is ``tid``."""
        current = self.current
        for thread in self.threads.values():
            if thread is not current and thread.glet is not None:
                self.abandoned.append(thread.glet)
        current.tid = tid
        self.threads = {tid: current}
        self.runnable.clear()
        self.parked.clear()
        self.futexes.clear()
        self.process.signals.set_threads([current.signals])

    # -- switching ----------------------------------------------------------------------
    def _save(self, thread: Thread) -> None:
        hart = self.process.hart
        thread.x = hart.x[:NREGS].tolist()
        thread.f = hart.f.tolist()
        thread.fcsr = hart.csr[FCSR]
        thread.pc = hart.pc
        thread.instret = hart.instret

    def _load(self, thread: Thread) -> None:
        self.current = thread
        self.process.signals.thread = thread.signals
        if self.on_hart is thread:
            return
        if self.on_hart is not None:
            self._save(self.on_hart)
        hart = self.process.hart
        for i, value in enumerate(thread.x):
            hart.x[i] = value
        for i, value in enumerate(thread.f):
            hart.f[i] = value
        hart.csr[FCSR] = thread.fcsr
        hart.pc = thread.pc
        hart.instret = thread.instret
        hart.reservation = None
        self.on_hart = thread

    def _to_hub(self) -> None:
        """Give the hart away; returns once the hub runs this thread again."""
        self.hub.switch()

    def yield_slice(self) -> None:
        """sched_yield: let every other runnable thread run first."""
        if self.runnable:
            self.runnable.append(self.current)
            self._to_hub()

    # -- waiting ------------------------------------------------------------------------
    def wait(self, fds: list[tuple[int, int]], timeout: float | None, *,
             any_signal: bool = False, restartable: bool = True,
             until: Callable[[], bool] | None = None) -> list[tuple[int, int]]:
        """Block the running thread until an fd in ``fds`` is ready, ``until()`` holds or
        ``timeout`` seconds pass; returns the ready fds. Other threads run meanwhile.

        With ``any_signal``, any host signal ends the wait too (wait4 wakes on SIGCHLD).

        Raises Interrupted when a signal the guest handles becomes deliverable: the
        blocking system call then returns -EINTR or, if it is ``restartable`` and the
        handler has SA_RESTART, runs again after the handler.
        """
        signals = self.process.signals
        thread = self.current
        deadline = None if timeout is None else time.monotonic() + timeout
        epoch = self.signal_epoch
        while True:
            ready = _poll(fds, 0) if fds else []
            if signals.poll_host():
                self.signal_epoch += 1
            if ready or (any_signal and self.signal_epoch != epoch) or (until and until()):
                return ready
            sig = signals.deliverable()
            if sig is not None:
                raise Interrupted(restartable and bool(signals.actions[sig].flags & SA_RESTART))
            if deadline is not None and time.monotonic() >= deadline:
                return []
            thread.wait = Wait(fds, deadline, any_signal)
            self.parked[thread] = None
            try:
                self._to_hub()
            finally:
                thread.wait = None

    def wake(self, thread: Thread) -> None:
        """Let a parked ``thread`` look again at what it waits for (a futex wake, a signal
        sent to it)."""
        if thread in self.parked:
            del self.parked[thread]
            self.runnable.append(thread)

    def _poll_host(self, block: bool) -> None:
        """Look at the host for the parked threads (blocking if nothing else can run) and
        make runnable those whose descriptor is ready, deadline passed or signal came."""
        signals = self.process.signals
        events: dict[int, int] = {signals.wake_r: select.POLLIN}
        deadline = None
        for thread in self.parked:
            for fd, ev in thread.wait.fds:
                events[fd] = events.get(fd, 0) | ev
            if thread.wait.deadline is not None:
                deadline = min(deadline or thread.wait.deadline, thread.wait.deadline)
        timeout_ms = 0.0
        if block:
            timeout_ms = None if deadline is None else max(deadline - time.monotonic(), 0) * 1000
        ready = {fd for fd, _ in _poll(list(events.items()), timeout_ms)}
        self.polled = time.monotonic()
        if signals.poll_host():
            self.signal_epoch += 1
        now = time.monotonic()
        for thread in list(self.parked):
            wait = thread.wait
            if ((wait.fds and any(fd in ready for fd, _ in wait.fds))
                    or (wait.deadline is not None and now >= wait.deadline)
                    or (wait.any_signal and signals.wake_r in ready)
                    or signals.deliverable(thread.signals) is not None):
                del self.parked[thread]
                self.runnable.append(thread)


def _poll(fds: list[tuple[int, int]], timeout_ms: float | None) -> list[tuple[int, int]]:
    poller = select.poll()
    for fd, events in fds:
        poller.register(fd, events)
    return poller.poll(timeout_ms)
