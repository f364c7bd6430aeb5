"""One guest in one host process: the VMM's unit of isolation and of scheduling.

A worker builds (or restores) its machine, reports ``ready``, then runs slices while
the VMM lets it, between slices answering commands from its channel: start, pause,
resume, console input, snapshot, CPU cap. A guest can only hurt its own worker: the
worker confines itself before it reads any guest input (:mod:`popek.vmm.jail`: its own
uid, no capabilities, a seccomp filter) and uses only files the VMM opened for it; a
popek bug the guest triggers ends this process (reported as ``failed``), its CPU and
memory are held by its cgroup (or, failing that, by itself: the CPU cap and
``RLIMIT_AS``), and a flood of output blocks only this worker's sends. Paused, the
worker sleeps in ``select`` and the guest's clock stands still.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popek.machine.config import ConfigError, config_from_json
from popek.machine.loader import ImageError
from popek.machine.virt import VirtMachine
from popek.vmm import hostfiles, jail, snapshot
from popek.vmm.channel import INPUT, JSON, OUTPUT, ChannelClosed, WorkerEnd
from popek.vmm.throttle import CpuCap

STATS_INTERVAL = 0.25  # seconds between the statistics a running worker pushes
EXIT_FAILED = 3


def main(sock: socket.socket, spec: dict[str, Any]) -> None:
    """Process entry point. ``spec``: ``{"config": ...}`` to boot or ``{"restore": path}``,
    the ``files`` they name (:class:`~popek.vmm.hostfiles.HostFiles`) and a ``file_socket``
    that brings files opened later, plus ``cpu_cap`` (percent or None) and ``mem_overhead``
    (bytes or None) to enforce, ``cgroup_procs`` (files) to join and ``ids`` (uid, gid) to
    take. The worker confines itself first of all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the VMM, which stops us
    chan = WorkerEnd(sock)
    try:
        warnings = jail.confine(spec.get("cgroup_procs", ()), spec.get("ids"))
    except Exception as err:  # it must not run unconfined
        _fail(chan, f"cannot confine the worker: {err}")
    worker = Worker(chan, spec)
    worker.warnings = warnings
    try:
        worker.serve()
    except ChannelClosed:
        os._exit(0)  # the VMM is gone: nobody is left to run for
    except MemoryError:
        worker.lift_memory_limit()  # first, allocating nothing: room to report the failure
        _fail(chan, "the guest made popek exceed the VM's memory limit")
    except Exception:  # any popek bug the guest triggers ends only this VM
        _fail(chan, "internal error: " + traceback.format_exc(limit=-3).strip())


def _fail(chan: WorkerEnd, reason: str) -> None:
    try:
        chan.send(JSON, {"op": "failed", "reason": reason})
    except ChannelClosed:
        pass
    os._exit(EXIT_FAILED)


