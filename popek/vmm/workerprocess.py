"""A worker process that outlives its VMM: how it starts, and how a VMM holds it.

Workers fork from multiprocessing's fork server, which has imported popek once (fast
starts, and no state of the VMM leaks into a guest's process). Each new worker then
detaches itself (:func:`detach`), before it reads any guest input:

- it starts a session of its own (``setsid``), so signals to the VMM's process group
  (Ctrl-C on its terminal, ``kill -TERM -PGID``) and the terminal's hangup never reach it;
- it forks once more and the fork server's child exits: the worker is reparented to the
  VMM, which made itself a "child subreaper" (:func:`become_subreaper`), so the VMM that
  starts a worker is its parent and gets its exact exit status; when that VMM ends, the
  kernel reparents the worker to init (or to the next subreaper up), and it runs on;
- it closes every descriptor it was not given (:func:`detach` keeps those of its
  arguments), and its stdio becomes ``/dev/null`` and a log file of its own. The fork
  server hands each child its liveness pipe and multiprocessing's resource tracker
  pipe, so that neither exits while a child lives, and the VMM's stdio, whose pipe's
  reader (``popek serve | tee``) would otherwise wait for the worker; closed, the helpers
  exit with the VMM, as a helper of a VMM should.

A VMM knows a worker by a pidfd (:class:`WorkerProcess`), not by its pid, so a pid the
kernel reuses can never make it signal another process. A VMM that adopts a worker it did
not start is not its parent: it learns that the worker ended (the pidfd becomes readable)
but not its status, so such a worker's end is explained by its exit record
(:mod:`popek.vmm.records`) or by the kernel's traces (cgroup OOM kills, seccomp's audit
log). Under systemd the VMM's unit needs ``KillMode=process`` (as libvirtd's has), else
stopping the service kills the whole cgroup tree, guests included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from popek.vmm import jail, procstat

# What the worker fork server imports before it forks (tests add a test build's hooks).
WORKER_PRELOAD = ["popek.vmm.warm"]
_PR_SET_CHILD_SUBREAPER = 36
# multiprocessing's Process is not thread-safe: each start() polls every earlier child
# (multiprocessing.process._cleanup), and a poll reads the child's exit status from the
# fork server's pipe. A join() polling the same child in another thread then reads the
# pipe's end instead and records exit status 255: with dozens of workers starting at
# once, one VMM request in a few hundred failed so. Every start and join holds this.
_PROCESSES = threading.Lock()


def become_subreaper() -> None:
    """Orphaned descendants of this process (the workers it starts, once the fork
    server's child that forked them exits) become its children."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"PR_SET_CHILD_SUBREAPER: {os.strerror(code)}")


async def start(target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
    """Run ``target(*args)`` in a new process forked by the fork server; returns once the
    process has detached (:func:`detach`). OSError if it could not."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    starter = ctx.Process(target=target, args=args, name=name)
    await asyncio.get_running_loop().run_in_executor(None, _start_and_join, starter)
    if starter.exitcode != 0:
        raise OSError(f"the worker did not start (exit status {starter.exitcode})")


def _start_and_join(starter: multiprocessing.Process) -> None:
    """Start ``starter`` and wait for it to exit (as soon as the worker is detached),
    its exit status read under the lock that starts hold (:data:`_PROCESSES`)."""
    with _PROCESSES:
        starter.start()
    multiprocessing.connection.wait([starter.sentinel])
    with _PROCESSES:
        starter.join()


def detach(ready: Callable[[], None], log: int) -> None:
    """In the fork server's child, first of all: leave the VMM's session, fork, and let the
    fork server's child exit once the worker (the grandchild, which returns from here)
    has called ``ready`` (it listens for its VMM then, so the VMM can connect at once).
    The worker's stdout and stderr go to ``log`` from then on."""
    os.setsid()
    done_r, done_w = os.pipe()
    if os.fork():
        os.close(done_w)
        os._exit(0 if os.read(done_r, 1) else 1)
    os.close(done_r)
    ready()
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((null, 0), (log, 1), (log, 2)):
        os.dup2(fd, target)
    os.close(null)
    keep = {0, 1, 2, done_w, *(multiprocessing.forkserver.get_inherited_fds() or ())}
    keep.discard(log)
    close_descriptors(keep)
    os.write(done_w, b"1")
    os.close(done_w)


def close_descriptors(keep: set[int]) -> None:
    """Close every descriptor of this process but ``keep``."""
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


class WorkerProcess:
    """A running worker, held by a pidfd. ``child``: this VMM started it, so it alone
    learns its exit status."""

    def __init__(self, pid: int, pidfd: int, start_time: int, child: bool) -> None:
        self.pid = pid
        self.start_time = start_time  # clock ticks after boot: a pid's identity, with it
        self.child = child
        self._pidfd = pidfd
        self._status: str | None = None

    @classmethod
    def open(cls, pid: int, start_time: int | None = None) -> WorkerProcess:
        """The process ``pid`` (started at ``start_time``, if known): ProcessLookupError if
        it is gone, or if the pid now names another process."""
        pidfd = os.pidfd_open(pid)
        started = procstat.start_time(pid)  # read after the pidfd holds the process
        if started is None or start_time not in (None, started):
            os.close(pidfd)
            raise ProcessLookupError(f"process {pid} is gone")
        return cls(pid, pidfd, started, child=procstat.parent(pid) == os.getpid())

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def wait(self, timeout: float) -> bool:
        """Whether the process ended within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        loop.add_reader(self._pidfd, lambda: ended.done() or ended.set_result(None))
        try:
            await asyncio.wait_for(ended, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._pidfd)

    def status(self) -> str | None:
        """How an ended child ended, in words (collecting it); None for a process this VMM
        did not start, whose status went to its own parent."""
        if self._status is None and self.child:
            with contextlib.suppress(ChildProcessError):
                result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
                if result is not None:
                    self._status = _describe(result, self.pid)
        return self._status

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _describe(result: os.waitid_result, pid: int) -> str:
    if result.si_code == os.CLD_EXITED:
        return f"worker exited with status {result.si_status}"
    if result.si_status == signal.SIGSYS:
        return "worker " + jail.violation(pid)
    return f"worker killed by signal {result.si_status} ({signal.Signals(result.si_status).name})"
