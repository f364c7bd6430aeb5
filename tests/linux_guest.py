"""Helpers for tests that boot the bundled Linux guest under ``popek run``."""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from popek import images

BOOT_TIMEOUT = 600  # seconds; a boot takes well under a minute on an idle machine


def popek_run(*args: str, stdin: bytes | None = None, timeout: int = BOOT_TIMEOUT,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``popek run ARGS`` in a subprocess, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def scratch_disk(tmp_path: Path) -> Path:
    """A private writable copy of the bundled ext4 disk."""
    import lzma

    disk = tmp_path / "disk.ext4"
    with lzma.open(images.DISK) as src, open(disk, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return disk


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on (just now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ConsoleLines:
    """An emulator's console on its stdout, line by line, with deadlines; commands in
    through its stdin."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.lines: list[str] = []  # every line so far
        self._next = 0  # the first line wait_for has not looked at

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The next line that starts with ``prefix`` (AssertionError if none comes)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._next, len(self.lines)):
                if self.lines[i].startswith(prefix):
                    self._next = i + 1
                    return self.lines[i]
            self._next = len(self.lines)
            assert time.monotonic() < deadline, f"no {prefix!r} in time: {self.lines[-20:]}"
            if self.sel.select(1):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"the emulator ended before {prefix!r}: {self.lines[-20:]}"
                self.buf += chunk
                *done, self.buf = self.buf.split(b"\n")
                self.lines += [line.decode(errors="replace").strip("\r") for line in done]

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
