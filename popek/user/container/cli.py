"""``popek container run``: a riscv64 program in a container of its own, Docker's way.

The command becomes PID 1 of the container in this very process (as ``popek exec``
runs a program); its children are host processes that inherit the container. When
PID 1 ends, the container's other processes are killed, as the kernel does when a PID
namespace's init exits. Orphans are reparented to PID 1 (a child subreaper), so
their pids stay the container's until it reaps them.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile

from popek.cli import CONTAINER_HELP
from popek.engine.engine import DEFAULT_TIER, TIERS
from popek.engine.native_cache import add_cache_args, use_cache_args
from popek.user.container.image import ImageError, ImageSpec, unpack
from popek.user.container.isolation import Container
from popek.user.container.namespace import Namespace
from popek.user.container.rootfs import Mount, RootFS
from popek.user.elf_loader import ExecError
from popek.user.hostlibc import libc
from popek.user.process import ExecOptions, Process
from popek.vmm.throttle import CpuCap

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USAGE_ERROR = 2  # like popek exec: nothing of the program ran
CANNOT_RUN = 127  # Docker's status for a command that cannot be found or run
PR_SET_CHILD_SUBREAPER = 36
SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class UsageError(Exception):
    """A flag or its value is wrong; the message is one line."""


def add_container_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="container_command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help=CONTAINER_HELP, description=CONTAINER_HELP)
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--rootfs", metavar="DIR", help="directory that becomes /")
    source.add_argument("--image", metavar="FILE.tar",
                        help="OCI image layout or docker save tarball (unpacked into a cache)")
    run.add_argument("--hostname", help="the container's hostname (default: a random id)")
    run.add_argument("-v", "--volume", action="append", default=[],
                     metavar="HOSTDIR:GUESTDIR[:ro]", help="bind mount a host directory")
    run.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                     help="set an environment variable")
    run.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside")
    run.add_argument("--network", choices=("host", "none"), default="host",
                     help="host: the host's network; none: loopback only")
    run.add_argument("--memory", metavar="SIZE",
                     help="limit on the container's mapped memory (e.g. 64m, 1g)")
    run.add_argument("--cpus", type=float, metavar="N",
                     help="CPU cap of the whole container, in cores (e.g. 0.5, 2)")
    run.add_argument("--strace", action="store_true",
                     help="print every system call and its result on stderr")
    run.add_argument("--engine", choices=TIERS, default=DEFAULT_TIER,
                     help=f"execution tier (default {DEFAULT_TIER}, or $POPEK_ENGINE)")
    add_cache_args(run)
    run.add_argument("--cache", metavar="DIR", help="image cache (default: "
                     "$XDG_CACHE_HOME/popek/images or ~/.cache/popek/images)")
    run.add_argument("command", nargs=argparse.REMAINDER,
                     help="-- CMD [ARG...] (default: the image's entrypoint and cmd)")


def cmd_container(args: argparse.Namespace) -> int:
    use_cache_args(args)
    try:
        return _run(args)
    except (UsageError, ImageError) as e:
        print(f"popek container: {e}", file=sys.stderr)
        return USAGE_ERROR


def _run(args: argparse.Namespace) -> int:
    if args.cpus is not None and not args.cpus > 0:
        raise UsageError(f"--cpus {args.cpus}: must be more than 0")
    if args.image:
        spec = unpack(args.image, args.cache or default_cache())
        pid, scratch = os.getpid(), tempfile.mkdtemp(prefix="popek-container-")
        try:
            root = os.path.join(scratch, "rootfs")  # this run's writable copy of the image
            shutil.copytree(spec.rootfs, root, symlinks=True)
            return _run_in(args, root, spec)
        finally:
            if os.getpid() == pid:  # PID 1, not a forked process of the container
                shutil.rmtree(scratch, ignore_errors=True)
    if not os.path.isdir(args.rootfs):
        raise UsageError(f"--rootfs {args.rootfs}: not a directory")
    return _run_in(args, args.rootfs, ImageSpec())


def _run_in(args: argparse.Namespace, root: str, spec: ImageSpec) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    memory = parse_size(args.memory) if args.memory else None
    argv = command or [*spec.entrypoint, *spec.cmd]
    if not argv:
        raise UsageError("no command given and the image names none")
    hostname = args.hostname or secrets.token_hex(6)
    if len(hostname.encode()) > 64:
        raise UsageError(f"--hostname {hostname[:20]}...: longer than 64 bytes")
    namespace = Namespace(hostname.encode(), memory)
    process: Process | None = None
    rootfs = RootFS(root, [parse_volume(v) for v in args.volume],
                    host_pid=namespace.to_host, guest_pid=namespace.to_guest,
                    self_pid=namespace.self_pid,
                    self_exe=lambda: os.fsencode(process.exe),
                    hidden_fds=lambda: process.internal_fds)
    cap = None
    if args.cpus is not None:  # N cores: the container's CPU time counted in Nths
        scale = max(args.cpus, 1.0)
        cap = CpuCap(min(args.cpus, 1.0) * 100,
                     cpu_clock=lambda: namespace.cpu_seconds() / scale)
    container = Container(rootfs, namespace, args.network, cpu_cap=cap)
    env = _environment(spec.env, args.env, hostname)
    workdir = (args.workdir or spec.workdir or "/").encode()
    try:
        os.chdir(rootfs.resolve(workdir))
    except OSError as e:
        raise UsageError(f"working directory {workdir.decode()}: {e.strerror}") from None
    try:
        process = Process(ExecOptions(strace=args.strace, engine=args.engine,
                                      container=container))
    except OSError as e:  # e.g. the host refuses to reserve the guest's address space
        raise UsageError(f"cannot create the process VM: {e}") from None
    program = _find_program(rootfs, argv[0].encode(), env)
    try:
        process.execve(os.fsdecode(program), [a.encode() for a in argv], env,
                       execfn=argv[0].encode())
    except ExecError as e:
        print(f"popek container: {argv[0]}: {e}", file=sys.stderr)
        return CANNOT_RUN
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid, terminal_group = os.getpid(), _lead_process_group()
    try:
        return process.run()
    finally:
        if os.getpid() == pid:
            _end_namespace(namespace)
            if terminal_group is not None:
                _give_terminal(terminal_group)


def _lead_process_group() -> int | None:
    """Make PID 1 lead a process group of the container's own, so kill(0) and Ctrl-C
    reach the container and nothing beside it; if the terminal was ours, the new group
    gets it. Returns the group to give the terminal back to, if any."""
    before = os.getpgrp()
    try:
        os.setpgid(0, 0)
    except OSError:  # already a session leader: the group is ours alone anyway
        return None
    try:
        if os.tcgetpgrp(0) != before:
            return None
    except OSError:  # no terminal
        return None
    _give_terminal(os.getpgrp())
    return before


def _give_terminal(group: int) -> None:
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # as shells do for tcsetpgrp
    try:
        os.tcsetpgrp(0, group)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, previous)


def _find_program(rootfs: RootFS, name: bytes, env: list[bytes]) -> bytes:
    """The host path of the command, looked up in the container's PATH as execvp does."""
    if b"/" in name:
        return rootfs.resolve(name)
    path = next((e[5:] for e in env if e.startswith(b"PATH=")), DEFAULT_PATH.encode())
    for directory in path.split(b":"):
        try:
            candidate = rootfs.resolve(directory.rstrip(b"/") + b"/" + name)
        except OSError:
            continue
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise UsageError(f"{name.decode(errors='replace')}: not found in the container's PATH")


