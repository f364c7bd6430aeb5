"""The VMM: every guest on this host, by id and name, and the operations on them.

Requests are checked here before any process starts, so a bad request (unknown field
value, missing image, broken snapshot) is answered with an error and leaves the set of
VMs as it was. Every host path a request names passes the caller's
:class:`~popek.vmm.paths.PathPolicy` first, before anything opens it. Each VM's worker
is a separate process; this module never runs guest code, so no guest can take it down.

The VMs are recorded in the state directory (:mod:`popek.vmm.records`), and their
workers outlive the VMM: a VMM starts by adopting every VM its predecessor recorded
(:meth:`Vmm.__aenter__`), and on its way out either leaves the guests running
(:meth:`Vmm.close`) or powers them off first (:meth:`Vmm.stop_guests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

from popek import images
from popek.machine.config import (
    CONFIG_FIELDS,
    ConfigError,
    MachineConfig,
    config_from_json,
    config_to_json,
)
from popek.net.endpoint import OpenedNic, open_nics
from popek.vmm import hostfiles, migration_peers, pagesharing, procstat, records, scheduler
from popek.vmm.errors import BadRequest, Conflict, NotFound
from popek.vmm.networks import Networks
from popek.vmm.paths import PathPolicy
from popek.vmm.snapshot import SnapshotError, chain, read_config
from popek.vmm.template import Template, suits
from popek.vmm.vm import LIVE, READY_TIMEOUT, Vm

SAMPLE_INTERVAL = 1.0  # seconds between CPU share measurements
DEFAULT_MEM_OVERHEAD = 512 << 20  # address space a worker may add beyond guest RAM
MAX_MEM_OVERHEAD = 1 << 40  # more is no limit, and overflows the worker's RLIMIT_AS
DEFAULT_SHUTDOWN_LINE = "poweroff\n"
HOST_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
SWAP_FLOOR = 1 << 20  # guest RAM held below which a guest is not worth swapping out
_VM_FIELDS = {"name", "start", "cpu_weight", "cpu_cap", "mem_overhead"}
MAX_TEMPLATES = 4  # snapshots whose restore templates are kept (the latest restored)


class Vmm:
    """Owns the VMs; every public coroutine is one API operation."""

    def __init__(self, state_dir: Path, *, page_sharing: bool = True,
                 mem_limit: int = HOST_MEMORY, restore_templates: bool = True) -> None:
        self.state_dir = state_dir
        self.page_sharing = page_sharing  # new workers advise their RAM mergeable
        self.mem_limit = mem_limit  # guest RAM all guests may hold resident together
        self._swapping: asyncio.Task[None] | None = None
        self.restore_templates = restore_templates  # clones fork from a template
        # By snapshot file (path and identity), latest used last.
        self._templates: OrderedDict[tuple[Any, ...], asyncio.Task[Template]] = \
            OrderedDict()
        self.vms: dict[str, Vm] = {}
        self.networks = Networks(state_dir)
        self._watchers: set[asyncio.Task[None]] = set()  # VMs whose ports leave on stop
        self._launches: set[asyncio.Task[Any]] = set()  # requests creating a VM
        self.stopping = False  # stop_guests has begun: no new VM
        self._numbers = itertools.count(1)
        self._sampler: asyncio.Task[None] | None = None
        self.instance = secrets.token_hex(8)  # tells a migration to itself from one elsewhere

    async def __aenter__(self) -> Vmm:
        await self._adopt_all()
        self._sampler = asyncio.create_task(self._sample_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _adopt_all(self) -> None:
        """Every VM recorded in the state directory, as it is now: its worker attached
        if it runs, else how it ended; the networks first, so that the adopted guests'
        switch NICs get new ports. A record that cannot be read is left alone."""
        self.networks.restore()
        found = []
        for files in records.all_vms(self.state_dir):
            try:
                found.append(Vm.from_record(files, files.load()))
            except records.RecordError as err:
                print(f"popek VMM: warning: {err}; left as it is", file=sys.stderr)
        await asyncio.gather(*(vm.adopt() for vm in found if vm.state in LIVE[1:]))
        for vm in found:
            if vm.state == "creating":
                await vm.abandon()
                vm.files.remove()
        for vm in sorted(found, key=lambda vm: vm.created):
            if vm.state != "creating":
                self.vms[vm.id] = vm
            if vm.state == "migrated":
                self.spawn(migration_peers.forget_migrated(self, vm))
            if vm.alive:
                await self._replug(vm)

    async def _replug(self, vm: Vm) -> None:
        """New ports for an adopted guest's switch NICs (its old ones went with the VMM
        that made them); they leave their switches when it stops."""
        config = config_from_json(vm.config)
        try:
            ports = self.networks.connect(vm.id, vm.name, config)
        except BadRequest as err:
            print(f"popek VMM: warning: VM {vm.name}: {err}; its NIC stays unplugged",
                  file=sys.stderr)
            return
        for index, sock in ports.items():
            try:
                await vm.replug(index, sock)
            except (Conflict, OSError, TimeoutError) as err:
                print(f"popek VMM: warning: VM {vm.name}: NIC {index} cannot be plugged "
                      f"into network {config.nics[index].switch} again ({err})",
                      file=sys.stderr)
        if ports:
            self._watchers.add(task := asyncio.create_task(self._leave_networks(vm)))
            task.add_done_callback(self._watchers.discard)

    async def close(self) -> None:
        """The VMM is going away: every guest keeps running, for the next VMM to adopt."""
        if self._sampler is not None:
            self._sampler.cancel()
        for task in self._watchers:
            task.cancel()
        for vm in self.vms.values():
            vm.detach()
        while self._templates:
            await self._drop_template(next(iter(self._templates)))
        await self.networks.close()

    async def stop_guests(self, timeout: float) -> None:
        """Power every guest off as ``popek vm stop`` does, killing those that have not
        within ``timeout`` seconds (a paused guest is resumed to be asked, one that never
        started is killed). VMs being created are waited for and stopped too: their
        workers would otherwise run on, unknown to anyone; no new VM is made."""
        self.stopping = True
        if self._launches:
            await asyncio.wait(self._launches)

        async def stop(vm: Vm) -> None:
            with contextlib.suppress(Exception):
                if vm.state == "paused":
                    await vm.resume()
                if vm.state != "running" or not await vm.shutdown(DEFAULT_SHUTDOWN_LINE,
                                                                  timeout):
                    vm.kill()
            await vm.wait_stopped()
        await asyncio.gather(*(stop(vm) for vm in self.vms.values() if vm.alive))

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            for vm in self.vms.values():
                if vm.alive and vm.meter is not None:
                    vm.meter.sample()
            if self._swapping is None or self._swapping.done():
                self._swapping = asyncio.create_task(self._hold_memory_limit())

    async def _hold_memory_limit(self) -> None:
        """Overcommit: while the guests hold more RAM resident than ``mem_limit``, swap
        out the one idle longest (its console quiet longest), one guest per sample."""
        live = [vm for vm in self.vms.values() if vm.alive and vm.state in LIVE[1:]]
        if sum(procstat.resident(vm.pid) for vm in live) <= self.mem_limit:
            return  # the workers' whole resident sets are an upper bound: no closer look
        held = await asyncio.to_thread(lambda: {
            vm.id: pagesharing.guest_ram(vm.pid, vm.config.get("mem", 0)).get("touched", 0)
            for vm in live})
        if sum(held.values()) <= self.mem_limit:
            return
        idle = [vm for vm in live if held[vm.id] > SWAP_FLOOR]
        if not idle:
            return
        vm = min(idle, key=lambda vm: vm.last_active)
        try:
            await vm.swap_out()
        except (Conflict, TimeoutError) as err:
            print(f"popek VMM: warning: guests hold {sum(held.values()) >> 20} MiB, above "
                  f"--mem-limit {self.mem_limit >> 20} MiB, but {vm.name} cannot swap out: "
                  f"{err}", file=sys.stderr, flush=True)
            vm.last_active = time.monotonic()  # another one next time

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
    def _new_vm(self, body: dict[str, Any], source: str | None = None,
                vm_id: str | None = None) -> Vm:
        taken = {vm.name for vm in self.vms.values()}
        name = body.get("name") or next(f"vm{n}" for n in self._numbers if f"vm{n}" not in taken)
        if not isinstance(name, str) or name in taken:
            raise BadRequest(f"name {name!r} is taken or not a string")
        weight = body.get("cpu_weight", scheduler.DEFAULT_WEIGHT)
        cap = body.get("cpu_cap")
        overhead = body.get("mem_overhead", DEFAULT_MEM_OVERHEAD)
        _check_cpu(weight, cap)
        if overhead is not None and (not isinstance(overhead, int)
                                     or not 64 << 20 <= overhead <= MAX_MEM_OVERHEAD):
            raise BadRequest("'mem_overhead' must be 64 MiB to 1 TiB (bytes) or null")
        vm_id = vm_id or secrets.token_hex(6)
        return Vm(vm_id, name, records.VmFiles(self.state_dir, vm_id), cpu_weight=weight,
                  cpu_cap=cap, mem_overhead=overhead, source=source)

    async def create(self, body: dict[str, Any], paths: PathPolicy) -> Vm:
        """A VM of the configuration in ``body`` (the bundled guest if it names no kernel),
        whose host paths ``paths`` allows."""
        with self._launching():
            vm, spec, config = self.check_create(body, paths)
            await self._launch(vm, spec, body.get("start", True), config)
        return vm

    @contextlib.contextmanager
    def _launching(self) -> Iterator[None]:
        """The current request makes a VM: :meth:`stop_guests` waits for it to finish."""
        if self.stopping:
            raise Conflict("the VMM is stopping its guests")
        task = asyncio.current_task()
        self._launches.add(task)
        try:
            yield
        finally:
            self._launches.discard(task)

    def check_create(self, body: dict[str, Any],
                     paths: PathPolicy) -> tuple[Vm, dict[str, Any], MachineConfig]:
        """The VM a create request asks for, its worker's spec and the configuration whose
        NICs the VMM opens; BadRequest (or the policy's refusal) if the request is
        malformed. Nothing is started or opened (so the checks can be tried alone)."""
        unknown = set(body) - _VM_FIELDS - CONFIG_FIELDS
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            config = config_from_json({k: v for k, v in body.items() if k in CONFIG_FIELDS})
        except ConfigError as err:
            raise BadRequest(str(err)) from None
        config = images.with_bundled_guest(config)
        self.networks.check(config)
        paths.check_config(config)
        vm = self._new_vm(body)
        _assign_macs(config, vm.id)
        return vm, {"config": config_to_json(config)}, config

    async def restore(self, body: dict[str, Any], paths: PathPolicy) -> Vm:
        """A new VM from a snapshot file; restoring one file many times makes clones.
        ``paths`` must allow the file and every host path its machine opens."""
        with self._launching():
            vm, spec, config = await self.check_restore(body, paths)
            await self._launch(vm, spec, body.get("start", True), config,
                               template=await self._template(spec["restore"], config))
        return vm

    async def _template(self, path: str, config: MachineConfig) -> Template | None:
        """The restore template of the snapshot ``path`` (:mod:`popek.vmm.template`),
        started by its first restore; None where clones restore the file themselves (off,
        a machine with NICs or disks, or a template that could not start, logged)."""
        if not self.restore_templates or not suits(config):
            return None
        try:
            info = os.stat(path)
        except OSError:
            return None
        key = (path, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        task = self._templates.get(key)
        if task is not None and task.done() and \
                (task.exception() is not None or not task.result().alive):
            await self._drop_template(key)
            task = None
        if task is None:
            task = self._templates[key] = asyncio.create_task(self._start_template(path))
            while len(self._templates) > MAX_TEMPLATES:
                await self._drop_template(next(iter(self._templates)))
        if key in self._templates:
            self._templates.move_to_end(key)
        try:
            return await asyncio.shield(task)
        except OSError as err:
            print(f"popek VMM: warning: {err}; its clones restore it themselves",
                  file=sys.stderr, flush=True)
            return None

    async def _start_template(self, path: str) -> Template:
        files = await asyncio.to_thread(hostfiles.HostFiles.for_spec, {"restore": path})
        try:
            log = os.open(self.state_dir / "templates.log",
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError:
            files.close()
            raise
        try:
            return await Template.start(path, files, log)
        finally:
            files.close()
            os.close(log)

    async def _drop_template(self, key: tuple[Any, ...]) -> None:
        task = self._templates.pop(key, None)
        with contextlib.suppress(Exception):
            await (await task).close()

    async def check_restore(self, body: dict[str, Any],
                            paths: PathPolicy) -> tuple[Vm, dict[str, Any], MachineConfig]:
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
            await asyncio.to_thread(chain, path, paths.check)  # a diff's bases
        except SnapshotError as err:
            raise BadRequest(str(err)) from None
        paths.check_config(recorded)
        self.networks.check(recorded)
        return self._new_vm(body, source=path), {"restore": path}, recorded

    async def _launch(self, vm: Vm, spec: dict[str, Any], start: bool,
                      config: MachineConfig, ready_timeout: float = READY_TIMEOUT,
                      template: Template | None = None) -> None:
        """Open the guest's NICs here (workers open nothing), then start its worker. Its
        switch NICs get their ports now, and lose them when it stops."""
        try:
            nics = await self._host_ends(vm, config)
        except ConfigError as err:
            raise BadRequest(str(err)) from None
        try:
            await vm.launch({**spec, "page_sharing": self.page_sharing}, nics,
                            ready_timeout, template)
        except BaseException:
            with contextlib.suppress(Exception):
                vm.kill()
            if vm.worker is None:  # no worker to reap them
                vm.release_nics()
            self.networks.disconnect(vm.id)
            vm.files.remove()
            raise
        self.vms[vm.id] = vm
        self._watchers.add(task := asyncio.create_task(self._leave_networks(vm)))
        task.add_done_callback(self._watchers.discard)
        if start:
            await vm.start()

    async def _host_ends(self, vm: Vm, config: MachineConfig) -> list[OpenedNic]:
        """The host end of each of ``config``'s NICs, all or none (ConfigError). A
        ``switch=`` NIC's end is one end of a socket pair whose other end is a new port of
        its switch (made here, in the event loop the switch lives in); the others are
        opened in a thread (passt takes ~30 ms to start)."""
        ports = self.networks.connect(vm.id, vm.name, config)
        try:
            return await asyncio.to_thread(
                open_nics, config.nics, [nic.mac for nic in config.nics], ports)
        except ConfigError:
            self.networks.disconnect(vm.id)
            raise

    async def _leave_networks(self, vm: Vm) -> None:
        await vm.wait_stopped()
        self.networks.disconnect(vm.id)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background for as long as this VMM runs."""
        self._watchers.add(task := asyncio.create_task(work))
        task.add_done_callback(self._watchers.discard)

    def forget(self, vm: Vm) -> None:
        """Drop a VM that has no worker (one that migrated away) and its record."""
        del self.vms[vm.id]
        vm.files.remove()

    # -- operations -----------------------------------------------------------------------
    async def delete(self, ref: str) -> None:
        vm = self.get(ref)
        if vm.state in ("incoming", "creating"):
            raise Conflict(f"VM {vm.name} is arriving; delete it once it has")
        vm.kill()
        await vm.wait_stopped()
        del self.vms[vm.id]
        vm.files.remove()

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
        unknown = set(body) - {"cpu_weight", "cpu_cap", "balloon"}
        if unknown:
            raise BadRequest("only cpu_weight, cpu_cap and balloon can change, not "
                             f"{sorted(unknown)}")
        if "balloon" in body:
            if not isinstance(body["balloon"], int) or isinstance(body["balloon"], bool):
                raise BadRequest("'balloon' is the guest RAM to leave the guest, in bytes")
            await vm.set_balloon(body["balloon"])
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
        diff = body.get("diff")
        if diff is not None:
            if not isinstance(diff, str):
                raise BadRequest("'diff' must be the absolute path of the base snapshot")
            paths.check(diff)
        return await self.get(ref).snapshot(path, diff)

    async def swap(self, ref: str, direction: str) -> dict[str, Any]:
        """``popek vm swap-out`` (``direction`` "out") or ``swap-in``: the VM's info (its
        worker's statistics come before its reply, ``swapped_bytes`` among them)."""
        vm = self.get(ref)
        await (vm.swap_out() if direction == "out" else vm.swap_in())
        return vm.info()

    async def migrate(self, ref: str, body: dict[str, Any], paths: PathPolicy) -> Vm:
        """Start a live migration (:mod:`popek.vmm.migration_peers`)."""
        vm = self.get(ref)
        await migration_peers.migrate_out(self, vm, body, paths)
        return vm

    async def expect_incoming(self, body: dict[str, Any], paths: PathPolicy,
                              local: Any) -> dict[str, Any]:
        return await migration_peers.expect_incoming(self, body, paths, local)


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
