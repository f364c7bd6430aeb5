"""Tier 2's compiler thread: LLVM's work on hot blocks runs beside the vCPU, not in its way.

llvmlite calls LLVM through ctypes, which releases the GIL, so parsing, optimizing and
generating code for a batch of blocks can run on a second core while the vCPU thread
keeps running those blocks on tier 1. One thread serves every hart of the process: the
vCPU threads hand it jobs and install what it produced at their own safe points.

Every use of LLVM, on this thread or another, holds ``LLVM_LOCK``: a job's calls on one
execution engine (add, finalize, look up, remove) must not interleave with another's,
and an engine must not be replaced in the middle of a job.

A thread inside LLVM when the process forks would leave the child with LLVM's and
llvmlite's locks held forever (``popek exec`` forks for the guest's fork, the VMM forks
its workers), so the thread is stopped before every fork (its current job finishes,
queued ones wait) and started again after it, in parent and child alike, only if jobs
wait. It is stopped the same way at exit, so LLVM never runs under its own teardown.

Each return from LLVM needs the GIL back, which the vCPU thread, always running Python
or native code that holds it, gives up only when asked and after the interpreter's
switch interval (5 ms by default): about ten such waits per batch doubled the time
before a hot block went native. The interval is shortened while this thread exists;
with no other thread wanting the GIL it costs the vCPU nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections import deque
from collections.abc import Callable

LLVM_LOCK = threading.Lock()
SWITCH_INTERVAL = 0.0005  # seconds the vCPU thread may keep the GIL from this one


class CompilerThread:
    """A queue of jobs run in order on one daemon thread, started when jobs wait."""

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the thread, holding LLVM_LOCK; it must not raise."""
        with self._changed:
            self._jobs.append(job)
            self._start()
            self._changed.notify_all()

    def wait_idle(self) -> None:
        """Return once every job submitted so far has run."""
        with self._changed:
            self._start()
            while self._jobs or self._busy:
                self._changed.wait()

    def stop(self) -> None:
        """Let the current job finish and end the thread; queued jobs wait for ``resume``."""
        with self._changed:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._changed.notify_all()
        thread.join()
        with self._changed:
            self._thread = None
            self._stopping = False

    def resume(self) -> None:
        """Start the thread again if jobs wait (after a fork)."""
        with self._changed:
            self._start()

    def _start(self) -> None:
        if self._thread is None and self._jobs:
            sys.setswitchinterval(SWITCH_INTERVAL)
            self._thread = threading.Thread(target=self._serve, name="popek-llvm", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._jobs and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                with LLVM_LOCK:
                    job()
                    del job  # what it holds (an old engine, say) goes under the lock
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()


COMPILER = CompilerThread()
os.register_at_fork(before=COMPILER.stop, after_in_parent=COMPILER.resume,
                    after_in_child=COMPILER.resume)
atexit.register(COMPILER.stop)
