"""A ``popek serve`` for a test, as a user starts it, with its guests killed as it exits."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

STOP_GUESTS = ["--stop-guests", "--stop-timeout", "0"]


def wait_listening(sock: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the VMM takes connections on ``sock``. Not until the file exists: it does
    from bind(), a moment before listen(), and a connection then is refused (seen under
    load)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the VMM exited with status {proc.returncode}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        assert time.monotonic() < deadline, f"the VMM did not listen on {sock} in {timeout} s"
        time.sleep(0.05)


@contextlib.contextmanager
def popek_serve(root: Path, *flags: str, timeout: float = 60.0) -> Iterator[Path]:
    """The VMM's socket (``root``/vmm.sock) once it listens; state in ``root``/state, its
    log in ``root``/vmm.log; ``flags`` for ``popek serve``. It must exit cleanly on
    SIGTERM."""
    sock = root / "vmm.sock"
    with open(root / "vmm.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                                 "--state-dir", str(root / "state"), *STOP_GUESTS, *flags],
                                stderr=log)
    try:
        try:
            wait_listening(sock, proc, timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}: {(root / 'vmm.log').read_text()}") from None
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (root / "vmm.log").read_text()
