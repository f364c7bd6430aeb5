"""``popek wasm``: the WebAssembly commands, one subcommand each."""

from __future__ import annotations

import argparse

from popek.wasm import run

HELP = "run WebAssembly programs (WASI)"
SUBCOMMANDS = {"run": (run.HELP, run.add_run_args, run.cmd_run)}


def add_wasm_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="wasm_command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, handler) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_args(command)
        command.set_defaults(wasm_handler=handler)


def cmd_wasm(args: argparse.Namespace) -> int:
    return args.wasm_handler(args)
