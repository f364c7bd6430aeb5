"""The VMM's state directory: what the VMM keeps beyond one process.

It holds the VMM's own files (the API token, ``lock``, under ``vms/`` the record of
each VM, :mod:`popek.vmm.records`, and ``networks.json``, :mod:`popek.vmm.networks`)
and ``storage/``, the one part requests may name (disks, snapshots). The VMM's own
files stay out of reach of requests, so no request can read the token through a guest
disk or overwrite the VMM's records. All of it is owner-only: anyone else able to write
there could plant files for the VMM to open, or reach a worker's socket.

One VMM at a time uses a state directory (:func:`lock`): two would both adopt the same
workers. Files are replaced whole (:func:`write_atomic`), so a VMM killed at any moment,
or a host that loses power, leaves each file as it was before or after a change, never
half written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from pathlib import Path


class StateDirError(Exception):
    """The state directory cannot be used; the message says why, in one line."""


STORAGE = "storage"
LOCK = "lock"


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


def lock(path: Path) -> int:
    """Claim the state directory for this process: a descriptor holding ``flock`` on its
    ``lock`` file, released by the kernel when the process ends, however it ends.
    StateDirError if another VMM holds it (its pid is in the file)."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirError(f"another popek serve (pid {holder}) uses the state directory "
                            f"{path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``: written beside it, flushed to disk, then
    renamed over it, so readers (and a VMM after a crash) see the old file or the new one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def sync_directory(path: Path) -> None:
    """Make the creation, renaming or removal of entries in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
