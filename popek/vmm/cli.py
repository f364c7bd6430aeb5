"""``popek serve`` (the VMM service) and ``popek vm ...``/``popek net ...`` (its
command-line clients).

``popek vm`` and ``popek net`` speak only the REST API, like ``docker`` to ``dockerd``:
anything they do, a script can do with the SDK (:mod:`popek.api.client`) or curl on the
socket. Only the argument parsers live here; the server and the commands (aiohttp, rich)
are imported when used, so other ``popek`` commands start without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from popek.api.endpoint import default_socket, default_state_dir, default_token_file
from popek.engine.native_cache import add_cache_args, use_cache_args
from popek.machine.config import add_config_args, cli_type, parse_size

DEFAULT_WAIT = 1.0  # seconds of silence that end a scripted `popek vm console`


# -- popek serve ------------------------------------------------------------------------------
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None,
                        help=f"Unix socket to listen on, owner-only (default {default_socket()})")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="the VMM's own files (the API token) and storage/ (disks and "
                        "snapshots that TCP requests may name), created owner-only "
                        f"(default $POPEK_STATE_DIR, else {default_state_dir()})")
    parser.add_argument("--tcp", metavar="HOST:PORT",
                        help="also listen on TCP (plain HTTP), where every request must carry "
                        "the API token (Authorization: Bearer) and may name only allowed "
                        "paths; HOST must be a loopback address unless --allow-remote")
    parser.add_argument("--allow-remote", action="store_true",
                        help="let --tcp listen on a non-loopback address; the token and "
                        "everything else then cross the network in clear text (prefer an SSH "
                        "tunnel to the Unix socket)")
    parser.add_argument("--token-file", type=Path, metavar="PATH",
                        help="the API token for --tcp, in an owner-only file, created with a "
                        "random token if missing (default STATE_DIR/api-token)")
    parser.add_argument("--allow-path", type=_directory, action="append", default=[],
                        metavar="DIR", help="a directory whose files requests over TCP may "
                        "name (besides the bundled images and STATE_DIR/storage); repeatable")
    parser.add_argument("--restrict-paths", action="store_true",
                        help="hold requests on the Unix socket to the same paths as TCP ones")
    parser.add_argument("--stop-guests", action="store_true",
                        help="on SIGTERM or SIGINT, power every guest off (as popek vm stop "
                        "does) before exiting; without it the guests keep running, and the "
                        "next popek serve with this state directory adopts them")
    parser.add_argument("--stop-timeout", type=float, default=30, metavar="SECONDS",
                        help="with --stop-guests, how long a guest has to power off before "
                        "it is killed (30)")
    add_cache_args(parser)
    parser.add_argument("--page-sharing", choices=["on", "off"], default="on",
                        help="let the host merge identical guest pages across guests (KSM: "
                        "guest RAM advised mergeable; as root, KSM is started if it is off) "
                        "(on)")
    parser.add_argument("--mem-limit", type=cli_type(parse_size), metavar="SIZE",
                        help="guest RAM all guests may hold resident together; above it the "
                        "VMM swaps out the guest whose console was idle longest (its RAM "
                        "goes to a file and comes back as it touches it) (host memory)")
    parser.add_argument("--restore-templates", choices=["on", "off"], default="on",
                        help="fork the clones of a snapshot from a template process that "
                        "restored it once, sharing its memory (machines without NICs or "
                        "disks; off: each clone restores the file itself) (on)")


def _directory(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return Path(text)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the VMM until SIGINT or SIGTERM; the guests outlive it unless --stop-guests."""
    tcp = None
    if args.tcp:
        tcp = host_port(args.tcp)
        if tcp is None:
            return _serve_error(f"--tcp {args.tcp}: use HOST:PORT, such as 127.0.0.1:8080")
        if not _is_loopback(tcp[0]):
            if not args.allow_remote:
                return _serve_error(f"--tcp {args.tcp}: not a loopback address; the API is "
                                    "plain HTTP, so add --allow-remote to send its token in "
                                    "clear text")
            print(f"popek serve: warning: --tcp {args.tcp}: the API token and all traffic "
                  "cross the network unencrypted", file=sys.stderr)
    import asyncio

    from popek.api.token import TokenError
    from popek.vmm import statedir
    from popek.vmm.service import ServeError, prepare_access, serve

    use_cache_args(args, inherit=True)  # the workers' native code cache
    state_dir = args.state_dir or default_state_dir()
    try:
        access = prepare_access(state_dir, tcp=tcp is not None, token_file=args.token_file,
                                allow=args.allow_path, restrict_unix=args.restrict_paths)
        statedir.lock(state_dir)  # held until this process ends
        return asyncio.run(serve(args.socket or default_socket(), tcp, access, state_dir,
                                 args.stop_timeout if args.stop_guests else None,
                                 page_sharing=args.page_sharing == "on",
                                 mem_limit=args.mem_limit,
                                 restore_templates=args.restore_templates == "on"))
    except (statedir.StateDirError, TokenError, ServeError) as err:
        return _serve_error(str(err))


