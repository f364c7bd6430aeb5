"""The host files a guest uses, opened by the VMM and handed to its worker as descriptors.

A confined worker needs no access to host paths (its uid may not even read them): the
VMM opens every file the machine names (kernel, initrd, firmware, disks, the snapshot it
restores) before the worker starts, and the descriptors cross to the worker with its
spec. The machine opens files through :meth:`HostFiles.open`, which hands out a duplicate
of the descriptor passed for that path (the machine may close it, and a reboot opens
again) and refuses every other path. Snapshot files written later are handed over the
same way, one at a time, by :func:`send` and :func:`receive`.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from popek.machine.config import MachineConfig, config_from_json
from popek.machine.loader import ImageError
from popek.machine.virt import firmware_path
from popek.vmm import snapshot

_Key = tuple[str, bool]  # (path, opened for writing)


class HostFiles:
    """Descriptors by (path, writable); one set per worker."""

    def __init__(self, fds: dict[_Key, int] | None = None) -> None:
        self.fds: dict[_Key, int] = fds or {}

    @classmethod
    def for_spec(cls, spec: dict[str, Any]) -> HostFiles:
        """What a worker's spec will open: its configuration's files, or the snapshot it
        restores and the files of the machine in it. Raises ImageError, ConfigError or
        SnapshotError, in one line."""
        if "restore" in spec:
            path = Path(spec["restore"])
            return cls.for_machine(snapshot.read_config(path), *snapshot.chain(path))
        return cls.for_machine(config_from_json(spec["config"]))

    @classmethod
    def for_machine(cls, config: MachineConfig, *restore: Path) -> HostFiles:
        """Open what ``config`` names (and the snapshot to ``restore``, with the bases of a
        diff snapshot) as the VMM's user; ImageError says which file cannot be opened and
        why."""
        wanted: list[tuple[Path, bool, str]] = []
        if config.kernel is not None:
            wanted.append((config.kernel, False, "kernel"))
        if config.initrd is not None:
            wanted.append((config.initrd, False, "initrd"))
        firmware = firmware_path(config.bios)
        if firmware is not None:
            wanted.append((firmware, False, "firmware"))
        wanted += [(disk.path, not disk.readonly, "disk image") for disk in config.disks]
        wanted += [(path, False, "snapshot") for path in restore]
        files = cls()
        try:
            for path, writable, what in wanted:
                key = (str(path), writable)
                if key not in files.fds:
                    files.fds[key] = _open(path, writable, what)
        except BaseException:
            files.close()
            raise
        return files

    def open(self, path: str | os.PathLike[str], flags: int) -> int:
        """The machine's opener (os.open's signature): a new descriptor of the file the
        VMM opened as ``path`` for reading, or for writing too (``O_RDWR``)."""
        fd = self.fds.get((os.fspath(path), flags & os.O_ACCMODE != os.O_RDONLY))
        if fd is None:
            raise PermissionError(errno.EACCES, "the VMM did not open it for this guest",
                                  os.fspath(path))
        return os.dup(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        return _received, ({key: PassedFd(fd) for key, fd in self.fds.items()},)


def _received(passed: dict[_Key, PassedFd]) -> HostFiles:
    return HostFiles({key: fd.detach() for key, fd in passed.items()})


class PassedFd:
    """A descriptor in a worker's arguments: pickled for the worker's start, it crosses as
    multiprocessing passes sockets (over the fork server's Unix socket)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        """The descriptor, in the process that unpickled this."""
        return self.fd

    def __reduce__(self) -> tuple[Any, ...]:
        return _passed, (reduction.DupFd(self.fd),)


def _passed(dupfd: Any) -> PassedFd:
    return PassedFd(dupfd.detach())


def _open(path: Path, writable: bool, what: str) -> int:
    """A regular file (or, for a disk, a block device). Opened ``O_NONBLOCK`` so that a
    FIFO in its place cannot stall the VMM; the worker gets a blocking descriptor."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK
                     | os.O_NOCTTY)
    except FileNotFoundError:
        raise ImageError(f"{what} not found: {path}") from None
    except OSError as err:
        raise ImageError(f"cannot open {what} {path}: {err.strerror}") from None
    except ValueError:  # a NUL in the path, which no file name holds
        raise ImageError(f"{what} {str(path)!r} is not a file name") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or (what == "disk image" and stat.S_ISBLK(mode))):
        os.close(fd)
        raise ImageError(f"{what} {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def send(sock: socket.socket, fd: int) -> None:
    """Hand ``fd`` to the worker at the other end of ``sock`` (a socket for nothing else)."""
    socket.send_fds(sock, [b"F"], [fd])


def receive(sock: socket.socket) -> int:
    """The descriptor the VMM handed over with :func:`send`."""
    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if len(fds) != 1:
        raise OSError(errno.EBADMSG, "no file descriptor from the VMM")
    return fds[0]
