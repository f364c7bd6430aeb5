"""Helpers for tests that boot the bundled Linux guest under ``popek run``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
