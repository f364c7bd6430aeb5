"""Where the VMM listens by default (shared by ``popek serve`` and its clients)."""

from __future__ import annotations

import os
from pathlib import Path


def default_socket() -> Path:
    """``$POPEK_SOCKET``, else ``$XDG_RUNTIME_DIR/popek.sock``, else /tmp/popek-UID.sock."""
    if "POPEK_SOCKET" in os.environ:
        return Path(os.environ["POPEK_SOCKET"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "popek.sock" if runtime else Path(f"/tmp/popek-{os.getuid()}.sock")
