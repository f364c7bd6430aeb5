"""The disks a live migration copies (``--copy-disks``, QEMU's block migration).

The source sends each writable disk's image once (skipping what reads as zeros: the
destination's new image is empty), while a :class:`~popek.devices.virtio.blk.WriteLog`
records the blocks the guest writes meanwhile; each pre-copy round resends those, and
the last ones go with the guest paused. The destination writes DISK frames into its own
images, checked to lie within them, and syncs them before it says READY, so that
nothing the guest wrote is lost whichever host fails after.
"""

from __future__ import annotations

import os
from collections import deque

from popek.devices.virtio.blk import LOG_BLOCK, SECTOR_SIZE, VirtioBlk, WriteLog
from popek.machine.virt import VirtMachine
from popek.vmm import migration_wire as wire
from popek.vmm.migration_wire import Connection, WireError


class MissingDisk(Exception):
    """The destination has no disk to take the source's copy (one line)."""


class DiskCopy:
    """A disk the migration copies (``--copy-disks``): its blocks still to send, and the
    log of the guest's writes to it, which names the blocks to send again."""

    def __init__(self, index: int, disk: VirtioBlk) -> None:
        self.index, self.disk = index, disk
        self.size = disk.capacity * SECTOR_SIZE
        self.log = WriteLog(disk)  # before the first pass reads a block
        self.pending: deque[tuple[int, int]] = deque([(0, len(self.log.bits))])
        self.first_pass = True  # the destination's new image reads zeros: skip them

    def take(self) -> int:
        """The blocks written since the last take join the pending ones; returns how many."""
        runs = self.log.take()
        self.first_pass = False
        self.pending.extend(runs)
        return sum(count for _, count in runs)

    def send_next(self, conn: Connection) -> int:
        """Send the next piece (up to a DISK frame's worth) as it is on the disk now;
        the bytes sent."""
        first, count = self.pending.popleft()
        take = min(count, wire.MAX_DISK_BYTES // LOG_BLOCK)
        if take < count:
            self.pending.appendleft((first + take, count - take))
        offset = first * LOG_BLOCK
        data = os.pread(self.disk.fd, min(take * LOG_BLOCK, self.size - offset), offset)
        if self.first_pass and data.count(0) == len(data):
            return 0
        conn.send_disk(self.index, offset, data)
        return len(data)

    def close(self) -> None:
        self.log.close()


# -- the destination -------------------------------------------------------------------------------
def copied_disks(machine: VirtMachine, copied: dict[int, int]) -> dict[int, VirtioBlk]:
    """The destination's disks the source copies into, by index, once each fits."""
    disks = {}
    for index, size in copied.items():
        disk = machine.disks[index] if index < len(machine.disks) else None
        if disk is None or disk.readonly or disk.capacity * SECTOR_SIZE != size:
            raise MissingDisk(f"the destination has no writable disk {index} of {size} "
                                 "bytes to copy the source's into")
        disks[index] = disk
    return disks


def write(disks: dict[int, VirtioBlk], frame: wire.Frame) -> None:
    """Write a DISK frame's bytes into the destination's image; WireError if they do not
    belong to a disk being copied, or lie beyond it."""
    index, offset, data = frame.disk()
    disk = disks.get(index)
    if disk is None or offset + len(data) > disk.capacity * SECTOR_SIZE:
        raise WireError(f"{len(data)} bytes at {offset} of disk {index}, which is not "
                        "one the source copies or is smaller (corrupt stream)")
    if os.pwrite(disk.fd, data, offset) != len(data):
        raise OSError(f"the destination's disk {disk.path} took a short write")


def sync(disks: dict[int, VirtioBlk]) -> None:
    """The copies are on the destination's disks (before READY)."""
    for disk in disks.values():
        os.fsync(disk.fd)
