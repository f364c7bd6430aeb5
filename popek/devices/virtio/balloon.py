"""virtio-balloon (virtio 1.1 section 5.5): the guest gives RAM back to the host.

The host sets a target (``num_pages``, 4 KiB pages the guest should hand over) and
raises a configuration change; the guest's driver allocates that many pages and
reports their frame numbers on the inflate queue, and returns them on the deflate
queue when the target falls (or, with ``DEFLATE_ON_OOM``, when it runs short itself).
Pages handed over are dropped from the host (:meth:`PhysicalMemory.discard`) and read
as zeros if the guest touches them again. Free page reporting hands over whole blocks
of free memory the guest's allocator will not touch until it allocates them again: they
are dropped the same way, and the guest needs no target for that. The statistics
queue carries the guest's own view of its memory (free, available, caches, faults).

Everything on the queues is the guest's word: a frame number outside RAM, a request
larger than RAM, a reported block that is not whole pages in RAM, or a statistics
buffer that is not a whole number of entries puts the device in DEVICE_NEEDS_RESET
(through :class:`~popek.devices.virtio.queue.VirtqueueError`), and is checked whole
before any page is dropped.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from popek.cpu.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory
from popek.devices.virtio.queue import Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from popek.devices.virtio.mmio import VirtioMMIO

DEVICE_ID_BALLOON = 5
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 1 << 3
VIRTIO_BALLOON_F_PAGE_REPORTING = 1 << 5
QUEUE_SIZE = 128
INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
              4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
              8: "hugetlb_allocations", 9: "hugetlb_failures"}
_STAT = struct.Struct("<HQ")
_PFN = struct.Struct("<I")
STATE_VERSION = 1


class VirtioBalloon:
    """The balloon device on one guest's RAM; :meth:`attach` it to its transport."""

    device_id = DEVICE_ID_BALLOON
    features = (VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                | VIRTIO_BALLOON_F_PAGE_REPORTING)
    queue_sizes = (QUEUE_SIZE,) * 4  # inflate, deflate, stats, reporting

    def __init__(self, mem: PhysicalMemory) -> None:
        self.mem = mem
        self.transport: VirtioMMIO | None = None
        self.target_pages = 0  # num_pages: what the host asks for
        self.actual_pages = 0  # actual: what the driver says it holds
        self.inflated = bytearray(mem.size >> PAGE_SHIFT)  # one byte a RAM page
        self.inflated_pages = 0
        self.reported_bytes = 0  # dropped through free page reporting, in total
        self.stats: dict[str, int] = {}
        self._stats_head: int | None = None  # the driver's buffer, until we ask again

    def attach(self, transport: VirtioMMIO) -> None:
        self.transport = transport

    @property
    def config(self) -> bytes:
        """num_pages, actual, free_page_hint_cmd_id, poison_val."""
        return struct.pack("<IIII", self.target_pages, self.actual_pages, 0, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """The driver may write ``actual`` (offset 4), all of it, and nothing else."""
        if offset == 4 and size == 4:
            self.actual_pages = value & 0xFFFF_FFFF

    # -- the host's side ------------------------------------------------------------------
    def set_target(self, pages: int) -> None:
        """Ask the guest to hand over ``pages`` pages (0: give them all back)."""
        self.target_pages = max(0, min(pages, self.mem.size >> PAGE_SHIFT))
        if self.transport is not None:
            self.transport.config_changed()

    def request_stats(self) -> None:
        """Hand the driver's statistics buffer back, so that it fills it anew."""
        if self._stats_head is not None and self.transport is not None:
            head, self._stats_head = self._stats_head, None
            index = self._queue_index(STATS)
            if index is not None:
                self.transport.serve(index, lambda _, queue: queue.push_used(head, 0))

    def report(self) -> dict[str, Any]:
        """What ``popek vm info`` shows."""
        return {"target_bytes": self.target_pages * PAGE_SIZE,
                "actual_bytes": self.actual_pages * PAGE_SIZE,
                "inflated_bytes": self.inflated_pages * PAGE_SIZE,
                "reported_bytes": self.reported_bytes,
                "guest": dict(self.stats)}

    # -- the queues -----------------------------------------------------------------------
    def _roles(self) -> list[str]:
        """Queue index -> role: the statistics and reporting queues exist only when their
        features were negotiated, and later queues move down (as Linux numbers them)."""
        features = self.transport.s.driver_features if self.transport is not None else 0
        roles = [INFLATE, DEFLATE]
        if features & VIRTIO_BALLOON_F_STATS_VQ:
            roles.append(STATS)
        if features & VIRTIO_BALLOON_F_PAGE_REPORTING:
            roles.append(REPORTING)
        return roles

    def _queue_index(self, role: str) -> int | None:
        roles = self._roles()
        return roles.index(role) if role in roles else None

    def process(self, index: int, queue: Virtqueue) -> None:
        roles = self._roles()
        if index >= len(roles):
            raise VirtqueueError(f"balloon queue {index} is not in use")
        role = roles[index]
        while (chain := queue.pop()) is not None:
            if role in (INFLATE, DEFLATE):
                self._pages(chain.read(0, chain.readable_len), chain.readable_len,
                            inflate=role == INFLATE)
            elif role == STATS:
                self._read_stats(chain.read(0, chain.readable_len), chain.readable_len)
                self._stats_head = chain.head
                continue  # kept until the host wants fresh statistics
            else:
                self._free_blocks([(s.addr, s.length) for s in chain.segments])
            queue.push_used(chain.head, 0)

    def _pages(self, data: bytes, length: int, *, inflate: bool) -> None:
        ram_pages = self.mem.size >> PAGE_SHIFT
        if length % 4 or length // 4 > ram_pages:
            raise VirtqueueError(f"balloon request of {length} bytes: not a list of at "
                                 f"most {ram_pages} page numbers")
        first = self.mem.base >> PAGE_SHIFT
        pages = [pfn - first for (pfn,) in _PFN.iter_unpack(data)]
        bad = next((p for p in pages if not 0 <= p < ram_pages), None)
        if bad is not None:
            raise VirtqueueError(f"balloon page {bad + first:#x} is outside guest RAM")
        for page in pages:
            if inflate and not self.inflated[page]:
                self.mem.discard(page << PAGE_SHIFT, PAGE_SIZE)
                self.inflated[page] = 1
                self.inflated_pages += 1
            elif not inflate and self.inflated[page]:
                self.inflated[page] = 0
                self.inflated_pages -= 1

    def _free_blocks(self, blocks: list[tuple[int, int]]) -> None:
        runs = []
        for addr, length in blocks:
            off = self.mem.ram_offset(addr)
            if off is None or off % PAGE_SIZE or length % PAGE_SIZE or not length:
                raise VirtqueueError(f"reported free block {addr:#x}+{length:#x} is not "
                                     "whole pages of guest RAM")
            runs.append((off, length))
        for off, length in runs:  # checked by the queue to lie in RAM
            self.mem.discard(off, length)
            self.reported_bytes += length

    def _read_stats(self, data: bytes, length: int) -> None:
        if length % _STAT.size:
            raise VirtqueueError(f"balloon statistics of {length} bytes: not a whole "
                                 f"number of {_STAT.size}-byte entries")
        for tag, value in _STAT.iter_unpack(data):
            if tag in STAT_NAMES:
                self.stats[STAT_NAMES[tag]] = value

    # -- snapshots ------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "target_pages": self.target_pages,
                "actual_pages": self.actual_pages, "reported_bytes": self.reported_bytes,
                "inflated": [page for page, held in enumerate(self.inflated) if held],
                "stats_head": self._stats_head, "stats": self.stats}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"balloon state version {state.get('version')} is not "
                             f"{STATE_VERSION}")
        self.target_pages = state["target_pages"]
        self.actual_pages = state["actual_pages"]
        self.reported_bytes = state["reported_bytes"]
        self.inflated = bytearray(len(self.inflated))
        for page in state["inflated"]:
            self.inflated[page] = 1
        self.inflated_pages = len(state["inflated"])
        self._stats_head = state["stats_head"]
        self.stats = dict(state["stats"])
