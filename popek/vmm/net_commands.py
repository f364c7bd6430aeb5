"""What each ``popek net`` subcommand does: one API call, shown with rich like ``popek vm``."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from rich.table import Table

from popek.api.client import ApiError, Client
from popek.vmm.commands import EXIT_ERROR, _size, err_console, out_console


def run(args: argparse.Namespace) -> int:
    """Run one `popek net` subcommand; returns the exit status."""
    try:
        return asyncio.run(_net(args))
    except ApiError as err:
        err_console.print(f"popek net {args.net_command}: error: {err}", markup=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


async def _net(args: argparse.Namespace) -> int:
    async with Client(args.socket) as client:
        return await _COMMANDS[args.net_command](client, args) or 0


async def _create(client: Client, args: argparse.Namespace) -> None:
    subnet = None if args.subnet == "none" else args.subnet
    net = await client.create_network(args.name, subnet=subnet, nat=args.nat)
    how = f"{net['subnet']}, gateway {net['gateway']}, DHCP" if net["subnet"] else \
        "a plain Ethernet segment"
    err_console.print(f"{net['name']}: {how}" + (", NAT" if net["nat"] else ""),
                      markup=False)
    print(net["name"])


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True, justify="right" if column in right else "left")
    return table


def _total(ports: list[dict[str, Any]], key: str) -> int:
    return sum(port["counters"][key] for port in ports)


async def _ls(client: Client, args: argparse.Namespace) -> None:
    table = _table("NAME", "SUBNET", "GATEWAY", "NAT", "PORTS", "VMS", "LEASES", "FRAMES",
                   "DROPPED", right=("PORTS", "LEASES", "FRAMES", "DROPPED"))
    for net in await client.networks():
        ports = net["ports"]
        table.add_row(
            net["name"], net["subnet"] or "-", net["gateway"] or "-",
            "yes" if net["nat"] else "no", str(len(ports)),
            ", ".join(sorted({p["vm_name"] for p in ports})) or "-", str(len(net["leases"])),
            f"{_total(ports, 'frames_in'):,}",
            f"{_total(ports, 'dropped_in') + _total(ports, 'dropped_out'):,}")
    out_console.print(table)


async def _info(client: Client, args: argparse.Namespace) -> None:
    net = await client.network(args.name)
    if args.json:
        out_console.print_json(data=net)
        return
    summary = _table("", "")
    summary.show_header = False
    rows = [("name", net["name"]), ("subnet", net["subnet"] or "none (plain segment)")]
    if net["subnet"]:
        rows += [("gateway", f"{net['gateway']} ({net['gateway_mac']})"),
                 ("nat", f"yes, DNS at {net['dns']}" if net["nat"] else "no")]
    rows.append(("flooded", f"{net['flooded']:,} frames"))
    for key, value in rows:
        summary.add_row(key, value)
    out_console.print(summary)

    ports = _table("VM", "NIC", "MAC", "STATE", "FRAMES IN", "BYTES IN", "FRAMES OUT",
                   "BYTES OUT", "DROPPED IN", "DROPPED OUT",
                   right=("NIC", "FRAMES IN", "BYTES IN", "FRAMES OUT", "BYTES OUT",
                          "DROPPED IN", "DROPPED OUT"))
    for port in net["ports"]:
        c = port["counters"]
        ports.add_row(port["vm_name"], str(port["nic"]), port["mac"], port["state"],
                      f"{c['frames_in']:,}", _size(c["bytes_in"]), f"{c['frames_out']:,}",
                      _size(c["bytes_out"]), f"{c['dropped_in']:,}", f"{c['dropped_out']:,}")
    if net["ports"]:
        out_console.print()
        out_console.print(ports)
    if net["leases"]:
        leases = _table("ADDRESS", "MAC", "HOSTNAME", "STATE")
        for lease in net["leases"]:
            leases.add_row(lease["address"], lease["mac"], lease["hostname"] or "-",
                           lease["state"])
        out_console.print()
        out_console.print(leases)
    if net["uplinks"]:
        uplinks = _table("NAT FOR", "ADDRESS", "PASST PID", "STATE", "FRAMES OUT", "FRAMES IN",
                         right=("PASST PID", "FRAMES OUT", "FRAMES IN"))
        for up in net["uplinks"]:
            c = up["counters"]
            uplinks.add_row(up["mac"], up["address"], str(up["pid"] or "-"), up["state"],
                            f"{c.get('frames_out', 0):,}", f"{c.get('frames_in', 0):,}")
        out_console.print()
        out_console.print(uplinks)


async def _rm(client: Client, args: argparse.Namespace) -> int:
    status = 0
    for name in args.names:
        try:
            await client.delete_network(name)
            print(name)
        except ApiError as err:
            err_console.print(f"popek net rm: {name}: {err}", markup=False)
            status = EXIT_ERROR
    return status


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Awaitable[Any]]] = {
    "create": _create, "ls": _ls, "info": _info, "rm": _rm,
}
