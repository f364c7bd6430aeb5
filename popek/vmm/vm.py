"""One guest as the VMM sees it: its worker process, life-cycle state and statistics.

States::

    created --start--> running <--pause/resume--> paused
       |                  |                          |
       +------------------+-- poweroff, kill --------+--> stopped
       +------------------+-- worker died -----------+--> failed

The VMM talks to the worker only through its channel and the process id; anything the
worker does wrong (dies, sends garbage) turns this VM ``failed`` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import signal
import socket
import time
from typing import Any

from popek.cpu import causes
from popek.machine.config import ConfigError
from popek.machine.loader import ImageError
from popek.vmm import hostfiles, jail, procstat, scheduler, snapshot, worker
from popek.vmm.channel import INPUT, JSON, OUTPUT, ChannelClosed, ProtocolError, VmmEnd
from popek.vmm.console import ConsoleBuffer
from popek.vmm.errors import BadRequest, Conflict
from popek.vmm.limits import VmLimits

READY_TIMEOUT = 120.0  # seconds a worker may take to load images or a snapshot
REPLY_TIMEOUT = 600.0  # seconds for a command (a snapshot of a large guest)

_CAUSE_NAMES = {getattr(causes, n): n.lower() for n in (
    "INSN_MISALIGNED", "INSN_ACCESS", "ILLEGAL_INSN", "BREAKPOINT", "LOAD_MISALIGNED",
    "LOAD_ACCESS", "STORE_MISALIGNED", "STORE_ACCESS", "ECALL_U", "ECALL_S", "ECALL_M",
    "INSN_PAGE_FAULT", "LOAD_PAGE_FAULT", "STORE_PAGE_FAULT")}
_IRQ_NAMES = {causes.INTERRUPT_BIT | getattr(causes, n): n.lower() for n in (
    "IRQ_S_SOFT", "IRQ_M_SOFT", "IRQ_S_TIMER", "IRQ_M_TIMER", "IRQ_S_EXT", "IRQ_M_EXT")}


# What the worker fork server imports before it forks (tests add a test build's hooks).
WORKER_PRELOAD = ["popek.vmm.warm"]


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a server that has imported popek once: fast starts, and no
    state of the VMM (event loop, sockets, threads) leaks into a guest's process."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


class Vm:
    """A guest: call :meth:`launch` once, then the life-cycle methods."""

    def __init__(self, vm_id: str, name: str, *, cpu_weight: int, cpu_cap: float | None,
                 mem_overhead: int | None, source: str | None = None) -> None:
        self.id = vm_id
        self.name = name
        self.state = "creating"
        self.created = time.time()
        self.cpu_weight = cpu_weight
        self.cpu_cap = cpu_cap
        self.mem_overhead = mem_overhead
        self.source = source  # the snapshot it was restored from
        self.config: dict[str, Any] = {}
        self.console = ConsoleBuffer()
        self.stats: dict[str, Any] = {}
        self.exit: dict[str, Any] | None = None
        self.failure: str | None = None
        self.nice = 0
        self.started: float | None = None
        self.process: multiprocessing.process.BaseProcess | None = None
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

    # -- worker -----------------------------------------------------------------------------
    async def launch(self, spec: dict[str, Any]) -> None:
        """Start the worker and wait until its machine is built; BadRequest if it cannot be."""
        try:
            files = await asyncio.to_thread(hostfiles.HostFiles.for_spec, spec)
        except (ConfigError, ImageError, snapshot.SnapshotError) as err:
            raise BadRequest(str(err)) from None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._file_socket, their_files = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.limits = VmLimits(self.id, self.cpu_cap)
        spec = {**spec, **self.limits.worker_spec(self.cpu_cap, self.mem_overhead),
                "files": files, "file_socket": their_files, "ids": jail.guest_ids(self.id)}
        self.process = _worker_context().Process(
            target=worker.main, args=(theirs, spec), name=f"popek-vm-{self.id}", daemon=True)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.process.start)
        except BaseException:
            self.limits.ended()
            raise
        finally:
            files.close()  # the worker has its own copies
            their_files.close()
        theirs.close()
        self.nice = self.limits.set_weight(self.process.pid, self.cpu_weight)
        self.meter = scheduler.CpuMeter(self.process.pid)
        self._chan = await VmmEnd.open(ours)
        self._ready = loop.create_future()
        self._pump = asyncio.create_task(self._receive_all())
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except TimeoutError:
            self.kill(failure="not ready in time")
            raise BadRequest(f"the guest was not ready in {READY_TIMEOUT:.0f} s") from None
        if "error" in ready:
            await self._stopped.wait()
            raise BadRequest(ready["error"])
        self.config = ready["config"]
        await self._confined(ready.get("warnings", []))
        self.console.total = ready.get("console_bytes", 0)
        self.state = "created"

    async def _confined(self, warnings: list[str]) -> None:
        """The worker is ready: finish its limits and record, from the kernel's view, what
        confines it; a worker that escaped its cgroup is stopped."""
        try:
            self.limits.ready(self.process.pid, self.config["mem"], self.mem_overhead)
        except OSError as err:
            self.kill(failure=f"cannot confine the worker: {err}")
            await self._stopped.wait()
            raise BadRequest(self.failure) from None
        if self.limits.fallback:
            warnings = [*warnings, f"limits held by the worker itself: {self.limits.fallback}"]
        self.confinement = {**jail.status(self.process.pid), "limits": self.limits.mechanism,
                            "warnings": warnings}

    async def _receive_all(self) -> None:
        try:
            while True:
                tag, payload = await self._chan.receive()
                if tag == OUTPUT:
                    self.console.append(payload)
                elif tag == JSON:
                    self._event(payload)
        except ChannelClosed:
            pass
        except ProtocolError as err:
            self.kill(failure=f"worker broke the protocol: {err}")
        await self._reap()

    def _event(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "stats":
            self.stats = msg
        elif op == "reply":
            future = self._replies.pop(msg.get("id"), None)
            if future is not None and not future.done():
                future.set_result(msg)
        elif op == "ready" and not self._ready.done():
            self._ready.set_result(msg)
        elif op == "error" and not self._ready.done():
            self._ready.set_result({"error": msg.get("message", "unknown error")})
        elif op == "exit":
            self.exit = {"kind": msg.get("kind"), "code": msg.get("code")}
        elif op == "failed":
            self.failure = str(msg.get("reason"))

    async def _reap(self) -> None:
        """The channel closed: collect the worker's exit and settle the final state."""
        self._chan.close()
        self._file_socket.close()
        await asyncio.get_running_loop().run_in_executor(None, self.process.join, 10)
        self.failure = self.failure or self.limits.ended()
        if self.state == "creating":
            if not self._ready.done():
                self._ready.set_result({"error": self.failure or _died(self.process)})
        elif self.exit is not None:
            self.state = "stopped"
        else:
            self.state = "failed"
            self.failure = self.failure or _died(self.process)
        for future in self._replies.values():
            if not future.done():
                future.set_result({"ok": False, "error": f"the guest is {self.state}"})
        self.console.close()
        self._stopped.set()

    @property
    def alive(self) -> bool:
        return not self._stopped.is_set() and self.process is not None

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        if not self.alive:
            raise Conflict(f"VM {self.name} is {self.state}")
        msg_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._replies[msg_id] = future
        if not self._chan.send(JSON, {"op": op, "id": msg_id, **args}):
            del self._replies[msg_id]
            raise Conflict(f"VM {self.name}'s worker is not reading its commands")
        try:
            reply = await asyncio.wait_for(future, REPLY_TIMEOUT)
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
        await self._call("start")
        self.state = "running"
        self.started = time.time()

    async def pause(self) -> None:
        self._require("pause", "running")
        await self._call("pause")
        self.state = "paused"

    async def resume(self) -> None:
        self._require("resume", "paused")
        await self._call("resume")
        self.state = "running"

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
        if self.alive and self.process.pid is not None:
            if failure is not None:
                self.failure = failure
            elif self.exit is None:
                self.exit = {"kind": "killed", "code": -signal.SIGKILL}
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def snapshot(self, path: str) -> dict[str, Any]:
        """The VMM makes the file, the worker (which cannot) writes into it."""
        self._require("snapshot", "created", "running", "paused")
        try:
            with snapshot.NewFile(path) as fd:
                hostfiles.send(self._file_socket, fd)
                return await self._call("snapshot", path=path)
        except snapshot.SnapshotError as err:
            raise BadRequest(str(err)) from None

    async def set_cpu(self, weight: int | None, cap: float | None, clear_cap: bool) -> None:
        if weight is not None:
            self.cpu_weight = weight
            if self.alive:
                self.nice = self.limits.set_weight(self.process.pid, weight)
        if cap is not None or clear_cap:
            if self.alive and not self.limits.set_cap(cap):
                await self._call("cap", percent=cap)
            self.cpu_cap = cap

    def send_input(self, data: bytes) -> bool:
        """Console input; False if the guest is gone or has not read what it was sent."""
        return self.alive and self._chan.send(INPUT, data)

    # -- reporting ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        stats = self.stats
        traps: dict[str, int] = {}
        for cause, n in stats.get("traps", {}).items():
            name = _CAUSE_NAMES.get(int(cause)) or _IRQ_NAMES.get(int(cause)) or cause
            traps[name] = n
        cpu_percent = self.meter.percent if self.meter and self.alive else 0.0
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "pid": self.process.pid if self.process is not None else None,
            "created": self.created,
            "started": self.started,
            "source_snapshot": self.source,
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
                       **({f"{k}_bytes": v for k, v in procstat.memory(self.process.pid).items()}
                          if self.alive else {})},
            "console": {"bytes": self.console.total, "dropped_bytes": self.console.dropped},
            "confinement": self.confinement,
        }


def _died(process: multiprocessing.process.BaseProcess) -> str:
    exitcode = process.exitcode
    if exitcode == -signal.SIGSYS:
        return "worker " + jail.violation(process.pid)
    if exitcode is not None and exitcode < 0:
        return f"worker killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
    return f"worker exited with status {exitcode}"
