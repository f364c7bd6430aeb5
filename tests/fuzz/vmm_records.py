"""Fuzz target: what a VMM reads that others wrote: the records of its state directory
(``popek.vmm.records``: a VM's record and its worker's exit record, read by
``Vm.from_record`` and adopted by ``Vmm`` at start-up) and the frames a worker sends on
its channel (``popek.vmm.channel``, taken in by ``Vm``'s pump).

A record may be corrupt (a disk error, an edit by hand, a VMM of another version), and a
worker may be compromised by its guest. Either must end in a clear error for that VM
only: the VMM starts, and says why it leaves a record alone (``RecordError``) or lists
the VM with what could be read; a worker's bad frames fail its VM (``ProtocolError``,
or its channel closed). After every input the VMM's listing (``GET /v1/vms``, which
shows every VM) works and is JSON, and the other VM of the state directory, whose
record is intact, is adopted as it was.

The first byte says what the rest is (``& 3``): edits to a real record of a running VM
(:class:`~tests.fuzz.harness.JsonEdits`), the record's bytes raw, edits then the exit
record's bytes raw after a NUL, or the frames a worker sends (JSON messages built from
the bytes, each op with fields of the right kinds mostly, raw frames sometimes).
Paths in records are the target's own: an adopting VMM removes the NIC sockets a
record names.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import shutil
import socket
import struct
from pathlib import Path
from typing import Any

from atheris import FuzzedDataProvider

from popek.machine.config import MachineConfig, NicSpec, config_to_json
from popek.vmm import records
from popek.vmm.channel import JSON, OUTPUT, VmmEnd, encode
from popek.vmm.limits import VmLimits
from popek.vmm.manager import Vmm
from popek.vmm.vm import Vm
from tests.fuzz.harness import JsonEdits, Target, json_value, scratch_dir

EDIT, RAW, EXIT, FRAMES = 0, 1, 2, 3
SUSPECT, GOOD = "a0a0a0a0a0a0", "b0b0b0b0b0b0"  # the VM under test, and its intact neighbour
PUMP_TIMEOUT = 10.0
OPS = ["stats", "reply", "ready", "error", "exit", "failed", "op?"]
FAVOURITES = [0, 1, -1, 2**63, 10**30, 0.5, float("nan"), "", "8", "x", [], {}, True]
_loop = asyncio.new_event_loop()


def one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] & 3, data[1:]
    state_dir = _state_dir()
    with contextlib.redirect_stderr(io.StringIO()):  # the VMM's warnings
        if mode == FRAMES:
            _loop.run_until_complete(_worker_says(state_dir, _frames(body)))
            return
        record, exit_record = _record(mode, body)
        _write(state_dir, record, exit_record)
        _loop.run_until_complete(_adopt(state_dir))


# -- records --------------------------------------------------------------------------------
def _record(mode: int, body: bytes) -> tuple[bytes, bytes]:
    real, exit_record = _real_records()
    if mode == RAW:
        return body, exit_record
    edits, _, exit_bytes = body.partition(b"\0") if mode == EXIT else (body, b"", b"")
    record = JsonEdits(edits).apply(json.loads(real))
    if isinstance(record, dict) and isinstance(record.get("nic_paths"), list):
        ours = str(_state_dir() / "nic.sock")  # removed by the VMM: never a host path
        record["nic_paths"] = [ours for _ in record["nic_paths"]]
    try:
        text = json.dumps(record).encode()
    except ValueError:  # (a value JSON cannot hold)
        text = real
    return text, exit_bytes if mode == EXIT else exit_record


def _write(state_dir: Path, record: bytes, exit_record: bytes) -> None:
    shutil.rmtree(state_dir / records.VMS, ignore_errors=True)
    real, good_exit = _real_records()
    good = json.loads(real)
    good.update(id=GOOD, name="good", state="stopped", exit={"kind": "poweroff", "code": 0},
                nic_paths=[])
    for vm_id, vm_record, vm_exit in ((SUSPECT, record, exit_record),
                                      (GOOD, json.dumps(good).encode(), good_exit)):
        files = records.VmFiles(state_dir, vm_id)
        for fd in files.create():
            os.close(fd)
        files.record.write_bytes(vm_record)
        files.exit.write_bytes(vm_exit)


async def _adopt(state_dir: Path) -> None:
    """A VMM starts on the state directory, lists its VMs, and leaves."""
    async with Vmm(state_dir) as vmm:
        json.dumps(vmm.list())
        good = vmm.vms.get(GOOD)
        assert good is not None and good.name == "good" and good.state == "stopped", \
            "a VM with an intact record was not adopted as it was"
        assert good.console.data.endswith(b"good bye\n")


@functools.cache
def _real_records() -> tuple[bytes, bytes]:
    """The record of a running guest with a NIC, as a VMM writes it, and the exit record
    a worker writes as its guest powers off."""
    state_dir = _state_dir()
    vm = Vm(SUSPECT, "web", records.VmFiles(state_dir, SUSPECT), cpu_weight=200,
            cpu_cap=50.0, mem_overhead=512 << 20, source="/snapshots/web.snap")
    vm.config = config_to_json(MachineConfig(kernel=Path("/images/Image"), mem=64 << 20,
                                             nics=[NicSpec("user")]))
    vm.state, vm.started, vm.pid, vm.pid_start = "running", vm.created + 1, 1 << 22, 12345
    vm.snapshots = [{"path": "/snapshots/web.snap", "created": vm.created + 2}]
    vm.stats = _stats()
    vm.confinement = {"uid": 70000, "seccomp": "filtered", "limits": "cgroup v2",
                      "warnings": []}
    vm.nic_paths = [str(state_dir / "nic.sock")]
    vm.limits = VmLimits(None, fallback="cgroups are not writable here",
                         memory_limit=576 << 20, throttled_at_end=0.5)
    exit_record = records.encode_exit({"kind": "poweroff", "code": 0, "console_bytes": 100},
                                      b"good bye\n")
    return json.dumps({"format": records.FORMAT, **vm.record()}).encode(), exit_record


def _stats() -> dict[str, Any]:
    """A worker's statistics message (``Worker._send_stats``)."""
    return {"op": "stats", "running": True, "instructions": 123456, "traps": {"8": 3, "9": 1},
            "cpu_seconds": 1.5, "throttled_seconds": 0.25, "console_bytes": 100,
            "nics": [{"rx_frames": 1, "tx_frames": 2, "host_dropped": 0}]}


