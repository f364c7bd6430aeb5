"""Guest physical memory: one RAM ``mmap`` plus memory-mapped devices, and write watching.

RAM is a single anonymous mapping, so the host only spends memory on pages the
guest touches, and every tier addresses it by a host offset (``pa - base``). A
restored snapshot maps its memory file privately instead: pages are read on first
touch and copied on first write, so clones of one snapshot share what they do not
change. The slow path (devices, the page-table walker, DMA) goes through
:meth:`~PhysicalMemory.load` and :meth:`~PhysicalMemory.store`; the fast path lives in
the hart's MMU.

Write watching, the one mechanism that sees every write to RAM
---------------------------------------------------------------
Harts write RAM through their write TLBs (a dict hit in the interpreter and tier 1, a
native table in tier 2) without telling anyone, so the fast path pays nothing. A page
enters a write TLB only through :meth:`~PhysicalMemory.admit_write`, the one door,
which marks it dirty at that moment (as TinyEMU marks a page dirty when it enters
``tlb_write``) and refuses a watched page. Every other writer (device DMA, firmware,
loaders, the process VM's system calls, the page walker's A/D bits, and harts' stores
that miss the TLB) goes through :meth:`~PhysicalMemory.store`, :meth:`~PhysicalMemory.write`,
:meth:`~PhysicalMemory.discard` or :meth:`~PhysicalMemory.move`, which mark the pages
and tell their watchers. Every hart's MMU registers its TLB (:class:`WriteTlb`), since
the harts of a machine share one memory.

- A dirty log (:meth:`~PhysicalMemory.dirty_log`) belongs to one consumer (a
  migration's rounds, the base of an incremental snapshot, page sharing): one byte per
  page, set for every page written since the log started or was last taken. Each
  consumer has a log of its own, so none resets another's view; a page admitted to a
  write TLB is marked in every log. :meth:`DirtyLog.take` returns the runs of dirty
  pages and starts the log over, evicting every writable TLB entry of every hart: a page
  can sit in a write TLB only while it is marked in every log, so the next write to any
  page is seen again and no stale entry hides a write. Logs report page numbers, host
  offset >> PAGE_SHIFT (physical address ``base + page * PAGE_SIZE``); pages come back
  as (first page, count) runs found by scanning the log in C, never page by page in
  Python. Take a log between the harts' slices, on the machine's thread, before copying
  the pages it names: writes after the take land in the next round.
- A write watch (:meth:`~PhysicalMemory.watch`) keeps a page out of every write TLB and
  has a :class:`WriteWatcher` hear of each write to it, before the bytes change, until
  the watcher lets go. The code cache watches the pages it decoded (dropping their
  blocks when a write overlaps the code); copy-on-write of shared pages and post-copy
  migration are further watchers. Watches are keyed by the page's host offset, as TLB
  entries are.

- A read watch (:meth:`~PhysicalMemory.watch_reads`), a debugger's read watchpoint,
  keeps a page out of every read TLB (:meth:`~PhysicalMemory.admit_read` refuses it), so
  each hart load from it takes the MMU's slow path, which tells the watcher
  (:meth:`~PhysicalMemory.before_read`) before it reads.

A migration, say, starts a log, copies all of RAM once, then copies what each round's
``take`` names until little is left; a diff snapshot keeps a log from its base::

    log = machine.mem.dirty_log()
    send(everything)
    while (runs := log.take()):  # [(first page, count), ...]
        send(runs)
    log.close()

A log starts empty, and pages count as written only once a writer changes them: a
restored guest's pages are the snapshot it came from, the base of every log started
afterwards. A consumer that needs the whole memory (a migration's first pass, even
right after a restore) reads all of it once and then follows its log.
"""

from __future__ import annotations

import mmap
import re
from bisect import bisect_right
from typing import Protocol

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
MAP_NORESERVE = 0x4000  # Linux; not exported by Python 3.11's mmap module
_DIRTY_RUN = re.compile(rb"\x01+")
_DIRTY = 1


class BusError(Exception):
    """Nothing answers at a physical address (the hart turns it into an access fault)."""

    def __init__(self, pa: int) -> None:
        super().__init__(f"no memory or device at physical address {pa:#x}")
        self.pa = pa