def _environment(image_env: list[str], flags: list[str], hostname: str) -> list[bytes]:
    """Docker's: PATH and HOSTNAME and HOME, then the image's, then -e's (later wins)."""
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": "/root"}
    for item in [*image_env, *flags]:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise UsageError(f"-e {item}: expected KEY=VALUE")
        env[key] = value
    return [f"{k}={v}".encode() for k, v in env.items()]


def _end_namespace(namespace: Namespace) -> None:
    """PID 1 is gone: kill what is left of the container and reap it."""
    for pid in namespace.members():
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


def parse_volume(text: str) -> Mount:
    parts = text.split(":")
    if len(parts) not in (2, 3) or len(parts) == 3 and parts[2] not in ("ro", "rw"):
        raise UsageError(f"-v {text}: expected HOSTDIR:GUESTDIR[:ro]")
    host, guest = parts[0], parts[1]
    if not os.path.isdir(host):
        raise UsageError(f"-v {text}: {host} is not a directory")
    if not guest.startswith("/"):
        raise UsageError(f"-v {text}: {guest} is not an absolute path")
    components = tuple(c.encode() for c in guest.split("/") if c not in ("", "."))
    if b".." in components or components[:1] == (b"proc",):
        raise UsageError(f"-v {text}: cannot mount on {guest}")
    return Mount(components, os.fsencode(os.path.realpath(host)),
                 read_only=len(parts) == 3 and parts[2] == "ro")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([bkmg]?)", text.strip().lower())
    if not match:
        raise UsageError(f"--memory {text}: expected a size like 512m or 1g")
    return int(match[1]) * SIZE_UNITS[match[2]]


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "popek", "images")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popek container", description=CONTAINER_HELP)
    add_container_args(parser)
    return cmd_container(parser.parse_args(argv))
