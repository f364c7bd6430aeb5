"""Where the VMM listens and keeps its state by default (shared by ``popek serve`` and its
clients, which find its socket and its API token there)."""

from __future__ import annotations

import os
from pathlib import Path

TOKEN_FILE_NAME = "api-token"


def default_socket() -> Path:
    """``$POPEK_SOCKET``, else ``$XDG_RUNTIME_DIR/popek.sock``, else /tmp/popek-UID.sock."""
    if "POPEK_SOCKET" in os.environ:
        return Path(os.environ["POPEK_SOCKET"])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "popek.sock" if runtime else Path(f"/tmp/popek-{os.getuid()}.sock")


def default_state_dir() -> Path:
    """``$POPEK_STATE_DIR``, else /var/lib/popek for root (a system service's place), else
    ``$XDG_STATE_HOME/popek`` (~/.local/state/popek): the VMM's state outlives its process
    but is no user document."""
    if "POPEK_STATE_DIR" in os.environ:
        return Path(os.environ["POPEK_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/popek")
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "popek"


def default_token_file(state_dir: Path | None = None) -> Path:
    """The API token's file: ``api-token`` in the state directory."""
    return (state_dir or default_state_dir()) / TOKEN_FILE_NAME
