"""Restore templates: a snapshot restored once, held warm, and its clones forked from it.

A worker that restores a snapshot the ordinary way maps the file, checks and parses its
metadata and builds the machine (harts with their engines' handler tables, devices, the
native tier's runtime) before its guest runs a single instruction, and all of that
lands in the worker's private heap. The first restore of a snapshot in a VMM starts a
template for it instead (Android's zygote): a process, forked from the worker fork
server as a worker is (:mod:`popek.vmm.workerprocess`), that restores the snapshot
once, freezes the collector's view of everything it holds (``gc.freeze``: no collection
in a clone touches those objects) and then forks every clone of that snapshot from
itself. A clone starts with the template's heap, machine and RAM mapping shared
copy-on-write, and holds privately only the pages it writes.

Clones stay exact: the template never runs a guest instruction, so the machine a clone
gets is the machine a worker restoring the same file builds. What is a clone's own (its
VMM socket, exit record, log, files, cgroup and uid) comes with its spec, exactly as a
worker's does, and the clone confines itself (:func:`popek.vmm.jail.confine`) before
its guest runs. The template itself runs unconfined, like the fork server: it must
keep the privileges its clones drop (each takes a uid and a cgroup of its own). It
reads the snapshot, which the VMM has read and checked in part already, and runs no
guest code. Machines with NICs or disks restore the ordinary way: their host ends
belong to one VM each.

Between the VMM and a template: one ``SOCK_SEQPACKET`` socket pair. The VMM sends each
clone's arguments pickled as multiprocessing pickles a worker's, its descriptors
(:class:`popek.vmm.hostfiles.PassedFd`, sockets) collected and sent beside
(``SCM_RIGHTS``); the template forks, and the child unpickles them as the fork server's
child does. The template answers with the exit status of that child, which exits as soon
as the clone's worker has detached (0: it runs). A template ends when its socket closes:
when the VMM drops it, or ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import multiprocessing.forkserver
import os
import secrets
import signal
import socket
import time
from array import array
from dataclasses import dataclass
from multiprocessing import context, reduction
from multiprocessing.popen_forkserver import Popen as ForkServerPopen
from pathlib import Path
from typing import Any

from popek.machine.config import MachineConfig
from popek.machine.runner import MachineRunner
from popek.machine.virt import VirtMachine
from popek.vmm import jail, snapshot, workerprocess
from popek.vmm.workerprocess import WorkerProcess

PROBE_INPUT = b"\n"  # what the probe types: an empty line, as a console client sends first
PROBE_QUIET_SECONDS = 0.2  # idle and silent for this long after printing: done
PROBE_SECONDS = 5.0  # of wall time at most, for the probe's run
PROBE_CPU_SECONDS = 1.0  # and of CPU time (a guest that spins never goes idle)
MAX_PROBE_KEYS = 200_000  # blocks a probe may name
MAX_MESSAGE = 1 << 20  # bytes of a clone's pickled arguments
MAX_FDS = 250  # descriptors that come with them (SCM_RIGHTS' limit is 253)
READY_TIMEOUT = 120.0  # seconds a template may take to restore its snapshot


class TemplateEnded(OSError):
    """The template process is gone (killed, or failed): its clones restore the
    snapshot themselves from now on."""


def suits(config: MachineConfig) -> bool:
    """Whether clones of a machine of ``config`` may fork from a template."""
    return not config.nics and not config.disks


@dataclass
class Restored:
    """What a template built, for its clones to carry on with: the machine (RAM is the
    snapshot mapped copy-on-write), the snapshot's metadata and the buffer the machine's
    console writes into."""

    machine: VirtMachine
    meta: dict[str, Any]
    console: bytearray


# -- the template process ---------------------------------------------------------------
def main(control: socket.socket, spec: dict[str, Any]) -> None:
    """Process entry point: detach as a worker does, restore ``spec["restore"]`` (with
    ``spec["files"]``), say so, then fork a clone for each message until the VMM closes
    ``control``. Its log (stdout and stderr) is ``spec["log"]``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the VMM
    workerprocess.detach(lambda: None, spec["log"].detach())
    try:
        snap = snapshot.load(Path(spec["restore"]), spec["files"].open)
        console = bytearray()
        restored = Restored(snap.machine(console.extend), snap.meta, console)
    except (snapshot.SnapshotError, OSError) as err:
        control.send(json.dumps({"error": str(err)}).encode())
        os._exit(0)
    _warm(restored, spec.get("probe_ids"))
    gc.freeze()  # everything so far stays as it is, shared with every clone
    control.send(json.dumps({"pid": os.getpid()}).encode())
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, MAX_FDS)
        except OSError:
            message, fds = b"", []
        if not message:
            os._exit(0)  # the VMM dropped this template, or ended
        status = _fork_clone(control, message, fds, restored)
        try:
            control.send(json.dumps({"status": status}).encode())
        except OSError:
            os._exit(0)  # the VMM went away meanwhile


