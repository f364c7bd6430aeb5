"""The VMM's state directory: what the VMM keeps beyond one request.

It holds the VMM's own files (the API token today; later the records of its VMs) and
``storage/``, the one part requests may name (disks, snapshots). The VMM's own files
stay out of reach of requests, so no request can read the token through a guest disk or
overwrite the VMM's records. All of it is owner-only: anyone else able to write there
could plant files for the VMM to open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class StateDirError(Exception):
    """The state directory cannot be used; the message says why, in one line."""


STORAGE = "storage"


def storage(state_dir: Path) -> Path:
    """Where requests may keep disks and snapshots within the state directory."""
    return state_dir / STORAGE


def prepare(path: Path) -> Path:
    """``path`` and its storage, created 0700 if missing; an existing one must be a
    directory of this user that no one else may write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        storage(path).mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise StateDirError(f"cannot create the state directory {path}: {err.strerror}") \
            from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"the state directory {path} is not a directory")
    if info.st_uid != os.geteuid():
        raise StateDirError(f"the state directory {path} belongs to uid {info.st_uid}, not "
                            f"to this user (uid {os.geteuid()})")
    if info.st_mode & 0o022:
        raise StateDirError(f"others may write to the state directory {path} (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); run: chmod 700 {path}")
    return path
