"""The ``popek`` command line: one function per subcommand.

A subcommand is an entry in :data:`SUBCOMMANDS`: a help line, the module that holds
it, a function there adding its arguments to its parser, and one running it that
returns the exit status. Only the module of the subcommand that runs is imported (all
of them take ~0.3 s to import, ``popek run``'s alone ~0.17 s).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

EXIT_USAGE = 2  # like argparse: the input was unusable
# A running guest's code cache is hundreds of thousands of long-lived objects that seldom
# become garbage; at Python's default pace, full collections over them cost ~3% of a
# Linux boot. A full collection waits for 1000 (not 10) younger ones: with 100, a baseline
# boot still ran one over ~800,000 objects, 0.25 s (8% of the boot), which freed 252.
GC_THRESHOLDS = (700, 10, 1000)


def _disasm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a 64-bit RISC-V ELF file")
    parser.add_argument("--raw", action="store_true", help="show each instruction's bytes")


def cmd_disasm(args: argparse.Namespace) -> int:
    """Print the disassembly of the file's code sections as ``objdump -d`` does."""
    from popek.isa.disasm import DisasmError, disassemble_elf
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

EXEC_HELP = "run a riscv64 Linux program on this host (process VM, like qemu-riscv64)"
CONTAINER_HELP = "run a riscv64 program in a container (its own root, hostname, pids, limits)"
WASM_HELP = "WebAssembly: run WASI programs and test scripts, disassemble modules"

# name: (help, module, its function adding the arguments, its function running it)
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "run": ("boot a guest on the virt board (default: the bundled Linux)",
            "popek.machine.cli", "add_run_args", "cmd_run"),
    "exec": (EXEC_HELP, "popek.user.cli", "add_exec_args", "cmd_exec"),
    "container": (CONTAINER_HELP, "popek.user.container.cli", "add_container_args",
                  "cmd_container"),
    "disasm": ("disassemble an ELF file's code like objdump -d", __name__, "_disasm_args",
               "cmd_disasm"),
    "serve": ("run the VMM: guests in worker processes behind a REST API",
              "popek.vmm.cli", "add_serve_args", "cmd_serve"),
    "vm": ("manage guests through the VMM: create, ls, stop, snapshot, restore...",
           "popek.vmm.cli", "add_vm_args", "cmd_vm"),
    "net": ("manage the VMM's virtual switches: create, ls, info, rm",
            "popek.vmm.cli", "add_net_args", "cmd_net"),
    "wasm": (WASM_HELP, "popek.wasm.cli", "add_wasm_args", "cmd_wasm"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; of the subcommands, only the one ``argv`` names (every one if it
    names none, as for ``popek --help``) gets its arguments, and so its module."""
    parser = argparse.ArgumentParser(prog="popek", description="A RISC-V RV64GC machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = sys.argv[1:] if argv is None else argv
    chosen = next((w for w in words if not w.startswith("-")), None)
    for name, (help_text, module_name, add_args, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if chosen in (name, None) or chosen not in SUBCOMMANDS:
            module = importlib.import_module(module_name)
            getattr(module, add_args)(p)
            p.set_defaults(handler=getattr(module, handler))
    return parser


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Run one ``popek`` subcommand; returns the process exit status.

    ``whole_process`` (the ``popek`` command, whose process is popek's alone): the objects
    the subcommand's modules make as they are imported live as long as the process, so
    nothing is collected until they are all made, and then they are frozen out of the
    collector's view (collecting them as they came, and again in later full collections,
    took ~6 ms of a short ``popek exec``: 40 collections, now 13)."""
    if whole_process:
        gc.disable()
    args = build_parser(argv).parse_args(argv)
    if whole_process:
        gc.freeze()
        gc.enable()
    gc.set_threshold(*GC_THRESHOLDS)
    return args.handler(args)


def run() -> NoReturn:
    """The ``popek`` command: :func:`main`, then the process ends as Python's own exit
    would (other threads joined, exit handlers run, output flushed), but without then
    freeing the heap object by object: after a Linux boot that alone took ~0.6 s. Under
    a profiler or tracer (cProfile, coverage) it exits as Python does, so they report."""
    status = main(whole_process=True)
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe: what is left is lost, as Python's exit would
            pass
    os._exit(status or 0)