def _serve_error(message: str) -> int:
    print(f"popek serve: error: {message}", file=sys.stderr)
    return 2


def host_port(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port), or None."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- popek vm ---------------------------------------------------------------------------------
def _tcp_url(text: str) -> str:
    address = host_port(text)
    if address is None:
        raise argparse.ArgumentTypeError(f"{text}: use HOST:PORT, such as 127.0.0.1:8080")
    host, port = address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


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
    parser.add_argument("--tcp", metavar="HOST:PORT", type=_tcp_url,
                        help="reach the VMM over TCP (popek serve --tcp) instead")
    parser.add_argument("--token-file", type=Path, metavar="PATH",
                        help=f"the VMM's API token, for --tcp (default "
                        f"{default_token_file()}, where popek serve makes it)")
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
                       ("rm", "kill and remove VMs"), ("logs", "print a VM's recent console"),
                       ("swap-out", "move VMs' RAM to their swap files; it comes back as "
                        "each guest touches it"),
                       ("swap-in", "bring swapped-out VMs' RAM back now")):
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

    update = sub.add_parser("update", help="change a VM's CPU weight or cap, or its balloon")
    update.add_argument("vms", metavar="VM")
    _cpu_args(update)
    update.add_argument("--no-cap", action="store_true", help="remove the CPU cap")
    update.add_argument("--balloon", type=cli_type(parse_size), metavar="SIZE",
                        help="guest RAM to leave the guest, e.g. 64M: its balloon driver "
                        "gives the rest back to the host (the VM needs balloon on)")

    console = sub.add_parser("console", help="attach to a VM's console (Ctrl-A X detaches); "
                             "with stdin not a terminal, send it, show the output until it "
                             "settles, exit")
    console.add_argument("vms", metavar="VM")
    console.add_argument("--wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                         help="scripted: exit once the guest has printed nothing for "
                         f"SECONDS ({DEFAULT_WAIT:g})")
    console.add_argument("--no-stdin", action="store_true",
                         help="attach without reading stdin: show output until detached")

    debug = sub.add_parser("debug", help="debug a running VM with gdb: listen at --gdb, "
                           "relay the debugger through the VMM to the guest's gdb stub")
    debug.add_argument("vms", metavar="VM")
    debug.add_argument("--gdb", default="localhost:1234", metavar="HOST:PORT",
                       help="where gdb connects (HOST:PORT or unix:PATH; localhost:1234)")

    run = sub.add_parser("exec", help="run a command in a VM through its guest agent: "
                         "stdin in, stdout, stderr and exit status out")
    run.add_argument("--timeout", type=float, default=60, help="seconds (60)")
    run.add_argument("vms", metavar="VM")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    cp = sub.add_parser("cp", help="copy a file into or out of a VM through its guest "
                        "agent: popek vm cp FILE VM:PATH, popek vm cp VM:PATH FILE")
    cp.add_argument("source")
    cp.add_argument("target")

    snap = sub.add_parser("snapshot", help="save a VM (running or paused) to a file")
    snap.add_argument("vms", metavar="VM")
    snap.add_argument("file", type=Path)
    snap.add_argument("--diff", type=Path, metavar="BASE",
                      help="store only the pages written since BASE, this VM's latest "
                      "snapshot (a restore lays them over BASE)")

    migrate = sub.add_parser("migrate", help="move a running VM to another VMM, live")
    migrate.add_argument("vms", metavar="VM")
    migrate.add_argument("--to", required=True, metavar="DEST",
                         help="the destination popek serve: its Unix socket path, or "
                         "tcp:HOST:PORT (with --dest-token-file)")
    migrate.add_argument("--dest-token-file", "--token-file", type=Path, metavar="PATH",
                         dest="dest_token_file", help="the destination's API token, for "
                         "a tcp: destination (after 'migrate'; before it, --token-file is "
                         "the token of the VMM this command talks to)")
    migrate.add_argument("--max-downtime", type=_milliseconds, default=50, metavar="MS",
                         help="longest pause of the guest at the handover (50)")
    migrate.add_argument("--max-bandwidth", type=cli_type(parse_size), metavar="SIZE",
                         help="the most the migration may send a second, such as 8M "
                         "(default: as fast as the link goes)")
    migrate.add_argument("--copy-disks", action="store_true",
                         help="copy the writable disk images too, with the writes made "
                         "meanwhile (no shared storage needed)")
    migrate.add_argument("--disk-path", action="append", metavar="PATH", dest="disk_paths",
                         help="with --copy-disks, where the destination writes the next "
                         "writable disk's copy, a new file (default: the same path there)")
    migrate.add_argument("--postcopy", action="store_true",
                         help="after the first pass, run the guest on the destination at "
                         "once; it fetches the pages still missing as it touches them")

    restore = sub.add_parser("restore", help="a new VM from a snapshot (clones with --count)")
    restore.add_argument("file", type=Path)
    restore.add_argument("--name")
    restore.add_argument("--count", type=int, default=1, help="clones to start (1)")
    _cpu_args(restore)
    restore.add_argument("--no-start", action="store_true")


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 < value <= 60_000:
        raise argparse.ArgumentTypeError("from 0 (excluded) to 60000 ms")
    return value


