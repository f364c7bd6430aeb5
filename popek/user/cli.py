"""``popek exec``: run a riscv64 Linux program as if it were a native one.

Standard streams, the exit status and death by signal pass through. A program that
cannot be run at all (missing, not an ELF, not RISC-V) is a one-line error and exit
status 2, before anything of it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from popek.cli import EXEC_HELP
from popek.engine import jit
from popek.engine.engine import DEFAULT_TIER, TIERS
from popek.engine.native_cache import CACHE, add_cache_args, use_cache_args
from popek.stats import instruction_summary
from popek.user.elf_loader import ExecError
from popek.user.process import ExecOptions, Process

DEFAULT_SYSROOT = "/usr/riscv64-linux-gnu"  # Debian's libc6-riscv64-cross
USAGE_ERROR = 2




def add_exec_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``exec`` on a CLI's subcommands (its handler is ``args.handler``)."""
    parser = subparsers.add_parser("exec", help=EXEC_HELP, description=EXEC_HELP)
    add_exec_args(parser)
    parser.set_defaults(handler=cmd_exec)
    return parser


def add_exec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sysroot", metavar="DIR",
                        help="where the ELF interpreter and shared libraries of dynamically "
                             f"linked programs are (default: {DEFAULT_SYSROOT} if present)")
    parser.add_argument("--strace", action="store_true",
                        help="print every system call and its result on stderr")
    parser.add_argument("--engine", choices=TIERS, default=DEFAULT_TIER,
                        help=f"execution tier (default {DEFAULT_TIER}, or $POPEK_ENGINE)")
    parser.add_argument("--stats", action="store_true",
                        help="at exit, print guest instructions, wall time and MIPS on stderr")
    add_cache_args(parser)
    parser.add_argument("--gdb", metavar="HOST:PORT",
                        help="wait for gdb at HOST:PORT (or unix:PATH) before the first "
                             "instruction, like qemu-riscv64 -g")
    parser.add_argument("program", help="the riscv64 executable")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")


def default_sysroot() -> str | None:
    return DEFAULT_SYSROOT if os.path.isdir(DEFAULT_SYSROOT) else None


def cmd_exec(args: argparse.Namespace) -> int:
    """Run the program; returns its exit status (128 + signal number if it was killed)."""
    sysroot = args.sysroot or default_sysroot()
    use_cache_args(args)
    try:
        process = Process(ExecOptions(sysroot=sysroot, strace=args.strace, engine=args.engine))
    except OSError as e:  # e.g. the host refuses to reserve the guest's address space
        print(f"popek exec: cannot create the process VM: {e}", file=sys.stderr)
        return 1
    argv = [os.fsencode(args.program), *(os.fsencode(a) for a in args.args)]
    try:
        process.execve(args.program, argv, list(_environment()))
    except ExecError as e:
        print(f"popek exec: {e}", file=sys.stderr)
        return USAGE_ERROR
    if args.gdb:
        from popek.gdb.server import AddressError, debug_process  # only a debugged run needs it

        try:
            return debug_process(process, args.gdb)
        except AddressError as e:
            print(f"popek exec: {e}", file=sys.stderr)
            return USAGE_ERROR
    if not args.stats:
        return process.run()
    start, pid = time.monotonic(), os.getpid()
    status = process.run()
    if os.getpid() == pid:  # not in a child the program forked
        retired = process.scheduler.instructions_retired()
        print(instruction_summary(retired, time.monotonic() - start), file=sys.stderr)
        print(jit.STATS.summary(), file=sys.stderr)
        if CACHE.enabled:
            print(CACHE.stats.summary(), file=sys.stderr)
    return status


def _environment() -> list[bytes]:
    return [key + b"=" + value for key, value in os.environb.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="popek exec", description=EXEC_HELP)
    add_exec_args(parser)
    return cmd_exec(parser.parse_args(argv))
