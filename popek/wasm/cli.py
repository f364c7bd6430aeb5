"""``popek wasm ...``: the WebAssembly command group (run, spectest, disasm).

Each subcommand is an entry in :data:`WASM_COMMANDS` (help, argument adder, handler),
as :data:`popek.cli.SUBCOMMANDS` is for the top level.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from popek.wasm.binary import decode
from popek.wasm.disasm import disassemble
from popek.wasm.errors import WasmError
from popek.wasm.instance import DEFAULT_ENGINE, ENGINES
from popek.wasm.run import HELP as RUN_HELP
from popek.wasm.run import add_run_args, cmd_run
from popek.wasm.spectest import run_script

EXIT_USAGE = 2


def add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default=DEFAULT_ENGINE,
                        help=f"the highest execution tier (default: {DEFAULT_ENGINE}; interp "
                             "is the reference interpreter, jit native code through LLVM)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    add_run_args(parser)
    add_engine_arg(parser)


def _spectest_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", help="a test script as wabt's wast2json writes it (.json)")
    add_engine_arg(parser)


def cmd_spectest(args: argparse.Namespace) -> int:
    """Run the script; exit status 0 only if every command passed."""
    path = Path(args.script)
    try:
        passed, total = run_script(path, sys.stdout, args.engine)
    except (OSError, ValueError, KeyError) as e:
        print(f"popek wasm spectest: error: cannot run {path}: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if passed == total else 1


def _disasm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("module", help="a WebAssembly binary module (.wasm)")


def cmd_disasm(args: argparse.Namespace) -> int:
    """Print the code section's functions in the text format, as wasm2wat does."""
    try:
        module = decode(Path(args.module).read_bytes())
        sys.stdout.writelines(line + "\n" for line in disassemble(module))
        sys.stdout.flush()
    except (OSError, WasmError) as e:
        print(f"popek wasm disasm: error: {args.module}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


Handler = Callable[[argparse.Namespace], int]

WASM_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "run": (RUN_HELP, _run_args, cmd_run),
    "spectest": ("run a wast2json test script and print N/M passed like spectest-interp",
                 _spectest_args, cmd_spectest),
    "disasm": ("print a module's functions in the text format, like wasm2wat",
               _disasm_args, cmd_disasm),
}


def add_wasm_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="wasm_command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, handler) in WASM_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(wasm_handler=handler)


def cmd_wasm(args: argparse.Namespace) -> int:
    return args.wasm_handler(args)
