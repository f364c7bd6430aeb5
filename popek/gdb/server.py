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

from popek.gdb.stub import Exited, GdbStub
from popek.gdb.targets import MachineTarget, ProcessTarget

if TYPE_CHECKING:
    from popek.machine.session import GuestSession
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
            Path(path).unlink(missing_ok=True)
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


def wait_for_debugger(listener: socket.socket, address: str) -> socket.socket:
    print(f"popek: waiting for gdb on {address}", file=sys.stderr, flush=True)
    conn, _ = listener.accept()
    if conn.family != socket.AF_UNIX:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def debug_process(process: Process, address: str) -> int:
    """Run ``process`` under the debugger that connects at ``address``; its exit status."""
    listener = listen(address)
    try:
        conn = wait_for_debugger(listener, address)
    finally:
        listener.close()
    target = ProcessTarget(process)
    stub = GdbStub(target, conn)
    parent = os.getpid()
    # A child the program forks runs on without the debugger, which follows the parent.
    os.register_at_fork(after_in_child=lambda: stub.detach() if os.getpid() != parent else None)
    try:
        while not stub.closed:
            if stub.halted:
                select.select([stub], [], [])
                stub.readable()
                continue
            target.run()
            stub.after_run()
            if not stub.closed and select.select([stub], [], [], 0)[0]:
                stub.readable()
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
    """The debugger of a ``popek run`` machine: one connection at a time, on the machine
    runner's event sources; a debugger may attach again after one detaches."""

    def __init__(self, session: GuestSession, address: str) -> None:
        self.session = session
        self.address = address
        self.listener = listen(address)
        self.target = MachineTarget(session)
        self.stub: GdbStub | None = None
        self.killed = False
        self._attach(wait_for_debugger(self.listener, address))

    def _attach(self, conn: socket.socket) -> None:
        self.stub = GdbStub(self.target, conn)
        self.session.runner.sources.watch(self.stub.fileno(), self._readable)
        self.session.runner.sources.watch(self.listener.fileno(), None)

    def _readable(self) -> None:
        stub = self.stub
        fd = stub.fileno()
        stub.readable()
        self._check(stub, fd)

    def _check(self, stub: GdbStub, fd: int) -> None:
        if not stub.closed:
            return
        self.session.runner.sources.watch(fd, None)
        self.stub = None
        self.killed = stub.killed
        if not self.killed:
            self.session.runner.sources.watch(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self._attach(conn)

    def after_step(self) -> bool:
        """After a turn of the session: report a stop; False once the debugger killed it."""
        stub = self.stub
        if stub is not None and not stub.halted:
            fd = stub.fileno()
            stub.apply_breakpoints()  # a rebooted machine has new harts
            stub.after_run()
            self._check(stub, fd)
        return not self.killed

    def powered_off(self, code: int) -> None:
        if self.stub is not None:
            self.stub.exited(Exited(code))
            self.stub = None

    def close(self) -> None:
        if self.stub is not None and not self.stub.closed:
            self.stub.conn.close()
        self.listener.close()
