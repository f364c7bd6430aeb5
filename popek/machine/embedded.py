"""``popek.Machine``: a guest driven from Python, in this process.

The guest runs through the one machine runner on a thread of its own (it sleeps while
the guest idles). Every operation from the program's thread (typing, pause, snapshot,
statistics) is handed to that thread and done between two of the runner's steps, so it
sees the machine at rest; a pipe wakes the runner for it, as any host event does::

    with popek.Machine(mem="128M") as vm:          # the bundled Linux, as popek run boots it
        output, status = vm.console.run("uname -m")
        vm.snapshot("vm.snap")
    with popek.Machine.restore("vm.snap") as clone:
        print(clone.console.run("echo again"))
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

from popek.machine.agent import NO_AGENT, AgentError
from popek.machine.cli import run_defaults
from popek.machine.config import MachineConfig, config_from_settings
from popek.machine.expect import DEFAULT_TIMEOUT, Console
from popek.machine.session import GuestSession
from popek.stats import trap_names
from popek.vmm import procstat
from popek.vmm import snapshot as snapshots

T = TypeVar("T")


class MachineError(Exception):
    """An operation the machine cannot do now (not started, already stopped)."""


class Machine:
    """A guest with ``popek run``'s settings, as keyword arguments named after them
    (``kernel``, ``initrd``, ``append``, ``disks``, ``nics``, ``mem``, ``cpus``, ``bios``,
    ``engine``...; values as the flags take them or as Python values). With no kernel it
    is the bundled Linux with a writable copy of the bundled disk, as ``popek run``.
    ``console_log``: a file that gets everything the console prints."""

    def __init__(self, *, console_log: str | Path | None = None, **settings: Any) -> None:
        config = config_from_settings(**settings)
        self._setup(run_defaults(config, disks_given="disks" in settings), None, console_log)

    @classmethod
    def restore(cls, path: str | Path, *, console_log: str | Path | None = None) -> Machine:
        """The machine a snapshot file holds (checked whole first), not yet started; it
        carries on where it was saved, its RAM mapped copy-on-write from the file."""
        snap = snapshots.load(Path(path))
        machine = cls.__new__(cls)
        machine._setup(snap.config, snap, console_log)
        return machine

    def _setup(self, config: MachineConfig, snap: snapshots.Snapshot | None,
               console_log: str | Path | None) -> None:
        self.config = config
        self._snapshot = snap
        self._log_path = console_log
        self._log = None
        self.console = Console(self._type, restored=snap is not None)
        self._session: GuestSession | None = None
        self._thread: threading.Thread | None = None
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = -1, -1
        self._stop = False
        self._finished = False  # the thread took its last call
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> Machine:
        """Boot (or carry on from the snapshot). Image and configuration errors are raised
        here; the guest then runs on its own thread."""
        if self._session is not None:
            raise MachineError("the machine has been started already")
        self._log = open(self._log_path, "wb", buffering=0) if self._log_path else None  # noqa: SIM115
        self._session = GuestSession(self.config, self._output, self._snapshot)
        self._snapshot = None  # its RAM mapping now belongs to the machine
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._session.runner.sources.watch(self._wake_r, self._do_calls)
        self._thread = threading.Thread(target=self._run, name="popek-machine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int | None:
        """Switch the guest off (at once, as pulling the plug) and free everything; returns
        its exit code if it had powered off by itself. Stopping twice is harmless."""
        if self._thread is not None and self._thread.is_alive():
            with self._lock:  # the thread, seeing _stop, may close its end meanwhile
                self._stop = True
                if not self._finished:
                    self._wake()
            self._thread.join()
        if self._wake_w >= 0:
            os.close(self._wake_w)
            self._wake_w = -1
        return self.exit_code

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to power off; its exit code (None if it still runs)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.exit_code

    @property
    def exit_code(self) -> int | None:
        return self._session.exit_code if self._session is not None else None

    @property
    def running(self) -> bool:
        """Started, not stopped, not powered off (a paused guest is running)."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- operations ---------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop the harts; the guest's clock stops with them."""
        self._call(lambda: self._session.runner.pause())

    def resume(self) -> None:
        self._call(lambda: self._session.runner.resume())

    @property
    def paused(self) -> bool:
        return self._session is not None and not self._session.runner.running

    def snapshot(self, path: str | Path) -> dict[str, Any]:
        """Save harts, devices and RAM to ``path`` (disks are flushed, not copied); a
        running guest carries on. Returns the file's size and the RAM bytes stored."""
        def save() -> dict[str, Any]:
            self._session.runner.hold_clock()
            saved = snapshots.save(Path(path), self._session.machine)
            return {"path": str(saved.path), "file_bytes": saved.file_bytes,
                    "ram_bytes": saved.ram_bytes, "seconds": saved.seconds}
        return self._call(save)

    def stats(self) -> dict[str, Any]:
        """Instructions retired (across reboots), traps by cause, and memory: the guest's
        RAM and this process's resident set. After the guest stopped: its final ones."""
        def gather() -> dict[str, Any]:
            session = self._session
            return {"instructions": session.instructions,
                    "traps": trap_names(dict(session.traps)),
                    "memory": {"guest_bytes": self.config.mem,
                               "rss_bytes": procstat.memory(os.getpid()).get("rss")}}
        return gather() if self._finished else self._call(gather)

    # -- the guest agent ----------------------------------------------------------------------
    def exec(self, command: str | Sequence[str], input: bytes | str = b"",  # noqa: A002
             timeout: float | None = DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``command`` (a list of arguments, or a string for ``sh -c``) in the guest
        through its agent, waiting for the agent up to ``timeout`` seconds if the guest is
        still booting; stdout and stderr are bytes, exactly as the command wrote them.
        AgentError if the guest has no agent, TimeoutError if the command overruns."""
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        data = input.encode() if isinstance(input, str) else bytes(input)
        deadline = None if timeout is None else time.monotonic() + timeout
        link = self._call(lambda: self._session.agent)
        if link is None:
            raise AgentError("this machine has no agent port (agent=False)")
        if not link.opened.wait(timeout):
            raise AgentError(f"{NO_AGENT} (waited {timeout:g} s)")
        outcome: Future = Future()

        def done(result: subprocess.CompletedProcess | Exception) -> None:
            if isinstance(result, Exception):
                outcome.set_exception(result)
            else:
                outcome.set_result(result)
        self._call(lambda: self._session.agent.start(argv, data, done))
        try:
            return outcome.result(None if deadline is None else
                                  max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            self._call(lambda: link.abandon("timed out"))
            raise TimeoutError(f"{argv!r} ran longer than {timeout:g} s in the guest") from None

    def copy_in(self, source: str | Path, guest_path: str) -> None:
        """Copy the host file ``source`` to ``guest_path`` in the guest (as ``vm cp``)."""
        self._check(self.exec(["sh", "-c", 'cat > "$1"', "sh", guest_path],
                              Path(source).read_bytes()), guest_path)

    def copy_out(self, guest_path: str, target: str | Path) -> None:
        """Copy the guest's file ``guest_path`` to the host file ``target``."""
        Path(target).write_bytes(self._check(self.exec(["cat", guest_path]), guest_path))

    @staticmethod
    def _check(result: subprocess.CompletedProcess, path: str) -> bytes:
        if result.returncode:
            raise AgentError(f"{path}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    # -- the machine's thread -----------------------------------------------------------------
    def _run(self) -> None:
        session = self._session
        try:
            while not self._stop and session.step():
                pass
        except BaseException as err:  # reported to whoever calls next
            self._error = err
        finally:
            session.close()
            with self._lock:
                self._finished = True
                os.close(self._wake_r)
                self._fail_calls()
            self.console.close()
            if self._log is not None:
                self._log.close()

    def _output(self, data: bytes) -> None:
        if self._log is not None:
            self._log.write(data)
        self.console.output(data)

    def _type(self, data: bytes) -> None:
        self._call(lambda: self._session.machine.feed_input(data))

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the machine's thread, between two steps; its result or exception."""
        if self._thread is None:
            raise MachineError("the machine has not been started (start() or with)")
        future: Future = Future()
        with self._lock:
            self._calls.put((fn, future))
            if self._finished:
                self._fail_calls()
            else:
                self._wake()
        return future.result()

    def _wake(self) -> None:
        """Wake the machine's thread (called with the lock held, while it still reads)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def _do_calls(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except Exception as err:  # the caller's to handle
                future.set_exception(err)

    def _fail_calls(self) -> None:
        why = f"the guest stopped ({self._error!r})" if self._error else \
            f"the guest has powered off (exit code {self.exit_code})" \
            if self.exit_code is not None else "the machine was stopped"
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            future.set_exception(MachineError(why))

