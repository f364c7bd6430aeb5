"""``popek run``: boot a guest on the virt board, QEMU-style flags, console on the terminal."""

from __future__ import annotations

import argparse
import base64
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from popek import images
from popek.devices.virtio.net import default_mac
from popek.engine import jit
from popek.engine.native_cache import CACHE, add_cache_args, use_cache_args
from popek.machine.config import (
    ConfigError,
    DiskSpec,
    MachineConfig,
    add_config_args,
    config_from_args,
)
from popek.machine.console import HostConsole
from popek.machine.loader import ImageError
from popek.machine.session import GuestSession
from popek.stats import instruction_summary

EXIT_USAGE = 2
CMD_BEGIN = b"POPEK-CMD-BEGIN"
CMD_END = re.compile(rb"POPEK-CMD-END (\d+)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--console-log", type=Path, metavar="FILE",
                        help="also write all console output to FILE")
    parser.add_argument("--stats", action="store_true",
                        help="at exit, print guest instructions, wall time and MIPS on stderr")
    add_cache_args(parser)
    parser.add_argument("--gdb", metavar="HOST:PORT",
                        help="wait for gdb at HOST:PORT (or unix:PATH) before the first "
                             "instruction, like QEMU's -s -S")
    parser.add_argument("-c", dest="command", metavar="CMD",
                        help="run CMD in the guest shell, print its output, exit with its status")


def machine_config(args: argparse.Namespace) -> MachineConfig:
    """The flags' machine, with ``popek run``'s defaults; ``-c`` travels to the bundled
    init on the command line."""
    config = run_defaults(config_from_args(args), disks_given=hasattr(args, "disks"))
    if args.command is not None:
        encoded = base64.b64encode(args.command.encode()).decode()
        config.append += f" quiet popek.cmd={encoded}"
    return config


def run_defaults(config: MachineConfig, disks_given: bool) -> MachineConfig:
    """``config`` as ``popek run`` (and ``popek.Machine``) completes it: the bundled kernel
    and initramfs where it names no kernel, then, unless disks were given, a writable copy
    of the bundled disk; each NIC's default MAC."""
    config = images.with_bundled_guest(config)
    if config.kernel == images.KERNEL and not disks_given:
        config.disks = [DiskSpec(images.default_disk())]
    for index, nic in enumerate(config.nics):
        nic.mac = nic.mac or default_mac(index)
    return config


class CommandOutput:
    """Passes on only what the guest printed between the init's command markers."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        self.inside = False
        self.status: int | None = None
        self._line = bytearray()

    def restart(self) -> None:
        """The guest rebooted: wait for its init to start the command again."""
        self.inside = False
        self._line.clear()

    def write(self, data: bytes) -> None:
        self._line += data
        while (nl := self._line.find(b"\n")) >= 0:
            line = bytes(self._line[:nl]).rstrip(b"\r")
            del self._line[:nl + 1]
            self._take(line)

    def _take(self, line: bytes) -> None:
        if not self.inside:
            self.inside = line.endswith(CMD_BEGIN)
            return
        end = CMD_END.search(line)
        if end is not None:
            self.inside = False
            self.status = int(end.group(1))
        else:
            self.sink(line + b"\n")


def cmd_run(args: argparse.Namespace) -> int:
    """Boot the guest and connect its console to this terminal until it powers off."""
    use_cache_args(args)
    try:
        config = machine_config(args)
        # Unbuffered, so the log is complete even if popek is killed.
        log = open(args.console_log, "wb", buffering=0) if args.console_log else None  # noqa: SIM115
    except (OSError, ImageError) as err:
        print(f"popek run: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    console = HostConsole()
    capture = CommandOutput(console.write) if args.command is not None else None
    shown = capture.write if capture else console.write

    def guest_out(data: bytes) -> None:
        if log is not None:
            log.write(data)
        shown(data)
    stats = RunStats()
    try:
        with console:
            status = _run_until_poweroff(config, console, guest_out, stats,
                                         capture.restart if capture else None, args.gdb)
    except (ConfigError, ImageError) as err:
        print(f"popek run: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        if log is not None:
            log.close()
        if args.stats:
            print(stats.summary(), file=sys.stderr)
            print(jit.STATS.summary(), file=sys.stderr)
            if CACHE.enabled:
                print(CACHE.stats.summary(), file=sys.stderr)
    if capture is not None:
        if capture.status is None:
            print("popek run: the guest stopped before the command finished", file=sys.stderr)
            return 1
        return capture.status
    return status


class RunStats:
    """Guest instructions retired over the whole run, across reboots."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.instructions = 0

    def summary(self) -> str:
        return instruction_summary(self.instructions, time.monotonic() - self.start)


def _run_until_poweroff(config: MachineConfig, console: HostConsole,
                        guest_out: Callable[[bytes], None], stats: RunStats,
                        on_reboot: Callable[[], None] | None, gdb: str | None = None) -> int:
    """Run the guest, rebooting it when it asks, until it powers off or the user quits
    (or the debugger at ``gdb``, if any, kills it)."""
    session = GuestSession(config, guest_out, on_reboot=on_reboot)
    debugger = None
    if gdb:
        from popek.gdb.server import KILLED_STATUS, AddressError, DebuggerPort  # only with --gdb

        try:
            debugger = DebuggerPort(session.runner, gdb)
        except AddressError as err:
            session.close()
            raise ConfigError(str(err)) from None
        except BaseException:
            session.close()
            raise

    def console_input() -> None:
        data = console.read(0.0)
        if data:
            session.machine.feed_input(data)
        if console.eof:
            session.runner.sources.watch(console.fileno(), None)
    session.runner.sources.watch(console.fileno(), console_input)
    try:
        while not console.quit_requested and session.step():
            console.flush()
            if debugger is not None and not debugger.after_step():
                return KILLED_STATUS
    finally:
        console.flush()
        stats.instructions = session.instructions
        if debugger is not None:
            if session.exit_code is not None:
                debugger.powered_off(session.exit_code)
            debugger.close()
        session.close()
    return 0 if session.exit_code is None else session.exit_code
