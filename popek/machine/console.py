"""The host side of the guest console: the terminal or pipes popek runs on.

On a terminal, input is raw (every key goes to the guest) and Ctrl-A X quits, as
in QEMU; Ctrl-A Ctrl-A sends a literal Ctrl-A. On pipes, popek reads stdin until
EOF and writes console output to stdout, so scripts can drive a guest.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from typing import BinaryIO

CTRL_A = 0x01
HELP = (b"\r\nC-a x    exit popek\r\nC-a h    this help\r\n"
        b"C-a C-a  send C-a to the guest\r\n")


class HostConsole:
    """Moves bytes between the host's stdin/stdout and the guest console."""

    def __init__(self, stdin_fd: int | None = None, stdout: BinaryIO | None = None) -> None:
        self.stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        self.stdout = stdout or sys.stdout.buffer
        self.interactive = os.isatty(self.stdin_fd)
        self.quit_requested = False
        self._eof = False
        self._escape = False
        self._out = bytearray()
        self._saved_tty: list | None = None

    def __enter__(self) -> HostConsole:
        if self.interactive:
            self._saved_tty = termios.tcgetattr(self.stdin_fd)
            tty.setraw(self.stdin_fd)
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        if self._saved_tty is not None:
            termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved_tty)

    def fileno(self) -> int:
        return self.stdin_fd

    @property
    def eof(self) -> bool:
        """stdin has ended (a pipe's writer closed it): there is nothing more to wait for."""
        return self._eof

    def write(self, data: bytes) -> None:
        """Guest output (buffered until :meth:`flush`)."""
        self._out += data

    def flush(self) -> None:
        if self._out:
            try:
                self.stdout.write(self._out)
                self.stdout.flush()
            except BrokenPipeError:
                pass
            self._out.clear()

    def read(self, timeout: float = 0.0) -> bytes:
        """Host input for the guest, waiting up to ``timeout`` seconds for some."""
        if self._eof:
            if timeout:
                select.select([], [], [], timeout)
            return b""
        ready, _, _ = select.select([self.stdin_fd], [], [], timeout)
        if not ready:
            return b""
        data = os.read(self.stdin_fd, 4096)
        if not data:
            self._eof = True
            return b""
        return self._filter_escapes(data) if self.interactive else data

    def _filter_escapes(self, data: bytes) -> bytes:
        guest = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X")):
                    self.quit_requested = True
                elif byte == CTRL_A:
                    guest.append(CTRL_A)
                elif byte in (ord("h"), ord("H")):
                    self.write(HELP)
            elif byte == CTRL_A:
                self._escape = True
            else:
                guest.append(byte)
        return bytes(guest)
