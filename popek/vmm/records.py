"""What the VMM keeps of each VM in its state directory, so that guests outlive the VMM.

Each VM has a directory ``STATE_DIR/vms/ID/``, owner-only like the whole state directory:

``vm.json``
    the VMM's record: name, machine configuration, CPU and memory settings, state, the
    worker's pid and start time, how the VM ended, the snapshots taken of it. It is
    replaced whole at every change (:func:`popek.vmm.statedir.write_atomic`), so a VMM
    killed with SIGKILL loses no VM: the next one reads every record and adopts what
    still runs.
``worker.sock``
    the worker's listening socket: how a VMM, this one or the next, reaches the worker
    (:mod:`popek.vmm.channel`). Only the VMM's user can reach it, through this directory.
``exit``
    the worker's last word: how the guest ended (powered off with a code, or failed and
    why) and the end of its console, as one JSON line followed by the console bytes.
    The worker may open no file, so the VMM creates this one empty and hands the worker
    a descriptor; the worker writes it as it ends, whether or not a VMM is attached.
    When a worker dies without a word (SIGKILL), the VMM that learns of it writes it.
``worker.log``
    the worker's standard output and error (Python's warnings, a crash's traceback),
    so that a worker holds no terminal or pipe of the VMM that started it.
``swap``
    the guest's RAM once it was swapped out (:mod:`popek.vmm.swap`), sparse, made by the
    VMM at the first swap-out and held open by the worker, so it outlives a VMM restart
    with the guest; removed with the VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from popek.jsontypes import wrong_field
from popek.vmm import statedir

VMS = "vms"
FORMAT = 1
_ID = re.compile(r"[0-9a-f]{12}")
SOCKET_PATH_MAX = 107  # bytes in a Unix socket's address (sun_path, less its final NUL)


class RecordError(Exception):
    """A VM's record cannot be read; the message says why, in one line."""


class VmFiles:
    """The files of one VM in the state directory."""

    def __init__(self, state_dir: Path, vm_id: str) -> None:
        self.id = vm_id
        self.dir = state_dir / VMS / vm_id
        self.record = self.dir / "vm.json"
        self.socket = self.dir / "worker.sock"
        self.exit = self.dir / "exit"
        self.log = self.dir / "worker.log"
        self.swap = self.dir / "swap"

    def create(self) -> tuple[int, int]:
        """The VM's directory, with an empty exit record and log; returns descriptors of
        both for the worker to write."""
        self.dir.parent.mkdir(mode=0o700, exist_ok=True)
        self.dir.mkdir(mode=0o700)
        statedir.sync_directory(self.dir.parent)
        exit_fd = os.open(self.exit, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            return exit_fd, os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                    | os.O_CLOEXEC, 0o600)
        except BaseException:
            os.close(exit_fd)
            raise

    def save(self, record: dict[str, Any]) -> None:
        statedir.write_atomic(self.record, json.dumps({"format": FORMAT, **record},
                                                      indent=1).encode())

    def load(self) -> dict[str, Any]:
        try:
            record = json.loads(self.record.read_bytes())
        except (OSError, ValueError) as err:
            raise RecordError(f"VM {self.id}: its record {self.record} cannot be read "
                              f"({getattr(err, 'strerror', None) or err})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise RecordError(f"VM {self.id}: its record {self.record} is not of format "
                              f"{FORMAT}")
        return record

    def read_exit(self) -> tuple[dict[str, Any], bytes] | None:
        """How the worker ended and the end of its console, if it said so."""
        try:
            data = self.exit.read_bytes()
        except OSError:
            return None
        return decode_exit(data)

    def write_exit(self, info: dict[str, Any], console: bytes) -> None:
        """The VMM's word in place of a worker that ended without one."""
        statedir.write_atomic(self.exit, encode_exit(info, console))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            statedir.sync_directory(self.dir.parent)


def check_room(state_dir: Path) -> None:
    """StateDirError if the workers' sockets would not fit in a Unix socket's address
    there (a state directory too deep in the file system)."""
    longest = len(os.fsencode(VmFiles(state_dir.absolute(), "0" * 12).socket))
    if longest > SOCKET_PATH_MAX:
        raise statedir.StateDirError(
            f"the state directory {state_dir} is too deep: its workers' sockets would have "
            f"paths of {longest} bytes, and a Unix socket's may have {SOCKET_PATH_MAX}")


def all_vms(state_dir: Path) -> list[VmFiles]:
    """The files of every VM recorded in ``state_dir``."""
    try:
        names = sorted(os.listdir(state_dir / VMS))
    except FileNotFoundError:
        return []
    return [VmFiles(state_dir, name) for name in names if _ID.fullmatch(name)]


def encode_exit(info: dict[str, Any], console: bytes) -> bytes:
    return json.dumps(info, separators=(",", ":")).encode() + b"\n" + console


# What an exit record's first line must hold (the worker's word; the VMM's in its place).
_EXIT_FIELDS: dict[str, Any] = {"kind": str | None, "code": int | None, "failure": str,
                                "console_bytes": int}


def decode_exit(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """None for an empty (the worker has not ended) or unreadable record."""
    head, newline, console = data.partition(b"\n")
    try:
        info = json.loads(head) if newline else None
    except ValueError:
        return None
    if not isinstance(info, dict) or wrong_field(info, _EXIT_FIELDS) is not None:
        return None
    return info, console


def write_exit_fd(fd: int, info: dict[str, Any], console: bytes) -> None:
    """The worker's side: the record written through the descriptor the VMM made.
    Written at offset 0 in one call and flushed to disk before the worker exits."""
    data = encode_exit(info, console)
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)
