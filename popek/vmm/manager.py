"""The VMM: every guest on this host, by id and name, and the operations on them.

Requests are checked here before any process starts, so a bad request (unknown field
value, missing image, broken snapshot) is answered with an error and leaves the set of
VMs as it was. Every host path a request names passes the caller's
:class:`~popek.vmm.paths.PathPolicy` first, before anything opens it. Each VM's worker
is a separate process; this module never runs guest code, so no guest can take it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from typing import Any

from popek import images
from popek.machine.config import (
    CONFIG_FIELDS,
    ConfigError,
    MachineConfig,
    config_from_json,
    config_to_json,
)
from popek.vmm import scheduler
from popek.vmm.errors import BadRequest, NotFound
from popek.vmm.paths import PathPolicy
from popek.vmm.snapshot import SnapshotError, read_config
from popek.vmm.vm import Vm

SAMPLE_INTERVAL = 1.0  # seconds between CPU share measurements
DEFAULT_MEM_OVERHEAD = 512 << 20  # address space a worker may add beyond guest RAM
MAX_MEM_OVERHEAD = 1 << 40  # more is no limit, and overflows the worker's RLIMIT_AS
DEFAULT_SHUTDOWN_LINE = "poweroff\n"
_VM_FIELDS = {"name", "start", "cpu_weight", "cpu_cap", "mem_overhead"}


class Vmm:
    """Owns the VMs; every public coroutine is one API operation."""

    def __init__(self) -> None:
        self.vms: dict[str, Vm] = {}
        self._numbers = itertools.count(1)
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Vmm:
        self._sampler = asyncio.create_task(self._sample_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Kill every guest (the VMM is going away; a worker never outlives it)."""
        if self._sampler is not None:
            self._sampler.cancel()
        for vm in list(self.vms.values()):
            vm.kill()
        for vm in list(self.vms.values()):
            if vm.process is not None:
                await vm.wait_stopped()

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            for vm in self.vms.values():
                if vm.alive and vm.meter is not None:
                    vm.meter.sample()

    # -- lookup ---------------------------------------------------------------------------
    def get(self, ref: str) -> Vm:
        """By id, name or unique id prefix (as docker accepts)."""
        if ref in self.vms:
            return self.vms[ref]
        by_name = [vm for vm in self.vms.values() if vm.name == ref]
        if by_name:
            return by_name[0]
        matches = [vm for vm in self.vms.values() if vm.id.startswith(ref)] if ref else []
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"no such VM: {ref}" if not matches else f"{ref!r} is ambiguous")

    def list(self) -> list[dict[str, Any]]:
        return [vm.info() for vm in self.vms.values()]

    # -- creation -------------------------------------------------------------------------
    def _new_vm(self, body: dict[str, Any], source: str | None = None) -> Vm:
        name = body.get("name") or f"vm{next(self._numbers)}"
        if not isinstance(name, str) or any(vm.name == name for vm in self.vms.values()):
            raise BadRequest(f"name {name!r} is taken or not a string")
        weight = body.get("cpu_weight", scheduler.DEFAULT_WEIGHT)
        cap = body.get("cpu_cap")
        overhead = body.get("mem_overhead", DEFAULT_MEM_OVERHEAD)
        _check_cpu(weight, cap)
        if overhead is not None and (not isinstance(overhead, int)
                                     or not 64 << 20 <= overhead <= MAX_MEM_OVERHEAD):
            raise BadRequest("'mem_overhead' must be 64 MiB to 1 TiB (bytes) or null")
        return Vm(secrets.token_hex(6), name, cpu_weight=weight, cpu_cap=cap,
                  mem_overhead=overhead, source=source)

    async def create(self, body: dict[str, Any], paths: PathPolicy) -> Vm:
        """A VM of the configuration in ``body`` (the bundled guest if it names no kernel),
        whose host paths ``paths`` allows."""
        vm, spec = self.check_create(body, paths)
        await self._launch(vm, spec, body.get("start", True))
        return vm

    def check_create(self, body: dict[str, Any], paths: PathPolicy) -> tuple[Vm, dict[str, Any]]:
        """The VM a create request asks for and its worker's spec; BadRequest (or the
        policy's refusal) if the request is malformed. Nothing is started (so the checks
        can be tried alone)."""
        unknown = set(body) - _VM_FIELDS - CONFIG_FIELDS
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            config = config_from_json({k: v for k, v in body.items() if k in CONFIG_FIELDS})
        except ConfigError as err:
            raise BadRequest(str(err)) from None
        config = images.with_bundled_guest(config)
        paths.check_config(config)
        vm = self._new_vm(body)
        _assign_macs(config, vm.id)
        return vm, {"config": config_to_json(config)}

    async def restore(self, body: dict[str, Any], paths: PathPolicy) -> Vm:
        """A new VM from a snapshot file; restoring one file many times makes clones.
        ``paths`` must allow the file and every host path its machine opens."""
        vm, spec = await self.check_restore(body, paths)
        await self._launch(vm, spec, body.get("start", True))
        return vm

    async def check_restore(self, body: dict[str, Any],
                            paths: PathPolicy) -> tuple[Vm, dict[str, Any]]:
        """Like :meth:`check_create`, for a restore request."""
        unknown = set(body) - _VM_FIELDS - {"path"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        path = body.get("path")
        if not isinstance(path, str):
            raise BadRequest("'path' must be the absolute path of a snapshot file")
        paths.check(path)
        try:
            recorded = await asyncio.to_thread(read_config, path)
        except SnapshotError as err:
            raise BadRequest(str(err)) from None
        paths.check_config(recorded)
        return self._new_vm(body, source=path), {"restore": path}

    async def _launch(self, vm: Vm, spec: dict[str, Any], start: bool) -> None:
        try:
            await vm.launch(spec)
        except BaseException:
            with contextlib.suppress(Exception):
                vm.kill()
            raise
        self.vms[vm.id] = vm
        if start:
            await vm.start()

    # -- operations -----------------------------------------------------------------------
    async def delete(self, ref: str) -> None:
        vm = self.get(ref)
        vm.kill()
        if vm.process is not None:
            await vm.wait_stopped()
        del self.vms[vm.id]

    async def shutdown(self, ref: str, body: dict[str, Any]) -> Vm:
        """Graceful power-off; after ``timeout`` seconds, kill if ``force`` (as docker stop)."""
        vm = self.get(ref)
        line = body.get("line", DEFAULT_SHUTDOWN_LINE)
        timeout = body.get("timeout", 30)
        if not isinstance(line, str) or not isinstance(timeout, int | float) or timeout < 0:
            raise BadRequest("'line' must be a string and 'timeout' a number of seconds")
        if not await vm.shutdown(line, float(timeout)) and body.get("force", True):
            vm.kill()
            await vm.wait_stopped()
        return vm

    async def update(self, ref: str, body: dict[str, Any]) -> Vm:
        vm = self.get(ref)
        unknown = set(body) - {"cpu_weight", "cpu_cap"}
        if unknown:
            raise BadRequest(f"only cpu_weight and cpu_cap can change, not {sorted(unknown)}")
        weight = body.get("cpu_weight")
        cap = body.get("cpu_cap")
        _check_cpu(weight if weight is not None else scheduler.DEFAULT_WEIGHT, cap)
        await vm.set_cpu(weight, cap, clear_cap="cpu_cap" in body and cap is None)
        return vm

    async def snapshot(self, ref: str, body: dict[str, Any],
                       paths: PathPolicy) -> dict[str, Any]:
        path = body.get("path")
        if not isinstance(path, str):
            raise BadRequest("'path' must be the absolute path of the snapshot file")
        paths.check(path)
        return await self.get(ref).snapshot(path)


def _assign_macs(config: MachineConfig, vm_id: str) -> None:
    """NICs without a MAC get one of their own, from the VM's random id: guests on one
    switch must differ, and a snapshot or a migration keeps the address."""
    for index, nic in enumerate(config.nics):
        if nic.mac is None:
            nic.mac = "52:54:" + ":".join(vm_id[i:i + 2] for i in (0, 2, 4)) + f":{index:02x}"


def _check_cpu(weight: Any, cap: Any) -> None:
    if not isinstance(weight, int) or not scheduler.MIN_WEIGHT <= weight <= scheduler.MAX_WEIGHT:
        raise BadRequest(f"'cpu_weight' must be an integer from {scheduler.MIN_WEIGHT} to "
                         f"{scheduler.MAX_WEIGHT}")
    if cap is not None and (not isinstance(cap, int | float) or not 0 < cap <= 100):
        raise BadRequest("'cpu_cap' must be a percentage of one core in (0, 100], or null")