def _cpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cpu-weight", type=int, metavar="W",
                        help="share under contention, 1 to 10000 (100)")
    parser.add_argument("--cpu-cap", type=_percent, metavar="PCT",
                        help="ceiling in percent of one host core, e.g. 50%%")


def cmd_vm(args: argparse.Namespace) -> int:
    from popek.vmm.commands import run

    return run(args)


# -- popek net --------------------------------------------------------------------------------
def add_net_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None,
                        help=f"the VMM's socket (default {default_socket()})")
    sub = parser.add_subparsers(dest="net_command", required=True, metavar="COMMAND")
    create = sub.add_parser("create", help="create a virtual switch (VMs join it with "
                            "--nic switch=NAME)")
    create.add_argument("name")
    create.add_argument("--subnet", default="auto", metavar="CIDR|none",
                        help="the subnet its DHCP serves; none: a plain Ethernet segment "
                        "(default: the first free 192.168.N.0/24 from 192.168.122.0/24)")
    create.add_argument("--nat", action="store_true",
                        help="the guests reach outside, and the host's loopback through "
                        "the gateway (needs passt)")
    sub.add_parser("ls", help="list virtual switches")
    info = sub.add_parser("info", help="a switch's ports, counters and leases")
    info.add_argument("name")
    info.add_argument("--json", action="store_true", help="the API's JSON")
    rm = sub.add_parser("rm", help="remove switches that no VM uses")
    rm.add_argument("names", nargs="+", metavar="NAME")


def cmd_net(args: argparse.Namespace) -> int:
    from popek.vmm.net_commands import run

    return run(args)