@functools.cache
def _state_dir() -> Path:
    return scratch_dir("records")


# -- a worker's frames ----------------------------------------------------------------------
def _frames(body: bytes) -> bytes:
    fdp = FuzzedDataProvider(body)
    out = b""
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        choice = fdp.ConsumeIntInRange(0, 9)
        if choice == 0:  # raw: a length, a tag and bytes of the fuzzer's choosing
            out += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        elif choice == 1:
            out += encode(OUTPUT, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
        else:
            out += encode(JSON, _message(fdp))
    return out


def _message(fdp: FuzzedDataProvider) -> dict[str, Any]:
    """A message as a worker sends it, its fields bent: a real one's fields (each kept,
    replaced by any JSON value or dropped) and a few others."""
    op = fdp.PickValueInList(OPS)
    real = {"stats": _stats(), "reply": {"op": "reply", "id": 1, "ok": True},
            "ready": {"op": "ready", "vm": SUSPECT, "state": "running", "config": {},
                      "console_bytes": 10, "history_bytes": 4, "warnings": []},
            "error": {"op": "error", "message": "no"},
            "exit": {"op": "exit", "kind": "poweroff", "code": 0},
            "failed": {"op": "failed", "reason": "bug"}}.get(op, {"op": op})
    message: dict[str, Any] = {}
    for key, value in real.items():
        choice = fdp.ConsumeIntInRange(0, 5)
        if choice < 4 or key == "op":
            message[key] = value
        elif choice == 4:
            message[key] = json_value(fdp, 2, FAVOURITES)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        message[fdp.PickValueInList([*real, "x"])] = json_value(fdp, 2, FAVOURITES)
    return message


async def _worker_says(state_dir: Path, frames: bytes) -> None:
    """A running VM's worker (here, the other end of a socket pair) sends ``frames`` and
    hangs up; the VMM's pump takes them in, as after a launch or an adoption."""
    shutil.rmtree(state_dir / records.VMS, ignore_errors=True)
    vm = Vm(SUSPECT, "web", records.VmFiles(state_dir, SUSPECT), cpu_weight=100,
            cpu_cap=None, mem_overhead=None)
    for fd in vm.files.create():
        os.close(fd)
    vm.limits = VmLimits(None)
    vm.state = "running"
    ours, worker = socket.socketpair()
    with worker:
        vm._chan = await VmmEnd.open(ours)
        vm._ready = asyncio.get_running_loop().create_future()
        vm._pump = asyncio.create_task(vm._receive_all())
        worker.sendall(frames)
    await asyncio.wait_for(vm._pump, PUMP_TIMEOUT)
    assert vm.state in ("stopped", "failed"), vm.state
    vmm = Vmm(state_dir)
    vmm.vms[vm.id] = vm
    json.dumps(vmm.list())


# -- seeds ----------------------------------------------------------------------------------
def seeds() -> dict[str, bytes]:
    real, exit_record = _real_records()
    keys = list(json.loads(real))
    stats, state = keys.index("stats"), keys.index("state")
    return {
        "record-as-written": bytes([EDIT]),
        "record-state-stopped": bytes([EDIT, 0x80, state, 6, 7]) + b"stopped",
        "record-stats-dropped": bytes([EDIT, 0x80, stats, 9]),
        "record-raw": bytes([RAW]) + real,
        "exit-raw": bytes([EXIT, 0]) + exit_record,
        "worker-stats-and-exit": bytes([FRAMES]) + struct.pack("<B", 2) + bytes(40),
    }


TARGET = Target(one=one, ci_runs=800, max_len=4096, seeds=seeds)
