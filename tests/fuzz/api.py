"""Fuzz target: the REST API's JSON handling, from the request body to what a worker builds.

A request passes through the server's body parser (``popek.api.server._body``), the
VMM's checks of its operation (:class:`popek.vmm.manager.Vmm`: create, restore,
update, shutdown, snapshot, with its path policy), and, for a create or restore that
passed, what a launch does with the spec: the VMM opens the files it names
(``HostFiles.for_spec``), the worker builds the machine from the configuration or reads
the snapshot (``Worker._build``, then its memory limit). The acceptable outcomes are
success or the VMM's own errors (BadRequest, Forbidden, NotFound, Conflict), the errors
a launch answers with 400, and, in the worker, those it reports as a failed start
(ConfigError, ImageError, SnapshotError, OSError); anything else would be a 500 from
the API or a crashed worker.

No worker process is started: the VMs a request can name are never launched (in every
life-cycle state), and the worker's steps run here. The first byte of an input picks
the operation and whether the rest is a raw body (with a Content-Type of the fuzzer's
choosing) or a request built from the bytes (fields the operation knows, and others,
with values drawn from what each field expects and from everything else JSON holds).
The VMM's path policy is the owner's (any path) or a TCP caller's (only the bundled
images). A launch (the VMM opening the files, the worker building) runs only when
every path in the request is one of the target's own, so the fuzzer never opens host
files a mutation happened to name.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from atheris import FuzzedDataProvider

from popek.api.server import _body
from popek.machine.config import BIOS_NAMES, ConfigError, MachineConfig, config_from_json
from popek.machine.loader import ImageError
from popek.vmm.errors import VmmError
from popek.vmm.hostfiles import HostFiles
from popek.vmm.manager import Vmm
from popek.vmm.paths import PathPolicy
from popek.vmm.records import VmFiles
from popek.vmm.snapshot import SnapshotError
from popek.vmm.vm import Vm
from tests.fuzz.harness import (
    ROOT,
    MemFile,
    Target,
    idle_snapshot,
    json_value,
    scratch_dir,
    worker,
)

LAUNCH_ERRORS = (ConfigError, ImageError, SnapshotError)  # what Vm.launch answers with 400
WORKER_ERRORS = (ConfigError, ImageError, SnapshotError, OSError)  # as Worker.serve reports
STATES = ("creating", "created", "running", "paused", "stopped", "failed")
LIVE = ("created", "running", "paused")
IDS = [f"{i:x}{i:x}{state[:2]}" for i, state in enumerate(STATES)]  # ids of _vmm()'s VMs
# How a request may name a VM: by id, id prefix (unique or not), name, or not at all.
REFS = [*IDS, "0", "1", *STATES[:4], "", "nosuchvm"]
OPERATIONS = ("create", "restore", "update", "shutdown", "snapshot")
_loop = asyncio.new_event_loop()
_kernel, _bad_kernel, _disk, _snapshot = (MemFile(n) for n in ("api-kernel", "api-bad-kernel",
                                                               "api-disk", "api-snapshot"))
_OURS = [str(f.path) for f in (_kernel, _bad_kernel, _disk, _snapshot)]
# Paths a request may name: the target's files and harmless host ones (a directory, an
# empty device, an endless one, a missing file) and malformed ones.
PATHS = [*_OURS, "/", "/dev/null", "/dev/zero", "/nonexistent/popek-fuzz", "relative/path", "",
         str(_kernel.path) + "\0x"]
SAFE_PATHS = set(PATHS) - {"relative/path", ""}
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8",
                 "application/json; charset=latin-1", "application/json; charset=bogus",
                 "text/plain", None]
NUMBERS = [0, 1, -1, 50, 100, 10_000, 10_001, 2**31, 2**63, 2**64, 10**30, 16 << 20,
           64 << 20, 256 << 20, (64 << 30) + 4096, 4097, 0.5, 1e308, float("nan"),
           float("inf"), True, False]
# What each operation's fields expect: a kind of value drawn from the tables above.
FIELDS = {
    "create": {"kernel": "path", "initrd": "path", "append": "str", "disks": "disks",
               "mem": "number", "cpus": "number", "bios": "bios", "rng": "any", "nics": "any",
               "name": "name", "start": "any", "cpu_weight": "number", "cpu_cap": "number",
               "mem_overhead": "number"},
    "restore": {"path": "path", "name": "name", "start": "any", "cpu_weight": "number",
                "cpu_cap": "number", "mem_overhead": "number"},
    "update": {"cpu_weight": "number", "cpu_cap": "number"},
    "shutdown": {"line": "str", "timeout": "number", "force": "any"},
    "snapshot": {"path": "path"},
}


def one(data: bytes) -> None:
    if not data:
        return
    _files()
    operation = OPERATIONS[data[0] % len(OPERATIONS)]
    try:
        if data[0] & 0x80:  # then a byte: VM reference and Content-Type; the body
            choice = data[1] if len(data) > 1 else 0
            ref = REFS[choice % len(REFS)]
            content_type = CONTENT_TYPES[choice // len(REFS) % len(CONTENT_TYPES)]
            body = _loop.run_until_complete(_parse(content_type, data[2:]))
        else:  # sent as the server would receive it
            fdp = FuzzedDataProvider(data[1:])
            ref = fdp.PickValueInList(REFS) if fdp.ConsumeBool() else fdp.ConsumeUnicode(6)
            raw = json.dumps(_request(fdp, operation)).encode()
            body = _loop.run_until_complete(_parse("application/json", raw))
        # The owner's socket checks no path; TCP (or --restrict-paths) allows some roots.
        paths = PathPolicy([ROOT / "images"] if data[0] & 0x40 else None)
        _loop.run_until_complete(_operate(_vmm(operation), operation, ref, body, paths))
    except VmmError:
        pass


def _vmm(operation: str) -> Vmm:
    """A VMM holding a VM in every state, none of them with a worker, each with its
    directory in the VMM's state directory. (For a snapshot, a live VM's state is left
    out: the VMM would create the file, where a mutation says, before it asks the worker
    that is not there.)"""
    vmm = Vmm(_state_dir())
    for vm_id, state in zip(IDS, STATES, strict=True):
        if operation == "snapshot" and state in LIVE:
            continue
        vm = Vm(vm_id, state, VmFiles(vmm.state_dir, vm_id), cpu_weight=100, cpu_cap=None,
                mem_overhead=None)
        vm.state = state
        vm._stopped.set()  # so a shutdown's wait ends at once, as for a guest that powered off
        vmm.vms[vm.id] = vm
    return vmm


async def _parse(content_type: str | None, raw: bytes) -> Any:
    # The connection a body arrives on only matters to flow control: a Mock stands in,
    # as in aiohttp's own tests.
    payload = StreamReader(mock.Mock(_reading_paused=False), 1 << 16,
                           loop=asyncio.get_running_loop())
    payload.feed_data(raw)
    payload.feed_eof()
    headers = {"Content-Type": content_type} if content_type else {}
    request = make_mocked_request("POST", "/v1/vms", headers={**headers,
                                  "Content-Length": str(len(raw))}, payload=payload)
    return await _body(request)


async def _operate(vmm: Vmm, operation: str, ref: str, body: dict[str, Any],
                   paths: PathPolicy) -> None:
    if operation == "create":
        _build(*vmm.check_create(body, paths))
    elif operation == "restore":
        _build(*await vmm.check_restore(body, paths))
    elif operation == "update":
        await vmm.update(ref, body)
    elif operation == "shutdown":
        await vmm.shutdown(ref, body)
    else:
        await vmm.snapshot(ref, body, paths)


def _build(vm: Vm, spec: dict[str, Any], config: MachineConfig) -> None:
    """What a launch does with a spec: the VMM opens the files it names (and the NICs of
    ``config``: here, sockets of the target's), then the worker builds its machine from
    them and limits its memory."""
    json.dumps(spec)  # it travels to the worker as JSON
    named = [spec["restore"]] if "restore" in spec else \
        config_from_json(spec["config"]).host_paths()
    if not {str(path) for path in named} <= SAFE_PATHS:
        return
    try:
        files = HostFiles.for_spec(spec)
    except LAUNCH_ERRORS:
        return
    with worker({**spec, "files": files, "cpu_cap": vm.cpu_cap,
                 "mem_overhead": vm.mem_overhead}, len(config.nics)) as building:
        try:
            machine = building._build()
        except WORKER_ERRORS:
            return
        finally:
            files.close()
        building._limit_memory()
        building.lift_memory_limit()
        for disk in machine.disks:
            disk.close()


# -- requests built from the bytes --------------------------------------------------------
def _request(fdp: FuzzedDataProvider, operation: str) -> dict[str, Any]:
    fields = FIELDS[operation]
    body: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, len(fields) + 1)):
        if fdp.ConsumeProbability() < 0.9:
            name = fdp.PickValueInList(sorted(fields))
            body[name] = _VALUES[fields[name]](fdp)
        else:
            body[fdp.ConsumeUnicodeNoSurrogates(8)] = json_value(fdp, 2, NUMBERS)
    return body


def _typed(draw: Callable[[FuzzedDataProvider], Any]) -> Callable[[FuzzedDataProvider], Any]:
    """A value of the field's kind mostly, anything else sometimes."""
    return lambda fdp: draw(fdp) if fdp.ConsumeProbability() < 0.8 else json_value(fdp, 2, NUMBERS)


def _disks(fdp: FuzzedDataProvider) -> list[Any]:
    return [{"path": fdp.PickValueInList(PATHS), "readonly": fdp.ConsumeBool()}
            for _ in range(fdp.ConsumeIntInRange(0, 3))]


_VALUES: dict[str, Callable[[FuzzedDataProvider], Any]] = {
    "path": _typed(lambda fdp: fdp.PickValueInList(PATHS)),
    "bios": _typed(lambda fdp: fdp.PickValueInList([*BIOS_NAMES, *PATHS])),
    "disks": _typed(_disks),
    "number": _typed(lambda fdp: fdp.PickValueInList(NUMBERS)),
    "name": _typed(lambda fdp: fdp.PickValueInList([*STATES, "new", ""])),
    "str": _typed(lambda fdp: fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))),
    "any": lambda fdp: json_value(fdp, 2, NUMBERS),
}


