"""The ``popek`` command line: one function per subcommand.

A subcommand is an entry in :data:`SUBCOMMANDS`: a help line, a function adding its
arguments to its parser, and a function running it that returns the exit status.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Callable

from popek.isa.disasm import DisasmError, disassemble_elf
from popek.machine.cli import add_run_args, cmd_run
from popek.user.cli import EXEC_HELP, add_exec_args, cmd_exec
from popek.user.container.cli import HELP as CONTAINER_HELP
from popek.user.container.cli import add_container_args, cmd_container
from popek.vmm.cli import add_net_args, add_serve_args, add_vm_args, cmd_net, cmd_serve, cmd_vm
from popek.wasm.cli import WASM_HELP, add_wasm_args, cmd_wasm

EXIT_USAGE = 2  # like argparse: the input was unusable
# A running guest's code cache is hundreds of thousands of long-lived objects that seldom
# become garbage; at Python's default pace, full collections over them cost ~3% of a
# Linux boot. A full collection now waits for 100 (not 10) younger ones.
GC_THRESHOLDS = (700, 10, 100)


def _disasm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a 64-bit RISC-V ELF file")
    parser.add_argument("--raw", action="store_true", help="show each instruction's bytes")


def cmd_disasm(args: argparse.Namespace) -> int:
    """Print the disassembly of the file's code sections as ``objdump -d`` does."""
    try:
        sys.stdout.writelines(line + "\n" for line in disassemble_elf(args.file, raw=args.raw))
        sys.stdout.flush()
    except DisasmError as e:
        print(f"popek disasm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


Handler = Callable[[argparse.Namespace], int]

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "run": ("boot a guest on the virt board (default: the bundled Linux)", add_run_args,
            cmd_run),
    "exec": (EXEC_HELP, add_exec_args, cmd_exec),
    "container": (CONTAINER_HELP, add_container_args, cmd_container),
    "disasm": ("disassemble an ELF file's code like objdump -d", _disasm_args, cmd_disasm),
    "serve": ("run the VMM: guests in worker processes behind a REST API", add_serve_args,
              cmd_serve),
    "vm": ("manage guests through the VMM: create, ls, stop, snapshot, restore...",
           add_vm_args, cmd_vm),
    "net": ("manage the VMM's virtual switches: create, ls, info, rm", add_net_args, cmd_net),
    "wasm": (WASM_HELP, add_wasm_args, cmd_wasm),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popek", description="A RISC-V RV64GC machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``popek`` subcommand; returns the process exit status."""
    args = build_parser().parse_args(argv)
    gc.set_threshold(*GC_THRESHOLDS)
    return args.handler(args)
