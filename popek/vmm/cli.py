"""``popek serve`` (the VMM service) and ``popek vm ...`` (its command-line client).

``popek vm`` speaks only the REST API, like ``docker`` to ``dockerd``: anything it does,
a script can do with the SDK (:mod:`popek.api.client`) or curl on the socket. Only the
argument parsers live here; the server and the commands (aiohttp, rich) are imported
when used, so other ``popek`` commands start without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from popek.api.endpoint import default_socket
from popek.machine.config import add_config_args, cli_type, parse_size


# -- popek serve ------------------------------------------------------------------------------
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None,
                        help=f"Unix socket to listen on (default {default_socket()})")
    parser.add_argument("--tcp", metavar="HOST:PORT",
                        help="also listen on TCP; HOST must be a loopback address")


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the VMM until SIGINT or SIGTERM; then every guest is killed."""
    tcp = None
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not port.isdigit() or not _is_loopback(host):
            print(f"popek serve: error: --tcp {args.tcp}: use a loopback HOST:PORT such as "
                  "127.0.0.1:8080 (the API has no authentication)", file=sys.stderr)
            return 2
        tcp = (host, int(port))
    import asyncio

    from popek.vmm.service import serve

    return asyncio.run(serve(args.socket or default_socket(), tcp))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- popek vm ---------------------------------------------------------------------------------
def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (try 50%)") from None
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError("a CPU cap is from 1% to 100% of one core")
    return value


def add_vm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None,
                        help=f"the VMM's socket (default {default_socket()})")
    sub = parser.add_subparsers(dest="vm_command", required=True, metavar="COMMAND")

    create = sub.add_parser("create", help="create a VM and start it (prints its id)")
    create.add_argument("--name", help="a unique name (default vmN)")
    add_config_args(create)
    _cpu_args(create)
    create.add_argument("--mem-overhead", type=cli_type(parse_size), metavar="SIZE",
                        help="host memory the VM may use beyond its RAM (512M)")
    create.add_argument("--no-start", action="store_true", help="create only")

    sub.add_parser("ls", help="list VMs")
    for name, text in (("info", "show everything about a VM"),
                       ("start", "start created VMs"), ("pause", "pause running VMs"),
                       ("resume", "resume paused VMs"), ("kill", "stop VMs at once"),
                       ("rm", "kill and remove VMs"), ("logs", "print a VM's recent console")):
        p = sub.add_parser(name, help=text)
        p.add_argument("vms", nargs="+" if name not in ("info", "logs") else None,
                       metavar="VM")
        if name == "info":
            p.add_argument("--json", action="store_true", help="the API's JSON")

    stop = sub.add_parser("stop", help="power off gracefully, kill after --timeout")
    stop.add_argument("vms", nargs="+", metavar="VM")
    stop.add_argument("--timeout", type=float, default=30, help="seconds (30)")
    stop.add_argument("--line", default="poweroff\n",
                      help="what to type on the guest console (\"poweroff\\n\")")

    update = sub.add_parser("update", help="change a VM's CPU weight or cap")
    update.add_argument("vms", metavar="VM")
    _cpu_args(update)
    update.add_argument("--no-cap", action="store_true", help="remove the CPU cap")

    console = sub.add_parser("console", help="attach to a VM's console (Ctrl-A X detaches)")
    console.add_argument("vms", metavar="VM")

    snap = sub.add_parser("snapshot", help="save a VM (running or paused) to a file")
    snap.add_argument("vms", metavar="VM")
    snap.add_argument("file", type=Path)

    restore = sub.add_parser("restore", help="a new VM from a snapshot (clones with --count)")
    restore.add_argument("file", type=Path)
    restore.add_argument("--name")
    restore.add_argument("--count", type=int, default=1, help="clones to start (1)")
    _cpu_args(restore)
    restore.add_argument("--no-start", action="store_true")


def _cpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-weight", type=int, metavar="W",
                        help="share under contention, 1 to 10000 (100)")
    parser.add_argument("--cpu-cap", type=_percent, metavar="PCT",
                        help="ceiling in percent of one host core, e.g. 50%%")


def cmd_vm(args: argparse.Namespace) -> int:
    from popek.vmm.commands import run

    return run(args)