class Device(Protocol):
    """What the bus needs from a memory-mapped device."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class WriteTlb(Protocol):
    """A hart's cache of translations (its MMU), which must forget writable (or
    readable) pages on demand."""

    def drop_writable(self, page: int | None) -> None:
        """Forget every writable translation to the RAM page at host offset ``page``
        (None: to any page), so that the next write to it takes the slow path."""

    def drop_readable(self, page: int) -> None:
        """Forget every readable translation to the RAM page at host offset ``page``."""


class WriteWatcher(Protocol):
    """Someone who must hear of writes to a page before they land (see ``watch``)."""

    def page_written(self, page: int, offset: int, size: int) -> bool:
        """Bytes ``[offset, offset + size)`` of the RAM page at host offset ``page`` are
        about to change; return whether to go on watching the page."""


class ReadWatcher(Protocol):
    """Someone who must hear of hart loads from a page before they read it."""

    def page_read(self, page: int, offset: int, size: int) -> None: ...


class DirtyLog:
    """One consumer's record of the RAM pages written since it last took them."""

    def __init__(self, mem: PhysicalMemory) -> None:
        self._mem = mem
        # One byte a page; an anonymous mapping costs host memory only where pages were
        # marked (the process VM's RAM spans 2**26 pages), and resets by dropping them.
        self.bits = mmap.mmap(-1, mem.size >> PAGE_SHIFT,
                              flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def take(self) -> list[tuple[int, int]]:
        """The (first page, count) runs of pages written since the log started or was
        last taken, in ascending order; the log starts over empty."""
        runs = [(m.start(), m.end() - m.start()) for m in _DIRTY_RUN.finditer(self.bits)]
        self.bits.madvise(mmap.MADV_DONTNEED)  # private anonymous pages read as zero again
        self._mem.drop_writable(None)
        return runs

    def close(self) -> None:
        """Stop logging."""
        self._mem._logs.remove(self.bits)
        self.bits.close()


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
        self.backed = backing is not None
        if backing is None:
            self.ram = mmap.mmap(-1, size, flags=flags)
            # Small pages keep RAM's resident set to the pages the guest touched, on hosts
            # whose transparent huge pages are always on.
            self.ram.madvise(mmap.MADV_NOHUGEPAGE)
        else:
            fd, offset = backing
            self.ram = mmap.mmap(fd, size, flags=flags & ~mmap.MAP_ANONYMOUS,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        # Guest RAM stays out of core dumps (the guest's data is not popek's to leak), and
        # that flag, which no other mapping has, keeps it one mapping of its own: never
        # merged with neighbouring anonymous memory (thread stacks, which Linux 6.7 maps
        # without huge pages too; malloc's large blocks), so /proc shows guest RAM alone.
        self.ram.madvise(mmap.MADV_DONTDUMP)
        self._dev_starts: list[int] = []
        self._devices: list[tuple[int, int, Device]] = []
        # Write watching (see the module docstring).
        self._tlbs: list[WriteTlb] = []
        self._logs: list[mmap.mmap] = []
        self._watches: dict[int, list[WriteWatcher]] = {}
        self._read_watches: dict[int, ReadWatcher] = {}

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
            self._before_write(off, size)
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
        """Store bytes in RAM (loaders, DMA, firmware, system calls); raises BusError
        outside RAM."""
        off = self.ram_offset(pa)
        if off is None or off + len(data) > self.size:
            raise BusError(pa)
        self._before_write(off, len(data))
        self.ram[off:off + len(data)] = data

    def discard(self, off: int, length: int) -> None:
        """Zero the whole pages at host offsets ``[off, off + length)`` and give their
        memory back to the host."""
        self._before_write(off, length)
        self.ram.madvise(mmap.MADV_DONTNEED, off, length)
        if self.backed:
            # Dropped pages of a private file mapping read the file again, not zeros:
            # zero them (private zeroed pages, which KSM folds into the zero page).
            self.ram[off:off + length] = bytes(length)

    def move(self, dst: int, src: int, length: int) -> None:
        """Copy ``length`` bytes from host offset ``src`` to ``dst`` (they may overlap)."""
        self._before_write(dst, length)
        self.ram.move(dst, src, length)

    # -- write watching (see the module docstring) --------------------------------------
    def add_write_tlb(self, tlb: WriteTlb) -> None:
        """A hart's MMU: it caches pages for writing only as ``admit_write`` allows."""
        self._tlbs.append(tlb)

    def admit_write(self, page: int) -> bool:
        """Whether a write TLB may cache the RAM page at host offset ``page``: the one door
        to the write fast path. Its writes are invisible from now on, so the page counts
        as written in every dirty log; a watched page stays out."""
        if page in self._watches:
            return False
        index = page >> PAGE_SHIFT
        for bits in self._logs:
            bits[index] = _DIRTY
        return True

    def drop_writable(self, page: int | None) -> None:
        """Evict the page at host offset ``page`` (None: every page) from every write TLB."""
        for tlb in self._tlbs:
            tlb.drop_writable(page)

    def dirty_log(self) -> DirtyLog:
        """A new dirty log, empty: the writes from now on (see the module docstring)."""
        log = DirtyLog(self)
        self._logs.append(log.bits)
        self.drop_writable(None)  # pages admitted before now were marked in no log
        return log

    def watch(self, page: int, watcher: WriteWatcher) -> None:
        """Have ``watcher`` hear of every write to the RAM page at host offset ``page``
        until its ``page_written`` returns False; the page stays out of write TLBs."""
        watchers = self._watches.get(page)
        if watchers is None:
            self._watches[page] = [watcher]
            self.drop_writable(page)
        elif watcher not in watchers:
            watchers.append(watcher)

    def unwatch(self, page: int, watcher: WriteWatcher) -> None:
        watchers = self._watches.get(page)
        if watchers is not None and watcher in watchers:
            watchers.remove(watcher)
            if not watchers:
                del self._watches[page]

    def admit_read(self, page: int) -> bool:
        """Whether a read TLB may cache the RAM page at host offset ``page``."""
        return page not in self._read_watches

    def watch_reads(self, page: int, watcher: ReadWatcher | None) -> None:
        """Have ``watcher`` hear of every hart load from the RAM page at host offset
        ``page`` (None: stop), keeping the page out of read TLBs meanwhile."""
        if watcher is None:
            self._read_watches.pop(page, None)
            return
        self._read_watches[page] = watcher
        for tlb in self._tlbs:
            tlb.drop_readable(page)

    def before_read(self, off: int, size: int) -> None:
        """A hart is about to load ``size`` bytes at host offset ``off`` (slow path)."""
        watcher = self._read_watches.get(off & ~PAGE_MASK)
        if watcher is not None:
            watcher.page_read(off & ~PAGE_MASK, off & PAGE_MASK, size)

    def _before_write(self, off: int, size: int) -> None:
        """``size`` bytes at host offset ``off`` are about to change outside the write
        TLBs: mark their pages in every dirty log and tell the pages' watchers."""
        page = off & ~PAGE_MASK
        if 0 < size <= page + PAGE_SIZE - off:  # within a page: a hart's slow-path store
            index = off >> PAGE_SHIFT
            for bits in self._logs:
                bits[index] = _DIRTY
            if page in self._watches:
                self._tell_watchers(page, off - page, size)
            return
        if size <= 0:
            return
        first, end = off >> PAGE_SHIFT, ((off + size - 1) >> PAGE_SHIFT) + 1
        if self._logs:
            marks = b"\1" * (end - first)
            for bits in self._logs:
                bits[first:end] = marks
        if end - first <= len(self._watches):
            pages = [p for p in range(page, end << PAGE_SHIFT, PAGE_SIZE) if p in self._watches]
        else:
            pages = [p for p in self._watches if page <= p < end << PAGE_SHIFT]
        for page in pages:
            start, stop = max(off, page), min(off + size, page + PAGE_SIZE)
            self._tell_watchers(page, start - page, stop - start)

    def _tell_watchers(self, page: int, offset: int, size: int) -> None:
        for watcher in list(self._watches.get(page, ())):
            if not watcher.page_written(page, offset, size):
                self.unwatch(page, watcher)