@functools.cache
def _state_dir() -> Path:
    """The VMM's state directory, with the directory of every VM :func:`_vmm` holds."""
    state_dir = scratch_dir("api")
    for vm_id in IDS:
        for fd in VmFiles(state_dir, vm_id).create():
            os.close(fd)
    return state_dir


@functools.cache
def _files() -> None:
    """The files the target's paths name: a kernel, a broken one, a disk, a snapshot."""
    from tests.vmm_guests import guest

    _kernel.set(guest("hello").read_bytes())
    _bad_kernel.set(b"\x7fELF" + bytes(60))
    _disk.set(bytes(64 << 10))
    _snapshot.set(idle_snapshot())


def seeds() -> dict[str, bytes]:
    created, restored = OPERATIONS.index("create"), OPERATIONS.index("restore")
    raw, updated = 0x80, OPERATIONS.index("update")
    return {
        "raw-create": bytes([raw | created, 0]) + json.dumps(
            {"kernel": str(_kernel.path), "mem": 16 << 20, "name": "new"}).encode(),
        "raw-restore": bytes([raw | restored, 0]) + json.dumps(
            {"path": str(_snapshot.path)}).encode(),
        "raw-update": bytes([raw | updated, 2]) + b'{"cpu_weight": 200, "cpu_cap": 50}',
        "raw-not-utf8": bytes([raw | created, 0]) + b'{"name": "\xff"}',
    }


TARGET = Target(one=one, ci_runs=800, max_len=4096, seeds=seeds)
