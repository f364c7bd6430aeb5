"""A ``popek serve`` for a test, as a user starts it, with its guests killed as it exits."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

STOP_GUESTS = ["--stop-guests", "--stop-timeout", "0"]


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
        deadline = time.monotonic() + timeout
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"the VMM did not start: {(root / 'vmm.log').read_text()}"
            time.sleep(0.05)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (root / "vmm.log").read_text()
