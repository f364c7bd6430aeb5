"""One guest as the VMM sees it: its worker process, life-cycle state, statistics, record.

States::

    created --start--> running <--pause/resume--> paused
       |                  |                          |
       +------------------+-- poweroff, kill --------+--> stopped
       +------------------+-- worker died -----------+--> failed
                          +-- migrate ---------------------> migrated (it runs elsewhere)
    incoming --the source connects--> creating --> running (or paused: see migration.py)

The VMM talks to the worker only through its channel and holds its process by a pidfd
(:mod:`popek.vmm.workerprocess`); anything the worker does wrong (dies, sends garbage)
turns this VM ``failed`` and nothing else.

Every change is written to the VM's record in the state directory
(:mod:`popek.vmm.records`) before the API answers, and the worker does not need its VMM
to run: a VMM that goes away (:meth:`Vm.detach`, or SIGKILL) leaves the guest running,
and the next VMM rebuilds the VM from its record and attaches to the worker again
(:meth:`Vm.adopt`): state, configuration, console history and statistics as they were.
A worker that ended meanwhile is listed stopped or failed, as its exit record says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
from typing import Any

from popek.jsontypes import wrong_field
from popek.machine.config import CONFIG_VERSION, ConfigError, config_from_json, config_to_json
from popek.machine.loader import ImageError
from popek.net.endpoint import OpenedNic
from popek.stats import trap_names
from popek.vmm import channel, hostfiles, jail, pagesharing, procstat, scheduler, snapshot, worker
from popek.vmm.channel import (
    DEBUG_IN,
    DEBUG_OUT,
    INPUT,
    JSON,
    OUTPUT,
    ChannelClosed,
    ProtocolError,
    VmmEnd,
)
from popek.vmm.console import ConsoleBuffer
from popek.vmm.errors import BadRequest, Conflict
from popek.vmm.limits import VmLimits
from popek.vmm.records import RecordError, VmFiles
from popek.vmm.template import Template, TemplateEnded
from popek.vmm.workerprocess import WorkerProcess, start

READY_TIMEOUT = 120.0  # seconds a worker may take to load images or a snapshot
ADOPT_TIMEOUT = 10.0  # seconds a running worker has to answer a VMM that adopts it
REPLY_TIMEOUT = 600.0  # seconds for a command (a snapshot of a large guest)
REAP_TIMEOUT = 10.0  # seconds a worker whose channel closed may take to be gone
LIVE = ("creating", "created", "running", "paused")  # states with a worker

_UNEXPLAINED = ("the worker ended without a word (its exit status goes to the VMM that "
                "started it, not to one that adopted it): killed by a signal such as "
                "SIGKILL, or the host restarted")


class Vm:
    """A guest: call :meth:`launch` once (or :meth:`adopt` for a recorded one), then the
    life-cycle methods."""

    def __init__(self, vm_id: str, name: str, files: VmFiles, *, cpu_weight: int,
                 cpu_cap: float | None, mem_overhead: int | None,
                 source: str | None = None) -> None:
        self.id = vm_id
        self.name = name
        self.files = files
        self.state = "creating"
        self.created = time.time()
        self.cpu_weight = cpu_weight
        self.cpu_cap = cpu_cap
        self.mem_overhead = mem_overhead
        self.source = source  # the snapshot it was restored from
        self.template_pid: int | None = None  # the restore template its worker forked from
        self.config: dict[str, Any] = {}
        self.console = ConsoleBuffer()
        self.stats: dict[str, Any] = {}
        self.exit: dict[str, Any] | None = None
        self.failure: str | None = None
        self.snapshots: list[dict[str, Any]] = []  # taken of it: path, time
        self.nice = 0
        self.started: float | None = None
        self.pid: int | None = None
        self.pid_start: int | None = None  # the worker's start time: its pid's identity
        self.worker: WorkerProcess | None = None
        self.meter: scheduler.CpuMeter | None = None
        self.limits: VmLimits | None = None
        self.confinement: dict[str, Any] = {}  # as the kernel reports it, once ready
        self._chan: VmmEnd | None = None
        self._file_socket: socket.socket | None = None  # hands the worker files later
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._stopped = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._detached = False
        self.nics: list[OpenedNic] = []  # host ends the VMM opened; the worker uses copies
        self.nic_paths: list[str] = []  # the Unix socket paths they bound, removed at the end
        self.migration: dict[str, Any] | None = None  # the last one: where to, how it went
        # When its console last moved either way (or it started): the VMM swaps out the
        # guest idle longest when guests hold more than --mem-limit.
        self.last_active = time.monotonic()
        # The gdb stub's bytes for the attached debugger (popek vm debug); None at its end.
        self._debugger: asyncio.Queue[bytes | None] | None = None

    # -- the record -----------------------------------------------------------------------------
    # What the record keeps, and the types a record read back must have.
    _RECORDED: dict[str, Any] = {
        "id": str, "name": str, "state": str, "created": float, "started": float | None,
        "source": str | None, "config": dict, "cpu_weight": int, "cpu_cap": float | int | None,
        "mem_overhead": int | None, "exit": dict | None, "failure": str | None,
        "snapshots": list[dict], "pid": int | None, "pid_start": int | None,
        "confinement": dict, "stats": dict, "nic_paths": list[str], "migration": dict | None}

    def record(self) -> dict[str, Any]:
        return {**{key: getattr(self, key) for key in self._RECORDED},
                "config_version": CONFIG_VERSION,
                "limits": self.limits.record() if self.limits else {}}

    def save(self) -> None:
        self.files.save(self.record())

    @classmethod
    def from_record(cls, files: VmFiles, record: dict[str, Any]) -> Vm:
        """The VM as a VMM before this one recorded it; :meth:`adopt` settles the rest.
        RecordError if the record is not one a VMM wrote (a field of the wrong type, a
        state or configuration no VM has, statistics a worker would not send)."""
        _check_record(files, record)
        vm = cls(files.id, record.get("name", files.id), files,
                 cpu_weight=record.get("cpu_weight", scheduler.DEFAULT_WEIGHT),
                 cpu_cap=record.get("cpu_cap"), mem_overhead=record.get("mem_overhead"))
        for key in list(cls._RECORDED)[2:]:
            if key in record:
                setattr(vm, key, record[key])
        if vm.config:  # as this popek writes it (a VMM before it may have written it older)
            vm.config = config_to_json(config_from_json(vm.config, record["config_version"]))
        vm.limits = VmLimits.adopt(vm.id, record.get("limits", {}), vm.state in LIVE)
        said = files.read_exit()
        if said is not None:
            vm._take_console(*said)
        if vm.state not in LIVE:
            vm._stopped.set()
        return vm

    # -- worker -----------------------------------------------------------------------------
    async def launch(self, spec: dict[str, Any], nics: list[OpenedNic] = (),
                     ready_timeout: float = READY_TIMEOUT,
                     template: Template | None = None) -> None:
        """Start the worker and wait until its machine is built; BadRequest if it cannot be.

        ``nics`` are the host ends of the guest's NICs, opened by the VMM: the worker gets
        copies of their descriptors; passt and bound paths stay here until it is gone.
        ``template``: the worker forks from it, with the spec's snapshot restored."""
        self.nics = list(nics)
        self.nic_paths = [path for nic in self.nics for path in nic.paths]
        try:
            files = await asyncio.to_thread(hostfiles.HostFiles.for_spec, spec)
        except (ConfigError, ImageError, snapshot.SnapshotError) as err:
            raise BadRequest(str(err)) from None
        try:
            exit_record, log = self.files.create()
            self.save()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            files.close()
            raise
        try:
            old_mask = os.umask(0o077)  # only the VMM's user may reach the worker
            try:
                listener.bind(str(self.files.socket))
            finally:
                os.umask(old_mask)
            self.limits = VmLimits.create(self.id, self.cpu_cap)
            spec = {**spec, **self.limits.worker_spec(self.cpu_cap, self.mem_overhead),
                    "files": files, "vm_id": self.id, "vmm_uid": os.geteuid(),
                    "exit_record": hostfiles.PassedFd(exit_record),
                    "log": hostfiles.PassedFd(log),
                    "ids": jail.guest_ids(self.id), "nics": [nic.end for nic in self.nics]}
            try:
                if template is None:
                    raise TemplateEnded("no template")
                await template.fork((listener, spec))
                self.template_pid = template.process.pid
            except TemplateEnded:  # the worker restores the snapshot itself
                await start(worker.main, (listener, spec), f"popek-vm-{self.id}")
        except BaseException:
            if self.limits is not None:
                self.limits.ended()
            raise
        finally:
            files.close()  # the worker has its own copies
            listener.close()
            os.close(exit_record)
            os.close(log)
            for nic in self.nics:  # the worker holds the ends now: when it ends, they close
                nic.end.close()
        try:
            ready = await self._attach(ready_timeout)
        except (OSError, TimeoutError) as err:
            failure = f"the worker did not get ready ({err or 'timed out'})"
            self.kill(failure=failure)
            raise BadRequest(failure) from None
        if "error" in ready:
            await self._stopped.wait()
            raise BadRequest(ready["error"])
        self.config = ready["config"]
        await self._confined(ready.get("warnings", []))
        self.state = ready.get("state", "created")  # a guest that migrated here runs already
        if "resumed_at" in ready:
            self.migration = {"state": "arrived", "resumed_at": ready["resumed_at"]}
        if self.state == "running":
            self.started = time.time()
        self.save()

    async def adopt(self) -> None:
        """A VMM before this one started this VM's worker: attach to it if it still runs
        (the VM carries on as the worker says), else settle how the VM ended."""
        recorded_pid = self.pid
        try:
            ready = await self._attach(ADOPT_TIMEOUT, recorded_pid, self.pid_start)
        except (ConnectionRefusedError, FileNotFoundError, ProcessLookupError):
            await self._reap(recorded_pid)  # it ended while no VMM was attached
            return
        except (OSError, TimeoutError) as err:
            self.kill(failure="the worker did not answer the VMM that adopted it "
                              f"({err or 'timed out'})")
            return
        self.state = ready.get("state", self.state)
        with contextlib.suppress(BadRequest):  # one that escaped its cgroup is stopped
            await self._confined(ready.get("warnings", []))
        self.save()

    async def abandon(self) -> None:
        """Its VMM ended while it created this VM, whose creator got no id: the VM never
        was. Its worker, if it runs, is killed; the caller removes the record."""
        with contextlib.suppress(OSError, TimeoutError):
            self._chan, self._file_socket, peer = await asyncio.wait_for(
                channel.connect(self.files.socket), ADOPT_TIMEOUT)
            self.worker = WorkerProcess.open(peer)
            self.worker.kill()
            await self.worker.wait(REAP_TIMEOUT)
        self._close_channel()
        if self.worker is not None:
            self.worker.close()
        self.limits.ended()

    async def _attach(self, timeout: float, pid: int | None = None,
                      pid_start: int | None = None) -> dict[str, Any]:
        """Connect to the worker, hold it by a pidfd, and wait for its ``ready``, which
        the pump (:meth:`_receive_all`) takes in. ``pid_start``: the recorded start time
        of the worker ``pid``, which the connected one must match if it has that pid."""
        self._chan, self._file_socket, peer = await channel.connect(self.files.socket)
        try:
            self.worker = WorkerProcess.open(peer, pid_start if peer == pid else None)
        except BaseException:
            self._close_channel()
            raise
        self.pid, self.pid_start = self.worker.pid, self.worker.start_time
        self._ready = asyncio.get_running_loop().create_future()
        self._pump = asyncio.create_task(self._receive_all())
        return await asyncio.wait_for(asyncio.shield(self._ready), timeout)

    async def _confined(self, warnings: list[str]) -> None:
        """The worker is ready: finish its limits and record, from the kernel's view, what
        confines it; a worker that escaped its cgroup is stopped."""
        pid = self.worker.pid
        try:
            self.limits.ready(pid, self.config["mem"], self.mem_overhead)
        except OSError as err:
            self.kill(failure=f"cannot confine the worker: {err}")
            await self._stopped.wait()
            raise BadRequest(self.failure) from None
        if self.limits.fallback:
            warnings = [*warnings, f"limits held by the worker itself: {self.limits.fallback}"]
        self.confinement = {**jail.status(pid), "limits": self.limits.mechanism,
                            "warnings": warnings}
        self.nice = self.limits.set_weight(pid, self.cpu_weight)
        self.meter = scheduler.CpuMeter(pid)

    async def _receive_all(self) -> None:
        try:
            while True:
                tag, payload = await self._chan.receive()
                if tag == OUTPUT:
                    self.console.append(payload)
                    self.last_active = time.monotonic()
                elif tag == DEBUG_OUT and self._debugger is not None:
                    self._debugger.put_nowait(payload or None)
                elif tag == JSON:
                    self._event(payload)
        except ChannelClosed:
            pass
        except ProtocolError as err:
            self.kill(failure=f"worker broke the protocol: {err}")
        if not self._detached:
            await self._reap(self.pid)

    def _event(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        wrong = wrong_message(msg)
        if wrong is not None:
            raise ProtocolError(f"a {op!r} message whose {wrong}")
        if op == "stats":
            self.stats = msg
        elif op == "reply":
            future = self._replies.pop(msg.get("id"), None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif op == "ready" and not self._ready.done():
            # What follows is the console's history, if the worker has some to hand over.
            self.console.total = msg.get("console_bytes", 0) - msg.get("history_bytes", 0)
            self._ready.set_result(msg)
        elif op == "error" and not self._ready.done():
            self._ready.set_result({"error": msg.get("message", "unknown error")})
        elif op == "exit":
            self.exit = {"kind": msg.get("kind"), "code": msg.get("code")}
        elif op == "failed":
            self.failure = str(msg.get("reason"))

    async def _reap(self, pid: int | None) -> None:
        """The worker (``pid``, if known) is ending or has ended: settle the VM's final
        state and why, from the best witness: the worker's own word (on the channel, or
        its exit record), else the kernel's (a cgroup OOM kill, this VMM's child's exit
        status, the seccomp filter's log)."""
        self._close_channel()
        if self.worker is not None and not await self.worker.wait(REAP_TIMEOUT):
            self.worker.kill()  # it closed its channel but lives on: it is broken
            await self.worker.wait(REAP_TIMEOUT)
        said = self.files.read_exit()
        if said is not None and self.exit is None and self.failure is None:
            how = said[0]
            if "failure" in how:
                self.failure = str(how["failure"])
            else:
                self.exit = {"kind": how.get("kind"), "code": how.get("code")}
        self.failure = self.failure or self.limits.ended()
        status = self.worker.status() if self.worker is not None else None
        if self.state == "creating":  # its launch fails, and the VM is not kept
            if not self._ready.done():
                self._ready.set_result({"error": self.failure or status or _UNEXPLAINED})
        elif self.exit is not None:
            self.state = "migrated" if self.exit.get("kind") == "migrated" else "stopped"
            if self.state == "migrated" and (self.migration or {}).get("state") == "migrating":
                # its worker committed while no VMM listened (this one adopted it since)
                self.migration.update(state="done", finished=time.time())
        else:
            self.state = "failed"
            self.failure = self.failure or status or \
                (pid is not None and jail.logged_violation(pid)) or _UNEXPLAINED
        if said is None:
            with contextlib.suppress(OSError):
                self.files.write_exit({"failure": self.failure} if self.state == "failed"
                                      else {**(self.exit or {})}, bytes(self.console.data))
        if self.worker is not None:
            self.worker.close()
        for future in self._replies.values():
            if not future.done():
                future.set_result({"ok": False, "error": f"the guest is {self.state}"})
        self.console.close()
        if self._debugger is not None:
            self._debugger.put_nowait(None)
        await asyncio.to_thread(self.release_nics)
        if self.state != "creating":
            self.save()
        self._stopped.set()

    def release_nics(self) -> None:
        """The worker is gone: let each passt exit, remove the sockets the VMM bound (also
        those a VMM before this one bound for an adopted VM, as its record says; that
        VMM's passts were not this one's children, and exit by themselves)."""
        nics, self.nics = self.nics, []
        for nic in nics:
            nic.close()
        for path in self.nic_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _take_console(self, how: dict[str, Any], console: bytes) -> None:
        """The end of the console as the worker's exit record kept it."""
        self.console.total = int(how.get("console_bytes", len(console))) - len(console)
        self.console.append(console)

    def _close_channel(self) -> None:
        if self._chan is not None:
            self._chan.close()
        if self._file_socket is not None:
            self._file_socket.close()

    def detach(self) -> None:
        """The VMM is going away and leaves the guest running: close the channel (the
        worker waits for the next VMM) and the consoles attached to it."""
        if not self.alive:
            return
        self._detached = True
        if self._pump is not None:
            self._pump.cancel()
        self._close_channel()
        self.worker.close()
        self.console.close()
        self.save()

    @property
    def alive(self) -> bool:
        return not self._stopped.is_set() and self.worker is not None and not self._detached

    async def _call(self, op: str, timeout: float = REPLY_TIMEOUT, **args: Any) -> dict[str, Any]:
        if not self.alive:
            raise Conflict(f"VM {self.name} is {self.state}")
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._replies[msg_id] = future
        if not self._chan.send(JSON, {"op": op, "id": msg_id, **args}):
            del self._replies[msg_id]
            raise Conflict(f"VM {self.name}'s worker is not reading its commands")
        try:
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self._replies.pop(msg_id, None)
        if not reply.get("ok"):
            raise Conflict(reply.get("error", f"{op} failed"))
        return reply.get("result", {})

    # -- life cycle ---------------------------------------------------------------------------
    def _require(self, op: str, *states: str) -> None:
        if self.state not in states:
            raise Conflict(f"cannot {op} VM {self.name}: it is {self.state}")

    async def start(self) -> None:
        self._require("start", "created")
        self.last_active = time.monotonic()
        await self._call("start")
        self.state = "running"
        self.started = time.time()
        self.save()

    async def pause(self) -> None:
        self._require("pause", "running")
        await self._call("pause")
        self.state = "paused"
        self.save()

    async def resume(self) -> None:
        self._require("resume", "paused")
        await self._call("resume")
        self.state = "running"
        self.save()

    async def shutdown(self, line: str, timeout: float) -> bool:
        """Ask the guest to power off by typing ``line`` on its console (the bundled init's
        shell runs it as a command); True if it did within ``timeout`` seconds."""
        self._require("shut down", "running")
        self.send_input(line.encode())
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def kill(self, failure: str | None = None) -> None:
        """Stop the worker at once (SIGKILL): the guest gets no say. With ``failure`` the
        VMM gave up on the worker, and the VM ends ``failed`` for that reason."""
        if self.alive:
            if failure is not None:
                self.failure = failure
            elif self.exit is None:
                self.exit = {"kind": "killed", "code": -signal.SIGKILL}
            self.worker.kill()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def snapshot(self, path: str, diff: str | None = None) -> dict[str, Any]:
        """The VMM makes the file, the worker (which cannot) writes into it; ``diff``: only
        the pages written since that snapshot, this VM's latest."""
        self._require("snapshot", "created", "running", "paused")
        try:
            with snapshot.NewFile(path) as fd:
                hostfiles.send(self._file_socket, fd)
                result = await self._call("snapshot", path=path,
                                          **({"diff": diff} if diff else {}))
        except snapshot.SnapshotError as err:
            raise BadRequest(str(err)) from None
        self.snapshots.append({"path": result["path"], "created": time.time()})
        self.save()
        return result

    def check_migratable(self) -> None:
        self._require("migrate", "running")
        if self.migration is not None and self.migration["state"] == "migrating":
            raise Conflict(f"VM {self.name} is migrating already")

    async def migrate(self, sock: socket.socket, to: str, max_downtime: float,
                      copy_disks: list[int], postcopy: bool,
                      max_bandwidth: float | None) -> asyncio.Task[dict[str, Any]]:
        """Hand the worker the connection to the destination and start the migration;
        the task ends with its figures, or Conflict saying why it failed (the guest then
        runs on here). Progress shows in :meth:`info`."""
        self.check_migratable()
        try:
            hostfiles.send(self._file_socket, sock.fileno())
        finally:
            sock.close()
        self.migration = {"to": to, "state": "migrating", "started": time.time(),
                          "copy_disks": copy_disks, "postcopy": postcopy,
                          "max_bandwidth": max_bandwidth}
        return asyncio.create_task(self._call("migrate", max_downtime=max_downtime,
                                              copy_disks=copy_disks, postcopy=postcopy,
                                              max_bandwidth=max_bandwidth))

    async def replug(self, nic: int, sock: socket.socket) -> None:
        """Hand the worker a new host end for switch NIC ``nic`` (this VMM adopted the
        guest, and the port its predecessor made went with it)."""
        try:
            hostfiles.send(self._file_socket, sock.fileno())
        finally:
            sock.close()  # the worker has its copy
        await self._call("replug", nic=nic)

    async def exec(self, argv: list[str], stdin: str, timeout: float) -> dict[str, Any]:
        """Run ``argv`` in the guest through its agent (``stdin`` and the output base64):
        ``status``, ``stdout``, ``stderr``; Conflict if the guest has no agent, or the
        command overran ``timeout`` (the agent is then told to give it up)."""
        self._require("exec in", "running")
        try:
            return await self._call("exec", timeout, argv=argv, stdin=stdin)
        except TimeoutError:
            await self._call("exec_abandon")
            raise Conflict(f"{argv[0]} ran longer than {timeout:g} s in VM {self.name}") \
                from None

    async def set_cpu(self, weight: int | None, cap: float | None, clear_cap: bool) -> None:
        if weight is not None:
            self.cpu_weight = weight
            if self.alive:
                self.nice = self.limits.set_weight(self.worker.pid, weight)
        if cap is not None or clear_cap:
            if self.alive and not self.limits.set_cap(cap):
                await self._call("cap", percent=cap)
            self.cpu_cap = cap
        self.save()

    async def set_balloon(self, guest_bytes: int) -> None:
        """Leave the guest ``guest_bytes`` of RAM; its balloon driver gives back the rest."""
        await self._call("balloon", bytes=guest_bytes)

    async def debug(self) -> asyncio.Queue[bytes | None]:
        """Attach a debugger (one at a time): the guest halts in its worker's gdb stub.
        Returns the queue of the stub's bytes (None: it hung up); send with
        :meth:`send_debug`, and :meth:`end_debug` when the debugger goes."""
        self._require("debug", "running")
        if self._debugger is not None:
            raise Conflict(f"a debugger is attached to VM {self.name} already")
        self._debugger = asyncio.Queue()
        try:
            await self._call("debug")
        except BaseException:
            self._debugger = None
            raise
        return self._debugger

    def send_debug(self, data: bytes) -> bool:
        return bool(data) and self.alive and self._chan.send(DEBUG_IN, data)

    def end_debug(self) -> None:
        """The debugger went away: its stub lets the guest run on."""
        if self._debugger is not None:
            self._debugger = None
            if self.alive:
                self._chan.send(DEBUG_IN, b"")

    def send_input(self, data: bytes) -> bool:
        """Console input; False if the guest is gone or has not read what it was sent."""
        self.last_active = time.monotonic()
        return self.alive and self._chan.send(INPUT, data)

    async def swap_out(self) -> dict[str, Any]:
        """Move the guest's RAM to its swap file (made here: the worker cannot), to come
        back page by page as the guest touches it; Conflict says why if it cannot, and
        the guest then stays resident as it was."""
        self._require("swap out", "created", "running", "paused")
        try:
            fd = os.open(self.files.swap, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise Conflict(f"cannot swap out: cannot make {self.files.swap}: "
                           f"{err.strerror}") from None
        try:
            hostfiles.send(self._file_socket, fd)
        except OSError as err:
            raise Conflict(f"VM {self.name}'s worker cannot take its swap file: "
                           f"{err.strerror}") from None
        finally:
            os.close(fd)  # the worker has its copy
        return await self._call("swap_out")

    async def swap_in(self) -> dict[str, Any]:
        """Bring every page of a swapped-out guest back now."""
        self._require("swap in", "created", "running", "paused")
        self.last_active = time.monotonic()
        return await self._call("swap_in")

    # -- reporting ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        stats = self.stats
        traps = trap_names({int(cause): n for cause, n in stats.get("traps", {}).items()})
        cpu_percent = self.meter.percent if self.meter and self.alive else 0.0
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "created": self.created,
            "started": self.started,
            "source_snapshot": self.source,
            "template_pid": self.template_pid,
            "snapshots": self.snapshots,
            "config": self.config,
            "exit": self.exit,
            "failure": self.failure,
            "cpu": {"weight": self.cpu_weight, "cap_percent": self.cpu_cap, "nice": self.nice,
                    "percent": round(cpu_percent, 1),
                    "host_share_percent": round(cpu_percent / scheduler.HOST_CPUS, 1),
                    "vcpu_seconds": stats.get("cpu_seconds", 0.0),
                    "throttled_seconds": self.limits.throttled_seconds(
                        stats.get("throttled_seconds", 0.0)) if self.limits else 0.0},
            "instructions": stats.get("instructions", 0),
            "traps": traps,
            "memory": {"guest_bytes": self.config.get("mem", 0),
                       "overhead_limit_bytes": self.mem_overhead,
                       "limit_bytes": self.limits.memory_limit if self.limits else None,
                       **({f"{k}_bytes": v for k, v in procstat.memory(self.pid).items()}
                          if self.alive else {}),
                       **({f"guest_{k}_bytes": v for k, v in pagesharing.guest_ram(
                           self.pid, self.config.get("mem", 0)).items()}
                          if self.alive else {}),
                       "swapped_bytes": stats.get("swapped_bytes", 0) if self.alive else 0},
            "console": {"bytes": self.console.total, "dropped_bytes": self.console.dropped},
            "nics": stats.get("nics", []),
            "balloon": stats.get("balloon"),
            "confinement": self.confinement,
            "migration": {**stats.get("migration", {}), **self.migration}
            if self.migration else None,
        }


# What each message a worker sends must hold: a compromised worker's malformed message
# fails its VM (as a malformed frame does), and nothing the VMM shows of it can break.
_MESSAGES: dict[str, dict[str, Any]] = {
    "stats": {"running": bool, "instructions": int, "traps": dict, "cpu_seconds": float | int,
              "throttled_seconds": float | int, "console_bytes": int, "nics": list[dict],
              "swapped_bytes": int},
    "reply": {"id": int, "ok": bool, "error": str, "result": dict},
    "ready": {"vm": str, "state": str, "config": dict, "console_bytes": int,
              "history_bytes": int, "warnings": list[str], "resumed_at": float},
    "error": {"message": str},
    "exit": {"kind": str | None, "code": int | None},
    "failed": {"reason": str},
}
STATES = (*LIVE, "stopped", "failed")


def wrong_message(msg: dict[str, Any]) -> str | None:
    """What is wrong with a worker's message (or its statistics, as a record keeps them),
    in a few words; None if nothing."""
    if type(msg.get("op")) is not str:
        return f"'op' is {msg.get('op')!r:.40}"
    wrong = wrong_field(msg, _MESSAGES.get(msg["op"], {}))
    if wrong is not None:
        return wrong
    if msg.get("op") == "ready" and msg.get("state", "created") not in STATES:
        return f"state {msg['state']!r:.40} is no VM's"
    traps = msg.get("traps", {}) if msg.get("op") == "stats" else {}
    if not all(cause.isascii() and cause.isdigit() and type(n) is int
               for cause, n in traps.items()):
        return "'traps' are not counts by cause number"
    return None


def _check_record(files: VmFiles, record: dict[str, Any]) -> None:
    wrong = wrong_field(record, Vm._RECORDED) or wrong_field(record, {"limits": dict}) or \
        wrong_field(record.get("limits", {}), VmLimits.RECORDED)
    if wrong is None and record.get("state") not in (*STATES, "migrated"):
        wrong = f"'state' is {record.get('state')!r:.40}"
    if wrong is None and "stats" in record:
        wrong = wrong_message({**record["stats"], "op": "stats"})
    record.setdefault("config_version", 1)  # recorded since version 2
    if wrong is None and type(record["config_version"]) is not int:
        wrong = "'config_version' is not an integer"
    if wrong is None and record.get("config"):
        try:
            config_from_json(record["config"], record["config_version"])
        except ConfigError as err:
            wrong = f"'config' is wrong: {err}"
    if wrong is not None:
        raise RecordError(f"VM {files.id}: its record {files.record} is corrupt: {wrong}")
