"""Guest physical memory: one RAM ``mmap`` plus memory-mapped devices.

RAM is a single anonymous mapping, so the host only spends memory on pages the
guest touches, and every tier addresses it by a host offset (``pa - base``). A
restored snapshot maps its memory file privately instead: pages are read on first
touch and copied on first write, so clones of one snapshot share what they do not
change. The slow path (devices, the page-table walker, DMA) goes through
:meth:`load` and :meth:`store`; the fast path lives in the hart's MMU.
"""

from __future__ import annotations

import mmap
from bisect import bisect_right
from collections.abc import Callable
from typing import Protocol

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
CODE_GRANULE = 16  # bytes: how finely writes are checked against decoded code
MAP_NORESERVE = 0x4000  # Linux; not exported by Python 3.11's mmap module


class BusError(Exception):
    """Nothing answers at a physical address (the hart turns it into an access fault)."""

    def __init__(self, pa: int) -> None:
        super().__init__(f"no memory or device at physical address {pa:#x}")
        self.pa = pa


class Device(Protocol):
    """What the bus needs from a memory-mapped device."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class PhysicalMemory:
    """RAM at ``[base, base + size)`` and devices elsewhere in the physical space."""

    def __init__(self, base: int, size: int, *, sparse: bool = False,
                 backing: tuple[int, int] | None = None) -> None:
        """``backing`` = (file descriptor, offset): RAM starts as that file's bytes, mapped
        copy-on-write (the file never changes); otherwise RAM starts zeroed."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of {PAGE_SIZE}")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if sparse:
            flags |= MAP_NORESERVE
        self.base = base
        self.size = size
        if backing is None:
            self.ram = mmap.mmap(-1, size, flags=flags)
            # Small pages keep RAM's resident set to the pages the guest touched, on hosts
            # whose transparent huge pages are always on; and a mapping with flags of its
            # own is never merged with the host's neighbouring anonymous memory (LLVM's
            # code, malloc's large blocks), so /proc shows guest RAM on its own.
            self.ram.madvise(mmap.MADV_NOHUGEPAGE)
        else:
            fd, offset = backing
            self.ram = mmap.mmap(fd, size, flags=flags & ~mmap.MAP_ANONYMOUS,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._dev_starts: list[int] = []
        self._devices: list[tuple[int, int, Device]] = []
        # Host page offsets holding decoded code, each with a map of which 16-byte granules
        # hold it. Engines register to hear when code on a page is overwritten (drop the
        # page's blocks); MMUs to hear when a page becomes code (stop writing it through
        # the TLB fast path, so every write to it reaches note_write). Writes to data
        # beside code on the same page then cost a slow-path store, not a re-decode.
        self.code_pages: dict[int, bytearray] = {}
        self.code_watchers: list[Callable[[int], None]] = []
        self.code_protectors: list[Callable[[int], None]] = []

    # -- layout -------------------------------------------------------------------------
    def add_device(self, base: int, size: int, device: Device) -> None:
        for start, end, _ in self._devices:
            if base < end and start < base + size:
                raise ValueError(f"device at {base:#x} overlaps one at {start:#x}")
        self._devices.append((base, base + size, device))
        self._devices.sort(key=lambda d: d[0])
        self._dev_starts = [d[0] for d in self._devices]

    def ram_offset(self, pa: int) -> int | None:
        """Host offset of physical address ``pa`` in RAM, or None if it is not RAM."""
        off = pa - self.base
        return off if 0 <= off < self.size else None

    def device_at(self, pa: int) -> tuple[int, Device] | None:
        i = bisect_right(self._dev_starts, pa) - 1
        if i >= 0:
            start, end, dev = self._devices[i]
            if pa < end:
                return pa - start, dev
        return None

    # -- slow-path access ---------------------------------------------------------------
    def load(self, pa: int, size: int) -> int:
        off = pa - self.base
        if 0 <= off and off + size <= self.size:
            return int.from_bytes(self.ram[off:off + size], "little")
        hit = self.device_at(pa)
        if hit is None:
            raise BusError(pa)
        return hit[1].read(hit[0], size)

    def store(self, pa: int, size: int, value: int) -> None:
        off = pa - self.base
        if 0 <= off and off + size <= self.size:
            self.note_write(off, size)
            self.ram[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            return
        hit = self.device_at(pa)
        if hit is None:
            raise BusError(pa)
        hit[1].write(hit[0], size, value)

    def read(self, pa: int, n: int) -> bytes:
        """Bytes of RAM (loaders, DMA, tests); raises BusError outside RAM."""
        off = self.ram_offset(pa)
        if off is None or off + n > self.size:
            raise BusError(pa)
        return self.ram[off:off + n]

    def write(self, pa: int, data: bytes) -> None:
        off = self.ram_offset(pa)
        if off is None or off + len(data) > self.size:
            raise BusError(pa)
        for page in range(off >> PAGE_SHIFT, ((off + max(len(data), 1) - 1) >> PAGE_SHIFT) + 1):
            self.note_write(page << PAGE_SHIFT)
        self.ram[off:off + len(data)] = data

    def protect_code(self, page: int, start: int, end: int) -> None:
        """Record decoded code at offsets ``[start, end)`` of the RAM page at ``page``."""
        granules = self.code_pages.get(page)
        if granules is None:
            granules = self.code_pages[page] = bytearray(PAGE_SIZE // CODE_GRANULE)
            for protect in self.code_protectors:
                protect(page)
        first, last = start // CODE_GRANULE, (end - 1) // CODE_GRANULE
        granules[first:last + 1] = b"\1" * (last - first + 1)

    def note_write(self, host_off: int, size: int = PAGE_SIZE) -> None:
        """Before ``size`` bytes at ``host_off`` change (within one page), drop the decoded
        code they overlap; the default size means the whole page."""
        page = host_off & ~(PAGE_SIZE - 1)
        granules = self.code_pages.get(page)
        if granules is None:
            return
        if size < PAGE_SIZE:
            off = host_off - page
            if not any(granules[off // CODE_GRANULE:(off + size - 1) // CODE_GRANULE + 1]):
                return
        del self.code_pages[page]
        for watcher in self.code_watchers:
            watcher(page)
