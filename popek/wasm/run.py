"""``popek wasm run``: a WASI command module as a host program, with wasmtime's options.

The program's exit status is popek's; a trap prints one line naming it and exits with
134 (128 + SIGABRT), the status wasmtime's command line gives, so scripts that run a
program under either see the same thing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from popek import wasm
from popek.machine.config import ConfigError, parse_size
from popek.wasm.types import PAGE
from popek.wasm.wasi import Preopen, Wasi, WasiAbort, WasiExit

HELP = "run a WebAssembly WASI (preview1) program"
TRAP_STATUS = 134  # wasmtime's: 128 + SIGABRT
USAGE_ERROR = 2  # nothing of the program ran
ERROR_STATUS = 1  # wasmtime's for an error that is not a trap
INTERRUPTED_STATUS = 128 + 2  # SIGINT
ENTRY = "_start"  # a WASI command's entry point


class UsageError(Exception):
    """The program or a flag cannot be used; the message is one line."""


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE.wasm", help="a WASI command module")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG",
                        help="the program's arguments (its argv[0] is FILE's name)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="set an environment variable (KEY alone: the host's value)")
    parser.add_argument("--dir", action="append", default=[], metavar="HOSTDIR[::GUESTDIR]",
                        help="give the program a host directory (as GUESTDIR, default HOSTDIR)")
    parser.add_argument("--fuel", type=int, metavar="N", help="stop the program after N "
                        "units of fuel (one per call or loop iteration)")
    parser.add_argument("--max-memory", metavar="SIZE", help="limit on linear memory (64M, "
                        "1G; a bare number is MiB): memory.grow fails past it")


def cmd_run(args: argparse.Namespace) -> int:
    name = Path(args.file).name
    try:
        module = wasm.load(_read(args.file))
        if not any(export.name == ENTRY and export.kind == "func" for export in module.exports):
            raise UsageError(f"exports no {ENTRY}: not a WASI command")
        env = dict(_variable(spec) for spec in args.env)
        preopens = [Preopen.parse(spec) for spec in args.dir]
        max_memory = _memory_limit(module, args.max_memory)
        if args.fuel is not None and args.fuel < 0:
            raise UsageError(f"--fuel {args.fuel}: expected a count of zero or more")
        with Wasi([name, *args.args], env, preopens) as wasi:
            return _run(module, wasi, name, args.fuel, max_memory, args.engine)
    except (UsageError, ConfigError, wasm.WasmError) as e:  # malformed, invalid, unlinkable
        print(f"popek wasm run: {name}: {e}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as e:  # a --dir that is not a directory
        print(f"popek wasm run: {e.filename or name}: {e.strerror}", file=sys.stderr)
        return USAGE_ERROR


def _run(module: wasm.Module, wasi: Wasi, name: str, fuel: int | None,
         max_memory: int | None, engine: str) -> int:
    """Instantiates the program and runs it to its end: its exit status, or the trap's."""
    try:
        wasm.instantiate(module, wasi.imports(), fuel=fuel, max_memory=max_memory,
                         engine=engine).call(ENTRY)
    except WasiExit as e:
        return e.status
    except wasm.OutOfFuel:
        print(f"popek wasm run: {name}: out of fuel: --fuel {fuel} used up", file=sys.stderr)
        return TRAP_STATUS
    except wasm.Trap as e:
        print(f"popek wasm run: {name}: wasm trap: {e.message}", file=sys.stderr)
        return TRAP_STATUS
    except WasiAbort as e:
        print(f"popek wasm run: {name}: error: {e.message}", file=sys.stderr)
        return ERROR_STATUS
    except KeyboardInterrupt:  # Ctrl-C: the status a shell gives a program SIGINT ended
        return INTERRUPTED_STATUS
    return 0


def _memory_limit(module: wasm.Module, size: str | None) -> int | None:
    """--max-memory in bytes, which must hold the memory the module starts with."""
    if size is None:
        return None
    limit = parse_size(size)
    needed = max((memory.limits.min for memory in module.mems), default=0) * PAGE
    if needed > limit:
        raise UsageError(f"--max-memory {size}: the module starts with {needed >> 10} KiB "
                         "of linear memory")
    return limit


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(e.strerror) from None


def _variable(spec: str) -> tuple[str, str]:
    key, has_value, value = spec.partition("=")
    if not key:
        raise UsageError(f"--env {spec}: expected KEY=VALUE")
    if not has_value:
        if key not in os.environ:
            raise UsageError(f"--env {key}: not set on the host")
        value = os.environ[key]
    return key, value
