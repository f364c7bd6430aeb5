"""virtio-blk (virtio 1.1 section 5.2) backed by a raw image file.

I/O goes through ``os.pread``/``os.pwrite`` on one file descriptor, so requests need no
shared file position and ``T_FLUSH`` maps to ``os.fsync``. A request the guest framed
wrongly (no header, no status byte) breaks the queue; a well-framed request the disk
cannot serve (out of range, read-only, host I/O error) only fails with a status byte.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

from popek.cpu.physmem import runs_of_ones
from popek.devices.virtio.queue import Chain, Virtqueue, VirtqueueError

DEVICE_ID_BLOCK = 2

VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
QUEUE_SIZE = 256  # QEMU's default, so Linux sizes its requests as it would there
IO_CHUNK = 1 << 20  # bounds host memory per step of a large request
LOG_BLOCK = 1 << 16  # bytes of the image a write log counts as one block

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
# capacity, size_max, seg_max, geometry (cylinders, heads, sectors), blk_size
_CONFIG = struct.Struct("<QIIHBBI")


class ImageNotFoundError(FileNotFoundError):
    """The disk image named on the command line does not exist."""

    def __str__(self) -> str:
        return f"disk image not found: {self.filename}"


class WriteLog:
    """The blocks (:data:`LOG_BLOCK` bytes) of one disk the guest wrote since the log
    started or was last taken: a live migration that copies the disk resends them."""

    def __init__(self, disk: VirtioBlk) -> None:
        self._disk = disk
        self.bits = bytearray(-(-disk.capacity * SECTOR_SIZE // LOG_BLOCK))
        disk.write_logs.append(self.bits)

    def take(self) -> list[tuple[int, int]]:
        """The (first block, count) runs written since; the log starts over empty."""
        runs = runs_of_ones(self.bits)
        self.bits[:] = bytes(len(self.bits))
        return runs

    def close(self) -> None:
        self._disk.write_logs.remove(self.bits)


class VirtioBlk:
    """A virtio block device: one request queue over a raw image."""

    device_id = DEVICE_ID_BLOCK

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 serial: str = "", opener: Callable[..., int] = os.open) -> None:
        """``opener`` opens ``path`` as os.open does (a VMM worker's finds the descriptor
        the VMM opened for it)."""
        self.fd = -1
        try:
            self.fd = opener(path, os.O_RDONLY if readonly else os.O_RDWR)
        except FileNotFoundError:
            raise ImageNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                     os.fspath(path)) from None
        except ValueError:  # a NUL in the path, which no file name holds
            raise OSError(errno.EINVAL, "a disk image path cannot hold a NUL",
                          os.fspath(path)) from None
        self.path = os.fspath(path)
        if stat.S_ISDIR(os.fstat(self.fd).st_mode):
            self.close()
            raise IsADirectoryError(errno.EISDIR, "a disk image cannot be a directory", self.path)
        self.readonly = readonly
        self.serial = serial.encode("ascii")[:ID_BYTES].ljust(ID_BYTES, b"\0")
        # Seeking to the end sizes host block devices too, where st_size reads 0.
        self.capacity = os.lseek(self.fd, 0, os.SEEK_END) // SECTOR_SIZE
        self.features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH \
            | (VIRTIO_BLK_F_RO if readonly else 0)
        self.queue_sizes = (QUEUE_SIZE,)
        # The header and status take two descriptors of a chain; data gets the rest.
        self.config = _CONFIG.pack(self.capacity, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE)
        self.write_logs: list[bytearray] = []  # of the WriteLogs open on this disk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        """A disk dropped unclosed (its machine failed to build) closes, as a file does."""
        self.close()

    def process(self, index: int, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            queue.push_used(chain.head, self._serve(chain))

    def _serve(self, chain: Chain) -> int:
        """Carry out one request; the number of bytes written into the chain."""
        header = chain.read(0, _HEADER.size)
        if len(header) < _HEADER.size or chain.writable_len == 0:
            raise VirtqueueError("block request without a header or a status byte")
        kind, _, sector = _HEADER.unpack(header)
        data_in = chain.writable_len - 1  # the status byte ends the writable part
        try:
            status, written = self._execute(kind, sector, chain, data_in)
        except OSError:
            status, written = VIRTIO_BLK_S_IOERR, 0
        chain.write(data_in, bytes([status]))
        return written + 1 if status == VIRTIO_BLK_S_OK else 1

    def _execute(self, kind: int, sector: int, chain: Chain, data_in: int) -> tuple[int, int]:
        """(status, data bytes written to the guest) for one request."""
        if kind == VIRTIO_BLK_T_IN:
            if not self._in_range(sector, data_in):
                return VIRTIO_BLK_S_IOERR, 0
            pos = sector * SECTOR_SIZE
            for done in range(0, data_in, IO_CHUNK):
                want = min(IO_CHUNK, data_in - done)
                data = os.pread(self.fd, want, pos + done)
                if len(data) != want:
                    return VIRTIO_BLK_S_IOERR, 0
                chain.write(done, data)
            return VIRTIO_BLK_S_OK, data_in
        if kind == VIRTIO_BLK_T_OUT:
            data_out = chain.readable_len - _HEADER.size
            if self.readonly or not self._in_range(sector, data_out):
                return VIRTIO_BLK_S_IOERR, 0
            pos = sector * SECTOR_SIZE
            for done in range(0, data_out, IO_CHUNK):
                data = chain.read(_HEADER.size + done, IO_CHUNK)
                start = pos + done
                first, end = start // LOG_BLOCK, -(-(start + len(data)) // LOG_BLOCK)
                for bits in self.write_logs:  # before the write: a failed one may be partial
                    bits[first:end] = b"\1" * (end - first)
                if os.pwrite(self.fd, data, pos + done) != len(data):
                    return VIRTIO_BLK_S_IOERR, 0
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_FLUSH:
            os.fsync(self.fd)
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_GET_ID:
            return VIRTIO_BLK_S_OK, chain.write(0, self.serial[:data_in])
        return VIRTIO_BLK_S_UNSUPP, 0

    def _in_range(self, sector: int, nbytes: int) -> bool:
        """Whole sectors, all inside the disk."""
        return nbytes % SECTOR_SIZE == 0 and sector + nbytes // SECTOR_SIZE <= self.capacity

    def save_state(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "readonly": self.readonly}

    def load_state(self, state: dict[str, Any]) -> None:
        """The image itself is not in the snapshot: insist it is the same shape."""
        if state["capacity"] != self.capacity or state["readonly"] != self.readonly:
            raise ValueError(f"snapshot disk had {state['capacity']} sectors "
                             f"(readonly={state['readonly']}), {self.path} has {self.capacity} "
                             f"(readonly={self.readonly})")