class Worker:
    """The guest's machine and the loop that runs it between the VMM's commands."""

    def __init__(self, chan: WorkerEnd, spec: dict[str, Any]) -> None:
        self.chan = chan
        self.spec = spec
        self.out = bytearray()
        self.console_bytes = 0  # everything the guest ever printed, for snapshot offsets
        self.traps: Counter[int] = Counter()
        # Added to the harts' instret to count what this VM executed: the instructions of
        # machines a reboot replaced, less the count a restored machine started with.
        self.instret_offset = 0
        self.running = False
        self.frozen_clock: dict[str, Any] | None = None
        self.cap = CpuCap(spec.get("cpu_cap"))
        self.machine: VirtMachine | None = None
        self.lift_memory_limit: Callable[[], None] = lambda: None
        self.warnings: list[str] = []  # about its confinement, for the VMM to show

    # -- life cycle -----------------------------------------------------------------------
    def serve(self) -> None:
        try:
            self.machine = self._build()
        except (ConfigError, ImageError, snapshot.SnapshotError, OSError) as err:
            self.chan.send(JSON, {"op": "error", "message": str(err)})
            return
        self._limit_memory()
        self.frozen_clock = self.machine.clint.save_state()
        self.chan.send(JSON, {"op": "ready", "config": self.spec.get("config"),
                              "console_bytes": self.console_bytes, "warnings": self.warnings})
        self._loop()

    def _build(self, fresh: bool = False) -> VirtMachine:
        """The machine from the spec: restored from its snapshot, or (``fresh``, and after
        a reboot) booted from its images."""
        if "restore" in self.spec and not fresh:
            snap = snapshot.load(self.spec["restore"], self.spec["files"].open)
            self.spec["config"] = snap.meta["config"]
            self.console_bytes = int(snap.meta.get("console_bytes", 0))
            machine = snap.machine(self._console_out)
            self.instret_offset -= sum(hart.instret for hart in machine.harts)
        else:
            machine = VirtMachine(config_from_json(self.spec["config"]), self._console_out,
                                  opener=self.spec["files"].open)
        self._count_traps(machine)
        return machine

    def _limit_memory(self) -> None:
        """RAM is mapped already: what the process may add is the overhead allowance.

        Only the soft limit is set: guest code cannot change it, and the worker lifts it
        to report a MemoryError before it exits."""
        overhead = self.spec.get("mem_overhead")
        if overhead is not None:
            hard = resource.getrlimit(resource.RLIMIT_AS)[1]
            self.lift_memory_limit = functools.partial(
                resource.setrlimit, resource.RLIMIT_AS, (hard, hard))
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + overhead, hard))

    def _count_traps(self, machine: VirtMachine) -> None:
        for hart in machine.harts:
            inner = hart.on_trap

            def on_trap(cause: int, tval: int, pc: int, inner=inner) -> int:
                self.traps[cause] += 1
                return inner(cause, tval, pc)

            hart.on_trap = on_trap

    def _console_out(self, data: bytes) -> None:
        self.out += data

    def _loop(self) -> None:
        next_stats = 0.0
        while True:
            machine = self.machine
            wait: float | None = None
            if self.running:
                wait = self.cap.delay()
                if not wait:
                    wait = 0.0 if machine.run_slice() else machine.idle_seconds()
                    self._flush_output()
                    if machine.exit is not None and not self._guest_finished():
                        return
                else:
                    self.cap.slept(wait)
            if time.monotonic() >= next_stats:
                self._send_stats()
                next_stats = time.monotonic() + STATS_INTERVAL
            for tag, payload in self.chan.poll(wait):
                if tag == INPUT:
                    machine.feed_input(payload)
                elif tag == JSON:
                    self._command(payload)

    def _guest_finished(self) -> bool:
        """The guest powered off (False: stop) or rebooted (True: carry on, fresh)."""
        kind, code = self.machine.exit
        if kind == "reboot":
            self.instret_offset += self._instret()
            for disk in self.machine.disks:
                disk.close()
            self.machine = self._build(fresh=True)
            return True
        self._send_stats()
        self.chan.send(JSON, {"op": "exit", "kind": kind, "code": code})
        return False

    # -- commands -------------------------------------------------------------------------
    def _command(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        reply: dict[str, Any] = {"op": "reply", "id": msg.get("id"), "ok": True}
        try:
            if op in ("start", "resume"):
                self._set_running(True)
            elif op == "pause":
                self._set_running(False)
            elif op == "cap":
                self.cap.set(msg.get("percent"))
            elif op == "snapshot":
                reply["result"] = self._snapshot(msg["path"])
            else:
                raise ValueError(f"unknown command {op!r}")
        except (ValueError, snapshot.SnapshotError) as err:
            reply.update(ok=False, error=str(err))
        self._send_stats()
        self.chan.send(JSON, reply)

    def _set_running(self, running: bool) -> None:
        """The guest's clock stops while it is paused and resumes where it stood."""
        if running and not self.running:
            self.machine.clint.load_state(self.frozen_clock)
            self.cap.delay()  # no allowance is earned while paused
        elif not running and self.running:
            self.frozen_clock = self.machine.clint.save_state()
        self.running = running

    def _snapshot(self, path: str) -> dict[str, Any]:
        if not self.running:
            self.machine.clint.load_state(self.frozen_clock)  # mtime as it stood at pause
        fd = hostfiles.receive(self.spec["file_socket"])  # the VMM made the file
        try:
            saved = snapshot.write(fd, Path(path), self.machine,
                                   {"console_bytes": self.console_bytes})
        finally:
            os.close(fd)
        return {"path": str(saved.path), "file_bytes": saved.file_bytes,
                "ram_bytes": saved.ram_bytes, "seconds": saved.seconds,
                "console_bytes": self.console_bytes}

    # -- reporting ------------------------------------------------------------------------
    def _flush_output(self) -> None:
        if self.out:
            self.console_bytes += len(self.out)
            self.chan.send(OUTPUT, self.out)
            self.out.clear()

    def _instret(self) -> int:
        return sum(hart.instret for hart in self.machine.harts)

    def _send_stats(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.chan.send(JSON, {
            "op": "stats", "running": self.running,
            "instructions": self.instret_offset + self._instret(),
            "traps": {str(cause): n for cause, n in self.traps.items()},
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "throttled_seconds": self.cap.throttled,
            "console_bytes": self.console_bytes,
        })


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")
