"""One guest in one host process: the VMM's unit of isolation and of scheduling.

A worker builds (or restores) its machine, reports ``ready``, then runs slices while
the VMM lets it, between slices answering commands from its channel: start, pause,
resume, console input, snapshot, CPU cap. A guest can only hurt its own worker: the
worker confines itself before it reads any guest input (:mod:`popek.vmm.jail`: its own
uid, no capabilities, a seccomp filter) and uses only files the VMM opened for it; a
popek bug the guest triggers ends this process (reported as ``failed``), its CPU and
memory are held by its cgroup (or, failing that, by itself: the CPU cap and
``RLIMIT_AS``), and a flood of output blocks only this worker's sends. The machine runs
through the one machine runner (:mod:`popek.machine.runner`), whose host event sources
are the VMM's channel and the NICs' sockets; paused, the worker waits on them alone and
the guest's clock stands still.

A worker outlives its VMM (:mod:`popek.vmm.workerprocess`). When its channel closes it
carries on as it was, running or paused, keeping the console's last output in a bounded
ring, and the runner watches its listening socket for the next VMM
(:func:`popek.vmm.channel.accept`) instead; to that one it reports ``ready`` again, with
its state, and hands over the ring, so the new VMM shows the console's history, output
printed while no VMM was there included. However the
worker ends, if it can it writes its exit record first (:mod:`popek.vmm.records`):
how the guest ended, or why the worker failed, and the ring; so a guest that powers off
while no VMM runs is listed stopped, with its exit code and last words, by the next.
"""

from __future__ import annotations

import base64
import contextlib
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

from popek.cpu.physmem import PAGE_SHIFT, DirtyLog
from popek.gdb.server import MachineDebugger
from popek.machine.agent import AgentLink, relink
from popek.machine.config import ConfigError, config_from_json
from popek.machine.loader import ImageError
from popek.machine.runner import EventSources, MachineRunner
from popek.machine.virt import VirtMachine
from popek.stats import count_traps
from popek.vmm import (
    agent_exec,
    channel,
    hostfiles,
    jail,
    pagesharing,
    records,
    snapshot,
    swap,
    workerprocess,
)
from popek.vmm.channel import (
    DEBUG_IN,
    DEBUG_OUT,
    INPUT,
    JSON,
    OUTPUT,
    ChannelClosed,
    Message,
    WorkerEnd,
)
from popek.vmm.console import Scrollback
from popek.vmm.migration import Arrival, Emigration, MigrationError, immigrate
from popek.vmm.migration_postcopy import PagesLost
from popek.vmm.template import Restored
from popek.vmm.throttle import CpuCap

STATS_INTERVAL = 0.25  # seconds between the statistics a running worker pushes
BALLOON_STATS_INTERVAL = 5.0  # seconds between requests for the guest's memory statistics
FIRST_VMM_TIMEOUT = 120.0  # seconds the VMM that started a worker has to connect
EXIT_FAILED = 3


