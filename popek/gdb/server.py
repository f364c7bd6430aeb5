"""Where the debugger connects (``--gdb HOST:PORT`` or ``--gdb unix:PATH``) and the loops
that run a target under it: halted before its first instruction until the debugger
continues, as QEMU's ``-s -S`` and ``qemu-riscv64 -g`` do."""

from __future__ import annotations

import os
import select
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from popek.gdb.stub import Exited, GdbStub, Link
from popek.gdb.targets import MachineTarget, ProcessTarget

if TYPE_CHECKING:
    from popek.machine.runner import MachineRunner
    from popek.user.process import Process

KILLED_STATUS = 0  # popek's exit status when the debugger kills the target, as QEMU's


class AddressError(ValueError):
    pass


def listen(address: str) -> socket.socket:
    """A listening socket at ``HOST:PORT`` (an empty HOST is localhost) or ``unix:PATH``."""
    try:
        if address.startswith("unix:"):
            path = address[5:]
            if not path:
                raise AddressError("--gdb unix:PATH needs a path")
            if Path(path).is_socket():  # a stale one (a file of another kind stays)
                Path(path).unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
        else:
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise AddressError(f"--gdb {address!r}: expected HOST:PORT or unix:PATH")
            host = host.strip("[]") or "localhost"
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
        sock.listen(1)
    except OSError as err:
        raise AddressError(f"--gdb {address}: {err.strerror or err}") from None
    return sock


def close_listener(listener: socket.socket) -> None:
    """Stop listening; a Unix socket's file goes too."""
    if listener.family == socket.AF_UNIX:
        Path(listener.getsockname()).unlink(missing_ok=True)
    listener.close()


def wait_for_debugger(listener: socket.socket, address: str) -> socket.socket:
    print(f"popek: waiting for gdb on {address}", file=sys.stderr, flush=True)
    conn, _ = listener.accept()
    if conn.family != socket.AF_UNIX:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def receive(conn: socket.socket, stub: GdbStub) -> None:
    """Bytes from the debugger's socket are waiting: hand them to the stub."""
    try:
        data = conn.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if data:
        stub.feed(data)
    else:
        stub.detach()


def debug_process(process: Process, address: str) -> int:
    """Run ``process`` under the debugger that connects at ``address``; its exit status."""
    listener = listen(address)
    try:
        conn = wait_for_debugger(listener, address)
    finally:
        close_listener(listener)
    target = ProcessTarget(process)
    stub = GdbStub(target, conn)
    parent = os.getpid()
    # A child the program forks runs on without the debugger, which follows the parent.
    os.register_at_fork(after_in_child=lambda: stub.detach() if os.getpid() != parent else None)
    try:
        while not stub.closed:
            if stub.halted:
                select.select([conn], [], [])
                receive(conn, stub)
                continue
            target.run()
            stub.after_run()
            if not stub.closed and select.select([conn], [], [], 0)[0]:
                receive(conn, stub)
    except Exited as end:
        stub.exited(end)
        return _status(end)
    if stub.killed:
        print("popek exec: terminated by the debugger", file=sys.stderr)
        return KILLED_STATUS
    return process.run()


def _status(end: Exited) -> int:
    reply = end.reply
    code = int(reply[1:], 16)
    return code if reply[:1] == b"W" else 128 + code


class MachineDebugger:
    """The debugger of a machine on a runner, one at a time: ``popek run``'s (through
    :class:`DebuggerPort`) or a VMM worker's (through its channel)."""

    def __init__(self, runner: MachineRunner) -> None:
        self.target = MachineTarget(runner)
        self.stub: GdbStub | None = None
        self.killed = False

    def attach(self, conn: Link) -> GdbStub:
        """A debugger connects: the machine halts until it continues."""
        self.stub = GdbStub(self.target, conn)
        return self.stub

    def after_step(self) -> bool:
        """After a turn of the runner: report a stop; False once the debugger killed it."""
        stub = self.stub
        if stub is not None and not stub.halted and not stub.closed:
            stub.apply_breakpoints()  # a rebooted machine has new harts
            stub.after_run()
        if stub is not None and stub.closed:
            self.stub = None
            self.killed = stub.killed
        return not self.killed

    def powered_off(self, code: int) -> None:
        if self.stub is not None and not self.stub.closed:
            self.stub.exited(Exited(code))
        self.stub = None


class DebuggerPort:
    """``popek run --gdb``: the listening socket, whose debugger (one at a time) the
    machine runner serves among its event sources; another may attach after one leaves."""

    def __init__(self, runner: MachineRunner, address: str) -> None:
        self.runner = runner
        self.debugger = MachineDebugger(runner)
        self.listener = listen(address)
        self.conn: socket.socket | None = None
        self.fd = -1  # the connection's, kept: a closed socket forgets its descriptor
        self._attach(wait_for_debugger(self.listener, address))

    def _attach(self, conn: socket.socket) -> None:
        self.conn, self.fd = conn, conn.fileno()
        stub = self.debugger.attach(conn)
        self.runner.sources.watch(self.fd, lambda: self._receive(conn, stub))
        self.runner.sources.watch(self.listener.fileno(), None)

    def _receive(self, conn: socket.socket, stub: GdbStub) -> None:
        receive(conn, stub)
        self.after_step()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self._attach(conn)

    def after_step(self) -> bool:
        """After a turn of the runner (see MachineDebugger.after_step)."""
        conn = self.conn
        going = self.debugger.after_step()
        if conn is not None and self.debugger.stub is None:  # that debugger has gone
            self.runner.sources.watch(self.fd, None)
            conn.close()
            self.conn = None
            if going:
                self.runner.sources.watch(self.listener.fileno(), self._accept)
        return going

    def powered_off(self, code: int) -> None:
        self.debugger.powered_off(code)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        close_listener(self.listener)
