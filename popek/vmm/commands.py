"""What each ``popek vm`` subcommand does: one API call or a few, shown with rich.

Tables and progress go the way docker and virsh users expect: ``create`` and
``restore`` print ids on stdout (so ``$(popek vm create ...)`` works), ``ls`` and
``info`` print tables, long operations show a spinner or a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSCloseCode
from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table
from rich.text import Text

from popek import images
from popek.api import token
from popek.api.client import ApiError, Client
from popek.api.endpoint import default_token_file
from popek.api.token import TokenError
from popek.machine.config import config_from_args, config_to_json
from popek.vmm import agent_commands

EXIT_ERROR = 1
EXIT_USAGE = 2  # the request was refused, nothing changed
MIGRATE_POLL = 0.2  # seconds between looks at a migration's progress
err_console = Console(stderr=True, soft_wrap=True)
# Piped output is not cut to 80 columns: ids and states must stay whole for scripts.
out_console = Console(width=None if sys.stdout.isatty() else 160)


def run(args: argparse.Namespace) -> int:
    """Run one `popek vm` subcommand; returns the exit status."""
    try:
        return asyncio.run(_vm(args))
    except (ApiError, TokenError) as err:
        err_console.print(f"popek vm {args.vm_command}: error: {err}", markup=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


async def _vm(args: argparse.Namespace) -> int:
    secret = token.read(args.token_file or default_token_file()) if args.tcp else None
    async with Client(args.socket, url=args.tcp, token=secret) as client:
        command = _COMMANDS[args.vm_command]
        return await command(client, args) or 0


def _cpu_opts(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.cpu_weight is not None:
        opts["cpu_weight"] = args.cpu_weight
    if args.cpu_cap is not None:
        opts["cpu_cap"] = args.cpu_cap
    return opts


async def _create(client: Client, args: argparse.Namespace) -> None:
    config = images.with_bundled_guest(config_from_args(args)).absolute()
    spec: dict[str, Any] = {**config_to_json(config), "start": not args.no_start,
                            **_cpu_opts(args)}
    if args.name:
        spec["name"] = args.name
    if args.mem_overhead is not None:
        spec["mem_overhead"] = args.mem_overhead
    with err_console.status("Creating VM…"):
        vm = await client.create(**spec)
    print(vm["id"])


async def _ls(client: Client, args: argparse.Namespace) -> None:
    table = Table(box=None, header_style="bold")
    for column in ("VM ID", "NAME", "STATE", "CPUS", "MEM", "CPU%", "CAP", "RSS", "MIPS",
                   "UPTIME", "IMAGE"):
        table.add_column(column, no_wrap=column in ("VM ID", "NAME", "STATE"),
                         justify="right" if column in ("CPUS", "MEM", "CPU%", "RSS", "MIPS")
                         else "left")
    for vm in await client.list():
        config, cpu, mem = vm["config"], vm["cpu"], vm["memory"]
        table.add_row(
            vm["id"], vm["name"], _state(vm), str(config.get("cpus", "")),
            _size(config.get("mem", 0)), f"{cpu['percent']:.0f}",
            f"{cpu['cap_percent']:.0f}%" if cpu["cap_percent"] else "-",
            _size(mem.get("rss_bytes")) if "rss_bytes" in mem else "-",
            _mips(vm), _uptime(vm),
            Path(vm["source_snapshot"] or config.get("kernel", "")).name)
    out_console.print(table)


def _state(vm: dict[str, Any]) -> str:
    state = vm["state"]
    if state == "stopped" and vm["exit"]:
        return f"stopped ({vm['exit']['kind']} {vm['exit']['code']})"
    return state


def _size(n: int | None) -> str:
    if not n:
        return "0"
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit in ("B", "K") else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _mips(vm: dict[str, Any]) -> str:
    seconds = vm["cpu"]["vcpu_seconds"]
    return f"{vm['instructions'] / seconds / 1e6:.2f}" if seconds else "-"


def _uptime(vm: dict[str, Any]) -> str:
    if not vm["started"] or vm["state"] not in ("running", "paused"):
        return "-"
    seconds = int(time.time() - vm["started"])
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


async def _info(client: Client, args: argparse.Namespace) -> None:
    vm = await client.info(args.vms)
    if args.json:
        out_console.print_json(data=vm)
        return
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [("id", vm["id"]), ("name", vm["name"]), ("state", _state(vm)),
            ("pid", str(vm["pid"]))]
    if vm["failure"]:
        rows.append(("failure", vm["failure"]))
    if vm["source_snapshot"]:
        rows.append(("restored from", vm["source_snapshot"]))
    if vm.get("migration"):
        m = vm["migration"]
        rows.append(("migration", f"to {m['to']}: {m['state']}" + (
            f" ({m['error']})" if m.get("error") else
            f", downtime {m['downtime_ms']:.0f} ms, {_size(m['bytes_sent'])} sent"
            if m["state"] == "done" else f", {m.get('phase', '')}")))
    rows += [(key, str(value)) for key, value in vm["config"].items()]
    cpu = vm["cpu"]
    rows += [("cpu", f"{cpu['percent']}% of a core ({cpu['host_share_percent']}% of the "
                     f"host), weight {cpu['weight']} (nice {cpu['nice']}), cap "
                     f"{cpu['cap_percent'] or 'none'}"),
             ("vcpu time", f"{cpu['vcpu_seconds']:.2f} s (throttled "
                           f"{cpu['throttled_seconds']:.2f} s)"),
             ("instructions", f"{vm['instructions']:,} ({_mips(vm)} MIPS)"),
             ("traps", ", ".join(f"{k} {v:,}" for k, v in vm["traps"].items()) or "none"),
             ("memory", ", ".join(f"{k.removesuffix('_bytes')} {_size(v)}"
                                  for k, v in vm["memory"].items() if v is not None)),
             ("console", f"{vm['console']['bytes']:,} bytes"), *_balloon(vm),
             *_confinement(vm)]
    for key, value in rows:
        table.add_row(key, value)
    out_console.print(table)


def _balloon(vm: dict[str, Any]) -> list[tuple[str, str]]:
    balloon = vm.get("balloon")
    if not balloon:
        return []
    guest = ", ".join(f"{k.replace('_', ' ')} {_size(v) if 'memory' in k or 'caches' in k else v}"
                      for k, v in balloon["guest"].items())
    return [("balloon", f"target {_size(balloon['target_bytes'])}, held "
                        f"{_size(balloon['actual_bytes'])} (dropped "
                        f"{_size(balloon['inflated_bytes'])}), free pages reported "
                        f"{_size(balloon['reported_bytes'])}"),
            *([("guest memory", guest)] if guest else [])]


def _confinement(vm: dict[str, Any]) -> list[tuple[str, str | Text]]:
    """What confines the worker, as the kernel reported it, and what is weaker than it
    should be (shown as warnings)."""
    jail = vm.get("confinement") or {}
    if not jail:
        return []
    caps = "no capabilities" if not int(jail["capabilities"], 16) else \
        f"capabilities {jail['capabilities']}"
    rows = [("confinement", f"uid {jail['uid']}, gid {jail['gid']}, {caps}, "
                            f"{'no_new_privs, ' if jail['no_new_privs'] else ''}"
                            f"seccomp {jail['seccomp']}"),
            ("limits held by", jail["limits"])]
    return rows + [("warning", Text(w, style="yellow")) for w in jail["warnings"]]


def _each(action: str, verb: str) -> Callable[[Client, argparse.Namespace], Awaitable[int]]:
    async def run(client: Client, args: argparse.Namespace) -> int:
        status = 0
        for ref in args.vms:
            try:
                if action == "rm":
                    await client.delete(ref)
                else:
                    await client.action(ref, action)
                print(ref)
            except ApiError as err:
                err_console.print(f"popek vm {verb}: {ref}: {err}", markup=False)
                status = EXIT_ERROR
        return status

    return run


async def _stop(client: Client, args: argparse.Namespace) -> int:
    status = 0
    for ref in args.vms:
        try:
            with err_console.status(f"Waiting for {ref} to power off…"):
                vm = await client.action(ref, "shutdown", line=args.line, timeout=args.timeout)
            how = "killed after the timeout" if vm["exit"]["kind"] == "killed" else "powered off"
            err_console.print(f"{ref}: {how}")
        except ApiError as err:
            err_console.print(f"popek vm stop: {ref}: {err}", markup=False)
            status = EXIT_ERROR
    return status


async def _update(client: Client, args: argparse.Namespace) -> None:
    changes = _cpu_opts(args)
    if args.no_cap:
        changes["cpu_cap"] = None
    if args.balloon is not None:
        changes["balloon"] = args.balloon
    vm = await client.update(args.vms, **changes)
    print(f"{vm['name']}: weight {vm['cpu']['weight']} (nice {vm['cpu']['nice']}), "
          f"cap {vm['cpu']['cap_percent'] or 'none'}"
          + (f", balloon target {_size(args.balloon)} left to the guest"
             if args.balloon is not None else ""))


async def _logs(client: Client, args: argparse.Namespace) -> None:
    sys.stdout.buffer.write(await client.console_log(args.vms))
    sys.stdout.flush()


async def _snapshot(client: Client, args: argparse.Namespace) -> None:
    with err_console.status(f"Saving {args.vms} to {args.file}…"):
        result = await client.snapshot(args.vms, args.file, args.diff)
    err_console.print(f"Saved {result['path']}: {_size(result['ram_bytes'])} of RAM stored "
                      f"(file {_size(result['file_bytes'])}, sparse) in "
                      f"{result['seconds'] * 1000:.0f} ms")


async def _migrate(client: Client, args: argparse.Namespace) -> int:
    """Start the migration, follow it with a progress bar, then say how it went. A
    request refused before anything moved exits with status 2."""
    options: dict[str, Any] = {"max_downtime": args.max_downtime / 1000}
    to = args.to
    try:
        if args.dest_token_file is not None:
            options["token"] = token.read(args.dest_token_file)
        if not to.startswith("tcp:"):
            to = str(Path(to).absolute())
        vm = await client.migrate(args.vms, to, **options)
    except (ApiError, TokenError) as err:
        err_console.print(f"popek vm migrate: error: {err}", markup=False)
        return EXIT_USAGE
    migration = vm["migration"]
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[detail]}"),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(f"Migrating {vm['name']} to {args.to}", total=None,
                                 detail="")
        while migration["state"] == "migrating":
            await asyncio.sleep(MIGRATE_POLL)
            migration = (await client.info(vm["id"]))["migration"]
            sent, left = migration.get("pages_sent", 0), migration.get("pages_left", 0)
            progress.update(task, completed=sent, total=sent + left, detail=(
                f"{migration.get('phase', '')}, round {migration.get('round', 0)}, "
                f"{_size(migration.get('bytes_sent', 0))} sent"))
    if migration["state"] == "failed":
        err_console.print(f"popek vm migrate: {vm['name']}: migration failed: "
                          f"{migration['error']} ({vm['name']} runs on here)", markup=False)
        return EXIT_ERROR
    err_console.print(f"Migrated {vm['name']} to {args.to}: downtime "
                      f"{migration['downtime_ms']:.0f} ms, total "
                      f"{migration['total_seconds']:.2f} s, {_size(migration['bytes_sent'])} "
                      f"sent in {migration['rounds']} round(s)")
    return 0


async def _restore(client: Client, args: argparse.Namespace) -> None:
    opts = {"start": not args.no_start, **_cpu_opts(args)}
    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task(f"Restoring {args.file.name}", total=args.count)
        for i in range(args.count):
            name = args.name if args.count == 1 else (
                f"{args.name}-{i + 1}" if args.name else None)
            vm = await client.restore(args.file, **({"name": name} if name else {}), **opts)
            print(vm["id"])
            progress.advance(task)


async def _console(client: Client, args: argparse.Namespace) -> int:
    from popek.machine.console import HostConsole
    from popek.vmm.console_script import send_and_settle

    host = HostConsole()
    if not host.interactive and not args.no_stdin:
        await send_and_settle(client, args.vms, sys.stdin.buffer.read(), args.wait,
                              sys.stdout.buffer)
        return 0
    loop = asyncio.get_running_loop()
    async with client.console(args.vms) as ws:
        if host.interactive:
            err_console.print(f"Connected to {args.vms}; Ctrl-A X detaches.")

        def keys() -> None:
            data = host.read(0.0)
            if data:
                loop.create_task(ws.send_bytes(data))
            elif not host.interactive:  # end of piped input: keep showing output
                loop.remove_reader(host.stdin_fd)
            if host.quit_requested:
                loop.create_task(ws.close())
        with host:
            if not args.no_stdin:
                loop.add_reader(host.stdin_fd, keys)
            try:
                async for msg in ws:
                    host.write(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
                    host.flush()
            finally:
                if not args.no_stdin:
                    loop.remove_reader(host.stdin_fd)
        if ws.close_code == WSCloseCode.GOING_AWAY:
            err_console.print(f"The VMM stopped; {args.vms} runs on (popek vm console "
                              f"{args.vms} attaches again once a VMM runs).")
    return 0


async def _debug(client: Client, args: argparse.Namespace) -> int:
    """Wait for gdb at ``--gdb``, then relay its bytes to the VM's stub and back until
    either side hangs up; the guest halts while the debugger holds it."""
    from popek.gdb.server import AddressError, close_listener, listen

    await client.info(args.vms)  # no such VM: say so now, not once gdb has connected
    try:
        listener = listen(args.gdb)
    except AddressError as err:
        err_console.print(f"popek vm debug: error: {err}", markup=False)
        return EXIT_USAGE
    loop = asyncio.get_running_loop()
    try:
        listener.setblocking(False)
        err_console.print(f"Waiting for gdb on {args.gdb} to debug {args.vms}…")
        conn, _ = await loop.sock_accept(listener)
    finally:
        close_listener(listener)
    with conn:
        async with client.debugger(args.vms) as ws:
            async def to_stub() -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await loop.sock_recv(conn, 65536):
                        await ws.send_bytes(data)
                await ws.close()

            sender = asyncio.create_task(to_stub())
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        await loop.sock_sendall(conn, msg.data)
            except ConnectionError:
                pass
            finally:
                sender.cancel()
    err_console.print(f"The debugger left {args.vms}.")
    return 0


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Awaitable[Any]]] = {
    "create": _create, "ls": _ls, "info": _info, "stop": _stop, "update": _update,
    "logs": _logs, "snapshot": _snapshot, "restore": _restore, "console": _console,
    "migrate": _migrate, "debug": _debug,
    "exec": agent_commands.exec_command, "cp": agent_commands.cp_command,
    **{name: _each(name, name) for name in ("start", "pause", "resume", "kill", "rm")},
}