def main(listener: socket.socket, spec: dict[str, Any],
         restored: Restored | None = None) -> None:
    """Process entry point. ``listener``: the socket the VMM bound for this VM, on which
    the worker listens for its VMM, this one and the next. ``spec``: ``{"config": ...}``
    to boot or ``{"restore": path}``, the ``files`` they name
    (:class:`~popek.vmm.hostfiles.HostFiles`), ``nics`` (the host end of each NIC, opened
    by the VMM: :class:`~popek.net.endpoint.HostEnd`), the ``vm_id``, the ``vmm_uid`` that may
    connect, the ``exit_record`` to write as it ends and the ``log`` for its stdout and
    stderr, plus ``cpu_cap`` (percent or None) and ``mem_overhead`` (bytes or None) to
    enforce, ``cgroup_procs`` (files) to join and ``ids`` (uid, gid) to take. The worker
    detaches from the VMM and confines itself first of all. ``restored``: the machine of
    the spec's snapshot, which the restore template this worker forked from built
    (:mod:`popek.vmm.template`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the VMM
    workerprocess.detach(listener.listen, spec["log"].detach())
    worker = Worker(listener, spec, restored)
    if spec.get("page_sharing"):
        pagesharing.share_process_memory()  # before confinement: prctl is not allowed after
    with contextlib.suppress(OSError):  # nor is reading its own page map, once another uid
        worker.pagemap = os.open(swap.PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    try:
        worker.warnings = jail.confine(spec.get("cgroup_procs", ()), spec.get("ids"))
    except Exception as err:  # it must not run unconfined
        worker.fail(f"cannot confine the worker: {err}")
    try:
        worker.serve()
    except MemoryError:
        worker.lift_memory_limit()  # first, allocating nothing: room to report the failure
        worker.fail("the guest made popek exceed the VM's memory limit")
    except PagesLost as err:
        worker.fail(str(err))
    except Exception:  # any popek bug the guest triggers ends only this VM
        worker.fail("internal error: " + traceback.format_exc(limit=-3).strip())
    os._exit(0)


class VmmLink:
    """The worker's end of its link to a VMM: at most one VMM at a time, none at times.

    The runner's event sources watch the attached VMM's channel, or, while none is
    attached, the listening socket. Sends while no VMM is attached are dropped (the
    console's output stays in the worker's ring); a channel that fails detaches the VMM,
    and the worker waits for the next."""

    def __init__(self, listener: socket.socket, vmm_uid: int, sources: EventSources,
                 on_attach: Callable[[], None],
                 on_frames: Callable[[list[Message]], None]) -> None:
        self.listener = listener
        self.vmm_uid = vmm_uid
        self.sources = sources
        self.on_attach = on_attach
        self.on_frames = on_frames
        self.chan: WorkerEnd | None = None
        self.files: socket.socket | None = None  # brings the attached VMM's files
        sources.watch(listener.fileno(), self._accept)

    def send(self, tag: bytes, payload: Any) -> None:
        if self.chan is not None:
            try:
                self.chan.send(tag, payload)
            except ChannelClosed:
                self.detach()

    def detach(self) -> None:
        self.sources.watch(self.chan.fileno(), None)
        self.chan.sock.close()
        self.files.close()
        self.chan = self.files = None
        self.sources.watch(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        attached = channel.accept(self.listener, self.vmm_uid)
        if attached is not None:
            self.chan, self.files = attached
            self.sources.watch(self.listener.fileno(), None)
            self.sources.watch(self.chan.fileno(), self._receive)
            self.on_attach()

    def _receive(self) -> None:
        try:
            frames = self.chan.receive()
        except ChannelClosed:
            self.detach()
            return
        self.on_frames(frames)

    def wait_for_vmm(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.chan is None and time.monotonic() < deadline:
            self.sources.dispatch(deadline - time.monotonic())
        return self.chan is not None


class _DebugLink:
    """A debugger's connection that the VMM relays: the stub's bytes go on the channel."""

    def __init__(self, link: VmmLink) -> None:
        self.link = link

    def sendall(self, data: bytes) -> None:
        if data:
            self.link.send(DEBUG_OUT, data)

    def close(self) -> None:
        self.link.send(DEBUG_OUT, b"")


class Worker:
    """The guest's machine and the loop that runs it between the VMM's commands."""

    def __init__(self, listener: socket.socket, spec: dict[str, Any],
                 restored: Restored | None = None) -> None:
        self.spec = spec
        self.restored = restored  # the machine to start with, if a template built it
        self.exit_record: int = spec["exit_record"].detach()
        # What the machine printed since the last flush (a template's machine prints here)
        self.out = restored.console if restored is not None else bytearray()
        # The console's last output and everything the guest ever printed (for snapshot
        # offsets): the history a VMM that attaches gets.
        self.console = Scrollback()
        self.traps: Counter[int] = Counter()
        # Added to the harts' instret to count what this VM executed: the instructions of
        # machines a reboot replaced, less the count a restored machine started with.
        self.instret_offset = 0
        self.running = False
        self.started = False
        self.machine_ready = False
        self.frozen_clock: dict[str, Any] | None = None
        self.cap = CpuCap(spec.get("cpu_cap"))
        self.runner = MachineRunner(self.cap)
        self.runner.running = False
        self.link = VmmLink(listener, spec["vmm_uid"], self.runner.sources, self._greet,
                            self._commands)
        self.debugger = MachineDebugger(self.runner)  # popek vm debug
        # The network outlives the machine: a reboot builds a new one on the same ends.
        self.nets = [end.backend() for end in spec.get("nics", [])]
        self.machine: VirtMachine | None = None
        self.agent: AgentLink | None = None  # the guest agent (vm exec), per machine
        self.lift_memory_limit: Callable[[], None] = lambda: None
        self.warnings: list[str] = []  # about its confinement, for the VMM to show
        self.next_balloon_stats = 0.0
        self.migration: Emigration | None = None  # this guest leaving, live
        self.migration_id: Any = None  # the VMM's command, answered when it is over
        self.arrival: Arrival | None = None  # this guest came by migration
        self.resumed_at: float | None = None  # and ran here from then (wall clock)
        # The latest snapshot this worker wrote, and the pages written since (for a diff)
        self.last_snapshot: snapshot.Base | None = None
        self.snapshot_log: DirtyLog | None = None
        # Swap-out: the machine's swapper, the file the VMM made (kept for the worker's
        # life), and this process's page map (opened before confinement, or None).
        self.swapper: swap.Swapper | None = None
        self.swap_file: swap.SwapFile | None = None
        self.pagemap: int | None = None

    # -- life cycle -----------------------------------------------------------------------
    def serve(self) -> None:
        if not self.link.wait_for_vmm(FIRST_VMM_TIMEOUT):
            self._record_exit({"failure": "no VMM connected to the new worker"})
            return
        try:
            self.machine = self._build()
        except (ConfigError, ImageError, snapshot.SnapshotError, MigrationError,
                OSError) as err:
            self.link.send(JSON, {"op": "error", "message": str(err)})
            self._record_exit({"failure": str(err)})
            return
        self._limit_memory()
        self.frozen_clock = self.machine.clint.save_state()
        self.machine_ready = True
        if self.arrival is not None:  # all else is done: the guest runs the moment GO comes
            self.started = True
            self._set_running(self.arrival.wait_for_go())  # no GO: paused (migration.py)
            self.resumed_at = time.time() if self.running else None
            if self.running and self.arrival.postcopy is not None:
                self.runner.sources.watch(self.arrival.conn.sock.fileno(), self._pushed_page)
            for nic in self.machine.nics:
                nic.announce()  # switches learn where the guest is now
        self._greet()
        self._loop()

    def _greet(self) -> None:
        """A VMM attached: once the machine is built, tell it what it needs to show this
        VM (the first one, that it is ready; a later one, its state and history too). A
        debugger the last VMM relayed has gone with it."""
        if self.debugger.stub is not None:
            self.debugger.stub.detach()
            self.debugger.after_step()
        if not self.machine_ready:
            return
        state = "running" if self.running else "paused" if self.started else "created"
        self.link.send(JSON, {"op": "ready", "vm": self.spec["vm_id"], "state": state,
                              "config": self.spec.get("config"),
                              "console_bytes": self.console.total,
                              "history_bytes": len(self.console.data),
                              "warnings": self.warnings,
                              **({"resumed_at": self.resumed_at} if self.resumed_at else {})})
        if self.console.data:
            self.link.send(OUTPUT, self.console.data)
        self._send_stats()

    def fail(self, reason: str) -> None:
        """End the worker for ``reason``, telling the VMM if one is attached."""
        self.link.send(JSON, {"op": "failed", "reason": reason})
        self._record_exit({"failure": reason})
        os._exit(EXIT_FAILED)

    def _record_exit(self, how: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # a full disk must not keep the worker alive
            records.write_exit_fd(self.exit_record, {**how,
                                                     "console_bytes": self.console.total},
                                  self.console.data)

    def _build(self, fresh: bool = False) -> VirtMachine:
        """The machine from the spec: restored from its snapshot, or (``fresh``, and after
        a reboot) booted from its images."""
        if "restore" in self.spec and not fresh:
            if self.restored is not None:
                machine, meta = self.restored.machine, self.restored.meta
                self.restored = None  # a reboot boots afresh
            else:
                snap = snapshot.load(self.spec["restore"], self.spec["files"].open)
                machine, meta = snap.machine(self._console_out, nets=self.nets,
                                             events=self.runner.sources), snap.meta
            self.spec["config"] = meta["config"]
            self.console.total = int(meta.get("console_bytes", 0))
            self.instret_offset -= sum(hart.instret for hart in machine.harts)
        elif "incoming" in self.spec and not fresh:
            machine = self._immigrate()
        else:
            machine = VirtMachine(config_from_json(self.spec["config"]), self._console_out,
                                  nets=self.nets, events=self.runner.sources,
                                  opener=self.spec["files"].open)
        if self.spec.get("page_sharing"):
            pagesharing.share_guest_ram(machine.mem.ram)
        count_traps(machine.harts, self.traps)
        self.swapper = swap.Swapper(machine.mem, self.pagemap)
        self.runner.machine = machine
        self.agent = relink(self.agent, machine.agent_port, agent_exec.MAX_OUTPUT)
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

    def _console_out(self, data: bytes) -> None:
        self.out += data

    def _loop(self) -> None:
        """The machine runner's steps; between them, output and statistics go to the VMM
        (if one is attached). Paused, the runner waits on its event sources alone."""
        next_stats = 0.0
        while True:
            self.runner.step(0.0 if self.migration is not None else
                             max(0.0, next_stats - time.monotonic()) if self.running else None)
            if not self.debugger.after_step():  # the debugger killed the guest
                self.debugger.killed = False
                self.machine.request_shutdown("killed", 0)
            if self.migration is not None and self._migrate_step():
                return
            if self.running:
                self._flush_output()
                if self.machine.exit is not None and not self._guest_finished():
                    return
            if time.monotonic() >= next_stats:
                self._send_stats()
                next_stats = time.monotonic() + STATS_INTERVAL

    def _commands(self, frames: list[Message]) -> None:
        self._flush_output()  # what the guest printed comes before any reply (and snapshot)
        for tag, payload in frames:
            if tag == INPUT:
                self.machine.feed_input(payload)
            elif tag == DEBUG_IN and self.debugger.stub is not None:
                if payload:
                    self.debugger.stub.feed(payload)
                else:
                    self.debugger.stub.detach()
            elif tag == JSON:
                self._command(payload)

    def _guest_finished(self) -> bool:
        """The guest powered off (False: stop) or rebooted (True: carry on, fresh)."""
        kind, code = self.machine.exit
        if kind == "reboot":
            self._forget_snapshot_base()  # the new machine has new memory
            self.swapper.close()
            self.instret_offset += self._instret()
            self.machine.close()
            self.machine = self._build(fresh=True)
            return True
        self._send_stats()
        self.link.send(JSON, {"op": "exit", "kind": kind, "code": code})
        self._record_exit({"kind": kind, "code": code})
        return False

    # -- commands -------------------------------------------------------------------------
    def _command(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op in agent_exec.OPS:  # replies when the guest's command ends
            agent_exec.worker_command(self.agent, msg, lambda r: self.link.send(JSON, r))
            return
        reply: dict[str, Any] = {"op": "reply", "id": msg.get("id"), "ok": True}
        try:
            if self.migration is not None and op in ("pause", "snapshot", "migrate", "debug",
                                                     "swap_out"):
                raise ValueError(f"cannot {op}: the guest is migrating")
            if self.debugger.stub is not None and op in ("pause", "resume", "migrate", "debug"):
                raise ValueError(f"cannot {op}: a debugger holds the guest")
            if op == "migrate":
                self._emigrate(msg)
                return  # answered when the migration is over
            if op in ("start", "resume"):
                self._set_running(True)
            elif op == "pause":
                self._set_running(False)
            elif op == "debug":
                self._debug()
            elif op == "cap":
                self.cap.set(msg.get("percent"))
            elif op == "balloon":
                self._balloon(msg.get("bytes"))
            elif op == "snapshot":
                reply["result"] = self._snapshot(msg["path"], msg.get("diff"))
            elif op == "replug":
                self._replug(msg.get("nic"))
            elif op == "swap_out":
                reply["result"] = self._swap_out()
            elif op == "swap_in":
                self.swapper.swap_in()
                reply["result"] = {"swapped_bytes": 0}
            else:
                raise ValueError(f"unknown command {op!r}")
        except (ValueError, snapshot.SnapshotError, MigrationError, swap.SwapError) as err:
            reply.update(ok=False, error=str(err))
        self._send_stats()
        self.link.send(JSON, reply)

    def _debug(self) -> None:
        """A debugger attaches through the VMM (``popek vm debug``): the guest halts
        until it continues, and its bytes travel on this channel."""
        if not self.running:
            raise ValueError("cannot debug: the guest is not running (start or resume it)")
        self.debugger.attach(_DebugLink(self.link))

    def _set_running(self, running: bool) -> None:
        """The guest's clock stops while it is paused and resumes where it stood."""
        if running and not self.running:
            self.started = True
            self.machine.clint.load_state(self.frozen_clock)
            self.cap.delay()  # no allowance is earned while paused
        elif not running and self.running:
            self.frozen_clock = self.machine.clint.save_state()
        self.running = self.runner.running = running

    def _balloon(self, guest_bytes: Any) -> None:
        """Leave the guest ``guest_bytes`` of its RAM: the balloon takes the rest."""
        balloon = self.machine.balloon
        if balloon is None:
            raise ValueError("this VM has no balloon device (create it with balloon on)")
        size = self.machine.mem.size
        if not isinstance(guest_bytes, int) or not 0 <= guest_bytes <= size:
            raise ValueError(f"a balloon target is 0 to {size} bytes of guest RAM")
        balloon.set_target((size - guest_bytes) >> 12)

    def _snapshot(self, path: str, diff: str | None = None) -> dict[str, Any]:
        """A full snapshot, or (``diff``: the path of this VM's latest snapshot) only the
        pages written since that one; either is the base of the next diff."""
        if not self.running:
            self.machine.clint.load_state(self.frozen_clock)  # mtime as it stood at pause
        fd = hostfiles.receive(self.link.files)  # the VMM made the file
        try:
            if diff is not None and (self.last_snapshot is None
                                     or self.last_snapshot.path != diff):
                raise ValueError(f"--diff {diff}: not the latest snapshot of this VM "
                                 f"({self.last_snapshot.path if self.last_snapshot else 'none'})")
            written = self.snapshot_log.take() if diff is not None else []
            try:
                saved = snapshot.write(fd, Path(path), self.machine,
                                       {"console_bytes": self.console.total},
                                       self.last_snapshot if diff is not None else None, written)
            except snapshot.SnapshotError:
                if diff is not None:  # the pages taken are in no file: no diff on this base
                    self._forget_snapshot_base()
                raise
        finally:
            os.close(fd)
        if diff is None:
            self._forget_snapshot_base()
            self.snapshot_log = self.machine.mem.dirty_log()
        self.last_snapshot = snapshot.Base(str(saved.path), saved.meta_crc)
        return {"path": str(saved.path), "file_bytes": saved.file_bytes,
                "ram_bytes": saved.ram_bytes, "seconds": saved.seconds,
                "console_bytes": self.console.total}

    def _swap_out(self) -> dict[str, Any]:
        """Move the guest's RAM to the swap file the VMM made (the same one every time:
        the first is kept, later copies closed); the guest runs on as it was."""
        fd = hostfiles.receive(self.link.files)
        if self.swap_file is None:
            self.swap_file = swap.SwapFile(fd)
        else:
            os.close(fd)
        return {"swapped_bytes": self.swapper.swap_out(self.swap_file)}

    def _forget_snapshot_base(self) -> None:
        if self.snapshot_log is not None:
            self.snapshot_log.close()
        self.snapshot_log = self.last_snapshot = None

    # -- live migration (popek.vmm.migration) ---------------------------------------------
    def _emigrate(self, msg: dict[str, Any]) -> None:
        """Start sending the guest over the connection the VMM made and hands over now;
        the loop drives it between slices (:meth:`_migrate_step`)."""
        sock = socket.socket(fileno=hostfiles.receive(self.link.files))
        if not self.running:
            sock.close()
            raise MigrationError("only a running guest migrates")
        max_downtime = msg.get("max_downtime")
        try:
            self.migration = Emigration(self.machine, sock, float(max_downtime),
                                        [int(index) for index in msg.get("copy_disks", [])],
                                        bool(msg.get("postcopy")), msg.get("max_bandwidth"))
        except MigrationError:
            sock.close()
            raise
        self.migration_id = msg.get("id")

    def _migrate_step(self) -> bool:
        """One turn of the migration; True once the guest has left (the worker ends).
        A failed migration leaves the guest running here, as it was."""
        migration = self.migration
        result = None
        try:
            if not migration.pump():
                return False
            self._set_running(False)  # the guest's clock stops with it
            result = migration.finish(self._departing_state)
            reply = {"ok": True, "result": result}
        except MigrationError as err:
            reply = {"ok": False, "error": str(err)}
        migration.close()
        self.migration = None
        self._send_stats()
        self.link.send(JSON, {"op": "reply", "id": self.migration_id, **reply})
        if result is None:
            self._set_running(True)
            return False
        self.link.send(JSON, {"op": "exit", "kind": "migrated", "code": 0})
        self._record_exit({"kind": "migrated", "code": 0})
        return True

    def _pushed_page(self) -> None:
        """Post-copy: the source pushed pages (or said it has sent them all)."""
        arrival = self.arrival
        try:
            arrival.postcopy.take_pushed()
        except PagesLost as err:
            self.fail(str(err))
        if arrival.postcopy.done:
            self.runner.sources.watch(arrival.conn.sock.fileno(), None)
            arrival.conn.close()

    def _departing_state(self) -> dict[str, Any]:
        """What goes to the destination beside RAM, the guest paused: the machine, and
        the console history and counters the VM keeps showing there."""
        self._flush_output()
        return {"machine": self.machine.save_state(), "console_bytes": self.console.total,
                "console": base64.b64encode(self.console.data).decode(),
                "instructions": self.instret_offset + self._instret(),
                "traps": {str(cause): n for cause, n in self.traps.items()}}

    def _immigrate(self) -> VirtMachine:
        """The machine, as the source sends it over the connection the VMM accepted."""
        config = config_from_json(self.spec["config"])

        def build(memory: Any) -> VirtMachine:
            return VirtMachine(config, self._console_out, memory=memory, blank=True,
                               nets=self.nets, events=self.runner.sources,
                               opener=self.spec["files"].open)

        sock = socket.socket(fileno=self.spec["incoming"].detach())
        self.arrival = immigrate(sock, config, build)
        machine, state = self.arrival.machine, self.arrival.state
        try:
            history = base64.b64decode(state.get("console", ""))
            self.console.total = int(state.get("console_bytes", 0)) - len(history)
            self.console.append(history)
            self.instret_offset = int(state.get("instructions", 0)) - \
                sum(hart.instret for hart in machine.harts)
            self.traps.update({int(k): int(v) for k, v in state.get("traps", {}).items()})
        except (TypeError, ValueError, AttributeError):
            pass  # counters and history are for show; the guest itself arrived whole
        return machine

    def _replug(self, index: object) -> None:
        """A VMM that adopted this guest made its switch port anew: NIC ``index`` carries
        on over the socket the VMM handed over."""
        sock = socket.socket(fileno=hostfiles.receive(self.link.files))
        nets = self.nets
        if not isinstance(index, int) or not 0 <= index < len(nets) or \
                not hasattr(nets[index], "replug"):
            sock.close()
            raise ValueError(f"NIC {index!r} cannot be replugged")
        nets[index].replug(sock)
        self.machine.nics[index].replugged()

    # -- reporting ------------------------------------------------------------------------
    def _flush_output(self) -> None:
        if self.out:
            self.console.append(self.out)
            self.link.send(OUTPUT, self.out)
            self.out.clear()

    def _instret(self) -> int:
        return sum(hart.instret for hart in self.machine.harts)

    def _send_stats(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.link.send(JSON, {
            "op": "stats", "running": self.running,
            "instructions": self.instret_offset + self._instret(),
            "traps": {str(cause): n for cause, n in self.traps.items()},
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "throttled_seconds": self.cap.throttled,
            "console_bytes": self.console.total,
            "swapped_bytes": self.machine.mem.absent_pages << PAGE_SHIFT,
            "nics": [nic.stats() for nic in self.machine.nics],
            **({"balloon": self._balloon_report()} if self.machine.balloon else {}),
            **({"migration": self.migration.progress.as_json()} if self.migration else {}),
        })

    def _balloon_report(self) -> dict[str, Any]:
        """The balloon's figures; a running guest is asked for fresh statistics every few
        seconds (its driver wakes to fill them in; a paused one's RAM stays as it was)."""
        if self.running and time.monotonic() >= self.next_balloon_stats:
            self.machine.balloon.request_stats()
            self.next_balloon_stats = time.monotonic() + BALLOON_STATS_INTERVAL
        return self.machine.balloon.report()


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")
