"""Live migration between two VMMs: how they meet, and how the outcome is settled.

The guest's memory and state travel worker to worker (:mod:`popek.vmm.migration`); the
VMMs only set the connection up and settle the end, each through its own policy:

1. The source VMM checks the request (the VM runs; the destination is a Unix socket path
   its path policy allows, or ``tcp:HOST:PORT`` with the destination's API token) and
   asks the destination VMM, over its REST API, to expect the guest
   (``POST /v1/migrations``: id, name, configuration, CPU settings).
2. The destination VMM checks the configuration against *its* path policy and networks,
   refuses a request from itself, lists the VM as ``incoming`` and opens a one-shot
   listener: TCP on the address its API was reached at, or a Unix socket in its state
   directory. It answers with the listener's address and a random ticket.
3. The source VMM connects (workers may not: their seccomp filter has no ``connect``),
   sends the ticket, and hands the socket to the guest's worker, which streams. The
   destination VMM accepts only a connection that brings the ticket within
   :data:`ACCEPT_TIMEOUT`, and starts the destination's worker with it.
4. When the source's worker reports, its VMM settles the destination's copy over the
   API (see :mod:`popek.vmm.migration` for why it must): resumed if the source committed
   and it waits paused, deleted if the source did not commit. The source's VM ends
   ``migrated`` and is removed after :data:`MIGRATED_LINGER` seconds, so that
   ``GET /v1/vms/{vm}`` shows how it went.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popek.api.client import ApiError, Client
from popek.machine.config import ConfigError, MachineConfig, config_from_json, config_to_json
from popek.vmm.errors import BadRequest, Conflict, VmmError
from popek.vmm.hostfiles import PassedFd
from popek.vmm.migration import DEFAULT_MAX_DOWNTIME
from popek.vmm.paths import PathPolicy
from popek.vmm.vm import LIVE, Vm

if TYPE_CHECKING:
    from popek.vmm.manager import Vmm

ACCEPT_TIMEOUT = 30.0  # seconds the source has to connect, and to send its ticket
CONNECT_TIMEOUT = 10.0
MIGRATION_TIMEOUT = 24 * 3600.0  # the destination's worker is ready once the guest is in
SETTLE_TIMEOUT = 120.0  # seconds the source's VMM tries to settle the destination's copy
MIGRATED_LINGER = 30.0  # seconds a migrated VM stays listed on its source
TICKET_BYTES = 16
_INCOMING_FIELDS = {"id", "name", "config", "cpu_weight", "cpu_cap", "mem_overhead",
                    "source_vmm", "disk_bytes"}


@dataclass(frozen=True)
class Destination:
    """Another VMM, as ``popek vm migrate --to`` names it."""

    text: str
    socket_path: Path | None = None
    url: str | None = None
    token: str | None = None

    def client(self) -> Client:
        return Client(self.socket_path, url=self.url, token=self.token)


def parse_destination(to: Any, token: Any, paths: PathPolicy) -> Destination:
    """BadRequest (or Forbidden, by ``paths``) unless ``to`` is a Unix socket path or
    ``tcp:HOST:PORT`` with a ``token``."""
    from popek.vmm.cli import host_port

    if not isinstance(to, str) or not to:
        raise BadRequest("'to' must be the destination VMM: a Unix socket path or "
                         "tcp:HOST:PORT")
    if token is not None and not isinstance(token, str):
        raise BadRequest("'token' must be a string")
    if to.startswith("tcp:"):
        address = host_port(to[4:])
        if address is None:
            raise BadRequest(f"{to}: use tcp:HOST:PORT, such as tcp:127.0.0.1:8080")
        if token is None:
            raise BadRequest(f"{to}: a TCP destination needs its API token (--token-file)")
        host, port = address
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return Destination(to, url=url, token=token)
    return Destination(to, socket_path=paths.check(to))


# -- the source ------------------------------------------------------------------------------------
async def migrate_out(vmm: Vmm, vm: Vm, body: dict[str, Any], paths: PathPolicy) -> None:
    """Start moving ``vm`` to the destination ``body`` names; returns once the guest's
    worker streams (the outcome shows in the VM's ``migration``)."""
    unknown = set(body) - {"to", "token", "max_downtime", "copy_disks", "disk_paths",
                           "postcopy", "max_bandwidth"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    dest = parse_destination(body.get("to"), body.get("token"), paths)
    max_downtime = body.get("max_downtime", DEFAULT_MAX_DOWNTIME)
    if not isinstance(max_downtime, int | float) or not 0 < max_downtime <= 60:
        raise BadRequest("'max_downtime' must be a number of seconds in (0, 60]")
    postcopy = body.get("postcopy", False)
    if not isinstance(postcopy, bool):
        raise BadRequest("'postcopy' must be true or false")
    max_bandwidth = body.get("max_bandwidth")
    if max_bandwidth is not None and (not isinstance(max_bandwidth, int | float)
                                      or isinstance(max_bandwidth, bool)
                                      or not max_bandwidth >= 4096):
        raise BadRequest("'max_bandwidth' must be bytes a second, at least 4096")
    config, copied = _disk_copies(vm.config, body.get("copy_disks", False),
                                  body.get("disk_paths"))
    vm.check_migratable()
    try:
        async with dest.client() as peer:
            offer = await peer.request("POST", "/v1/migrations", {
                "id": vm.id, "name": vm.name, "config": config,
                "cpu_weight": vm.cpu_weight, "cpu_cap": vm.cpu_cap,
                "mem_overhead": vm.mem_overhead, "source_vmm": vmm.instance,
                "disk_bytes": copied})
    except ApiError as err:
        raise BadRequest(f"destination {dest.text}: {err}") from None
    try:
        address, ticket = str(offer["address"]), str(offer["ticket"])
        if not address.startswith("tcp:"):
            paths.check(address)
        sock = await asyncio.wait_for(asyncio.to_thread(_connect, address, ticket),
                                      CONNECT_TIMEOUT)
    except (OSError, TimeoutError, KeyError, TypeError, VmmError) as err:
        vmm.spawn(settle_destination(dest, vm.id, committed=False))
        raise BadRequest(f"destination {dest.text}: cannot open the migration connection "
                         f"({err or type(err).__name__})") from None
    call = await vm.migrate(sock, dest.text, float(max_downtime),
                            [int(index) for index in copied], postcopy, max_bandwidth)
    vmm.spawn(_settle(vmm, vm, dest, call))


def _disk_copies(config: dict[str, Any], copy: Any, disk_paths: Any,
                 ) -> tuple[dict[str, Any], dict[str, int]]:
    """The configuration the destination gets, and the disks copied (index: bytes): with
    ``copy``, every writable disk, each to the next of ``disk_paths`` (else its path)."""
    if not isinstance(copy, bool):
        raise BadRequest("'copy_disks' must be true or false")
    if disk_paths is not None and (not copy or not isinstance(disk_paths, list) or
                                   not all(isinstance(p, str) and p for p in disk_paths)):
        raise BadRequest("'disk_paths' goes with copy_disks, a list of paths")
    if not copy:
        return config, {}
    disks = [dict(disk) for disk in config.get("disks", [])]
    writable = [index for index, disk in enumerate(disks) if not disk.get("readonly")]
    if not writable:
        raise BadRequest("--copy-disks: the VM has no writable disk to copy")
    if disk_paths is not None and len(disk_paths) != len(writable):
        raise BadRequest(f"--disk-path: {len(disk_paths)} given for {len(writable)} "
                         "writable disk(s)")
    copied = {}
    for n, index in enumerate(writable):
        try:
            copied[str(index)] = os.stat(disks[index]["path"]).st_size
        except OSError as err:
            raise BadRequest(f"disk {disks[index]['path']}: {err.strerror}") from None
        if disk_paths is not None:
            disks[index]["path"] = disk_paths[n]
    return {**config, "disks": disks}, copied


def _connect(address: str, ticket: str) -> socket.socket:
    from popek.vmm.cli import host_port

    if address.startswith("tcp:"):
        host, port = host_port(address[4:]) or ("", 0)
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    try:
        sock.sendall(ticket.encode())
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


async def _settle(vmm: Vmm, vm: Vm, dest: Destination,
                  call: asyncio.Future[dict[str, Any]]) -> None:
    try:
        result = await call
    except VmmError as err:
        vm.migration.update(state="failed", error=str(err))
        vm.save()
        await settle_destination(dest, vm.id, committed=False)
        return
    vm.migration.update(state="done", finished=time.time(), **result)
    vm.save()
    await settle_destination(dest, vm.id, committed=True)
    await vm.wait_stopped()
    await forget_migrated(vmm, vm)


async def forget_migrated(vmm: Vmm, vm: Vm) -> None:
    """Remove a VM that migrated away once it has been listed ``migrated`` for
    :data:`MIGRATED_LINGER` seconds (its record keeps it listed across VMM restarts)."""
    finished = (vm.migration or {}).get("finished")
    since = time.time() - finished if isinstance(finished, float) else 0.0
    await asyncio.sleep(max(0.0, MIGRATED_LINGER - since))
    if vmm.vms.get(vm.id) is vm:
        vmm.forget(vm)


async def settle_destination(dest: Destination, vm_id: str, committed: bool) -> None:
    """Once the destination's copy of ``vm_id`` has arrived (or failed to): resume it if
    the source ``committed`` and it waits paused; delete it if the source did not."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with dest.client() as peer:
                info = await peer.info(vm_id)
                state = info["state"]
                if state in ("incoming", "creating"):
                    await asyncio.sleep(0.1)
                    continue
                if committed and state == "paused":
                    await peer.action(vm_id, "resume")
                elif not committed and state in LIVE:
                    await peer.delete(vm_id)
                return
        except ApiError as err:
            if err.status == 404:
                return  # the destination dropped it
            await asyncio.sleep(1.0)  # the link to the destination VMM: try again
    print(f"popek VMM: warning: could not settle VM {vm_id} on {dest.text}; it may be "
          f"paused there", file=sys.stderr, flush=True)


# -- the destination -------------------------------------------------------------------------------
async def expect_incoming(vmm: Vmm, body: dict[str, Any], paths: PathPolicy,
                          local: Any) -> dict[str, Any]:
    """Get ready for the guest ``body`` describes: the VM listed ``incoming``, and a
    listener, near ``local`` (where the request came in), that takes the source's
    connection. Returns the listener's address and the ticket the source must show."""
    unknown = set(body) - _INCOMING_FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    if body.get("source_vmm") == vmm.instance:
        raise BadRequest("the destination is the source itself")
    vm_id = body.get("id")
    if not isinstance(vm_id, str) or not re.fullmatch(r"[0-9a-f]{12}", vm_id):
        raise BadRequest("'id' must be a VM id (12 hex digits)")
    try:
        config = config_from_json(body.get("config"))
    except ConfigError as err:
        raise BadRequest(str(err)) from None
    paths.check_config(config)
    vmm.networks.check(config)
    for old in list(vmm.vms.values()):
        if old.id == vm_id or old.name == body.get("name"):
            if old.state != "migrated":
                raise Conflict(f"VM {old.name} ({old.id}) exists on the destination")
            vmm.forget(old)  # it left from here before, and now comes back
    created = _create_disk_copies(config, body.get("disk_bytes") or {})
    vm = vmm._new_vm({k: v for k, v in body.items() if k in ("name", "cpu_weight", "cpu_cap",
                                                             "mem_overhead")}, vm_id=vm_id)
    vm.state = "incoming"
    vm.config = config_to_json(config)
    listener, address = _listen(vmm.state_dir, vm_id, local)
    ticket = secrets.token_hex(TICKET_BYTES)
    vmm.vms[vm.id] = vm
    vmm.spawn(_take_incoming(vmm, vm, listener, ticket, created))
    return {"id": vm.id, "address": address, "ticket": ticket}


def _listen(state_dir: Path, vm_id: str, local: Any) -> tuple[socket.socket, str]:
    if isinstance(local, tuple):  # the API was reached over TCP: listen beside it
        host = local[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, 0), family=family, backlog=1)
        port = sock.getsockname()[1]
        return sock, f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
    path = state_dir / f"migrate-{vm_id}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_mask)
    sock.listen(1)
    return sock, str(path)


def _create_disk_copies(config: MachineConfig, sizes: Any) -> list[Path]:
    """The new images the source copies its disks into (index: bytes), made empty at
    their size; Conflict if one exists (a copy never overwrites a file)."""
    if not isinstance(sizes, dict) or not all(
            isinstance(k, str) and k.isdigit() and int(k) < len(config.disks)
            and not config.disks[int(k)].readonly and type(v) is int and v >= 0
            for k, v in sizes.items()):
        raise BadRequest("'disk_bytes' must map writable disk indexes to sizes")
    created: list[Path] = []
    try:
        for index, size in sizes.items():
            path = Path(config.disks[int(index)].path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            created.append(path)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
    except OSError as err:
        _remove(created)
        if isinstance(err, FileExistsError):
            raise Conflict(f"{err.filename} exists on the destination: a disk copy goes "
                           "to a new file (name one with --disk-path)") from None
        raise BadRequest(f"cannot create {err.filename} on the destination: "
                         f"{err.strerror}") from None
    return created


def _remove(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


async def _take_incoming(vmm: Vmm, vm: Vm, listener: socket.socket, ticket: str,
                         created: list[Path]) -> None:
    """Accept the source's connection (with the ticket) and start the worker on it; the
    disk copies ``created`` for it go if the guest does not arrive."""
    try:
        conn = await _accept(listener, ticket.encode())
    except (OSError, TimeoutError):
        vmm.vms.pop(vm.id, None)
        _remove(created)
        return
    finally:
        if listener.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(listener.getsockname())
        listener.close()
    vm.state = "creating"
    try:
        await vmm._launch(vm, {"config": vm.config, "incoming": PassedFd(conn.fileno())},
                          False, config_from_json(vm.config), ready_timeout=MIGRATION_TIMEOUT)
    except VmmError as err:
        vmm.vms.pop(vm.id, None)
        _remove(created)
        print(f"popek VMM: incoming VM {vm.name} ({vm.id}) did not arrive: {err}",
              file=sys.stderr, flush=True)
    finally:
        conn.close()


async def _accept(listener: socket.socket, ticket: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    async with asyncio.timeout(ACCEPT_TIMEOUT):
        while True:
            conn, _ = await loop.sock_accept(listener)
            got = b""
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(5):
                    while len(got) < len(ticket):
                        chunk = await loop.sock_recv(conn, len(ticket) - len(got))
                        if not chunk:
                            break
                        got += chunk
            if hmac.compare_digest(got, ticket):
                conn.setblocking(True)
                return conn
            conn.close()