def _warm(restored: Restored, probe_ids: tuple[int, int] | None) -> None:
    """Decode, in the template, the code its clones will run first: the blocks a probe
    (a throwaway fork of the template, confined as a worker is) decodes while its guest
    takes an empty console line and goes idle again. Only the keys cross back, and the
    template decodes each from its own RAM (:meth:`Engine.predecode`), so its guest
    state stays the snapshot's and its cache holds what a clone would decode itself."""
    keys_r, keys_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            workerprocess.close_descriptors({0, 1, 2, keys_w})  # the VMM's socket above all
            jail.confine((), probe_ids)
            os.write(keys_w, _probe(restored))
        finally:
            os._exit(0)
    os.close(keys_w)
    with os.fdopen(keys_r, "rb") as pipe:
        data = pipe.read(MAX_PROBE_KEYS * 8 + 8)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    keys = array("Q")
    keys.frombytes(data[:len(data) // 8 * 8])
    at = 0
    for hart in restored.machine.harts:  # each hart's count, then its keys
        if at >= len(keys):
            break
        count = min(keys[at], len(keys) - at - 1)
        hart.engine.predecode(keys[at + 1:at + 1 + count])
        at += 1 + count


def _probe(restored: Restored) -> bytes:
    """Run the guest (in the probe) until it has answered :data:`PROBE_INPUT` and been
    idle for :data:`PROBE_QUIET_SECONDS` since, for at most :data:`PROBE_SECONDS`
    (:data:`PROBE_CPU_SECONDS` of CPU); the code-cache keys of every hart."""
    machine = restored.machine
    runner = MachineRunner()
    runner.machine = machine
    machine.feed_input(PROBE_INPUT)
    deadline = time.monotonic() + PROBE_SECONDS
    cpu_deadline = time.process_time() + PROBE_CPU_SECONDS
    quiet_since, printed = None, 0
    while time.monotonic() < deadline and time.process_time() < cpu_deadline:
        idle = runner.idle_waits
        runner.step(0.01)
        if runner.idle_waits == idle or len(restored.console) != printed:
            quiet_since, printed = None, len(restored.console)  # busy, or printing
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif printed and time.monotonic() - quiet_since >= PROBE_QUIET_SECONDS:
            break  # it answered, and has been idle since
    keys = array("Q")
    for hart in machine.harts:
        cached = list(hart.engine.blocks)[:MAX_PROBE_KEYS // len(machine.harts)]
        keys.append(len(cached))
        keys.extend(cached)
    return keys.tobytes()


def _fork_clone(control: socket.socket, message: bytes, fds: list[int],
                restored: Restored) -> int:
    """Fork a clone's worker; returns the exit status of the child, which exits once the
    worker (its own child) has detached."""
    from popek.vmm import worker  # the fork server imported it: nothing to load

    pid = os.fork()
    if pid == 0:
        try:
            control.close()
            multiprocessing.forkserver._forkserver._inherited_fds = fds  # noqa: SLF001
            listener, spec = reduction.ForkingPickler.loads(message)
            worker.main(listener, spec, restored)
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# -- the VMM's side ---------------------------------------------------------------------
class _Descriptors:
    """Stands in for multiprocessing's spawning Popen while a clone's arguments are
    pickled: the descriptors they reduce to (``reduction.DupFd``) are collected to be
    sent beside them, and each unpickles as the index into the received list that the
    fork server's child uses (``multiprocessing.forkserver.get_inherited_fds``)."""

    DupFd = ForkServerPopen.DupFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1


def _pickled(args: Any) -> tuple[bytes, list[int]]:
    descriptors = _Descriptors()
    buffer = io.BytesIO()
    context.set_spawning_popen(descriptors)
    try:
        reduction.ForkingPickler(buffer).dump(args)
    finally:
        context.set_spawning_popen(None)
    return buffer.getvalue(), descriptors.fds


class Template:
    """The VMM's handle on one template process (:meth:`start`); clones come from
    :meth:`fork`, one at a time."""

    def __init__(self, control: socket.socket, process: WorkerProcess) -> None:
        self._control = control
        self.process = process
        self._turn = asyncio.Lock()
        self.alive = True

    @classmethod
    async def start(cls, path: str, files: Any, log: int) -> Template:
        """A template restoring the snapshot ``path`` (opened as ``files``, a
        :class:`~popek.vmm.hostfiles.HostFiles`; ``log`` its stdout and stderr); OSError
        if it cannot (the message says why)."""
        from popek.vmm.hostfiles import PassedFd

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            await workerprocess.start(main, (theirs, {
                "restore": path, "files": files, "log": PassedFd(log),
                "probe_ids": jail.guest_ids(secrets.token_hex(6))}), "popek-template")
            theirs.close()
            reply = await asyncio.wait_for(asyncio.to_thread(_reply, ours), READY_TIMEOUT)
            if "error" in reply:
                raise OSError(f"the template cannot restore {path}: {reply['error']}")
            return cls(ours, WorkerProcess.open(int(reply["pid"])))
        except BaseException:
            ours.close()
            theirs.close()
            raise

    async def fork(self, target_args: tuple[socket.socket, dict[str, Any]]) -> None:
        """Start a clone's worker, ``worker.main(*target_args)``, as
        :func:`popek.vmm.workerprocess.start` starts one; OSError if it did not start."""
        message, fds = _pickled(target_args)
        async with self._turn:
            reply = await asyncio.to_thread(self._exchange, message, fds)
        if reply.get("status") != 0:
            raise OSError(f"the worker did not start from its template "
                          f"(exit status {reply.get('status')})")

    def _exchange(self, message: bytes, fds: list[int]) -> dict[str, Any]:
        try:
            socket.send_fds(self._control, [message], fds)
            return _reply(self._control)
        except OSError as err:
            self.alive = False
            raise TemplateEnded(f"the restore template ended ({err})") from None

    async def close(self) -> None:
        """End the template (its clones run on: they are processes of their own)."""
        self.alive = False
        self._control.close()
        if not await self.process.wait(5.0):
            self.process.kill()
            await self.process.wait(5.0)
        self.process.status()  # collect it
        self.process.close()


def _reply(control: socket.socket) -> dict[str, Any]:
    data = control.recv(4096)
    if not data:
        raise OSError("the template ended")
    with contextlib.suppress(ValueError):
        reply = json.loads(data)
        if isinstance(reply, dict):
            return reply
    raise OSError(f"the template answered {data[:80]!r}")
