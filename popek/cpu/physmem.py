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
and tell their watchers. Every hart's MMU registers its TLB (:class:`HartTlb`), since
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

Absent pages, brought back on first touch
------------------------------------------
A RAM page can be *absent*: its host memory dropped (``MADV_DONTNEED``) while its
contents live elsewhere, in a :class:`PageSource` (a swap file for a swapped-out VM; the
source VMM for a post-copy migration). :meth:`~PhysicalMemory.mark_absent` records the
pages, drops them, and flushes every hart's TLB (:class:`HartTlb`), so no tier holds a
translation to them. From then on, every door to RAM brings a page back before the
access proceeds, through :meth:`~PhysicalMemory.make_present`, which asks the source to
write the pages' contents back in place:

- a hart's TLB fill (read, write or fetch; every tier fills through the MMU's ``resolve``,
  and the native tier's tables and jump cache only mirror what it filled);
- the slow-path doors above (``load``/``store``/``read``/``write``/``move``), which page
  walks, device DMA, loaders, firmware and system calls use;
- the few readers of ``ram`` itself outside a TLB (the virtqueue's rings and descriptor
  tables) and whole-RAM readers (snapshots, migration), which call ``make_present``.

``discard`` forgets absent pages instead of fetching them (they become zeros), and so does
``write`` for the pages it overwrites whole (DMA, pages pushed to a post-copy
destination): only the pages it writes in part are fetched first. Bringing a
page back is not a write: its contents are what the guest last saw, so dirty logs and
write watches hear nothing, and decoded code stays valid. The fast path pays nothing:
absent pages are in no TLB, and the doors test one integer, ``absent_pages``, that is 0
unless something is absent. A fault brings back the absent pages among the
:data:`READAHEAD` pages from the first it needs, so a guest that walks a buffer does not
fault page by page. One source holds a memory's absent pages at a time::

    class SwapFile:                          # a PageSource
        def fetch(self, runs, ram):          # [(first page, count), ...], memoryview of RAM
            for first, count in runs:
                os.preadv(fd, [ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE]],
                          first * PAGE_SIZE)

    save(pages)                              # the contents, somewhere the source finds them
    mem.mark_absent(runs, swap_file)         # dropped; back on first touch

Mark and fetch on the machine's thread, between the harts' slices, like a dirty log's take.
"""

from __future__ import annotations

import ctypes
import mmap
from bisect import bisect_right
from typing import Protocol

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
MAP_NORESERVE = 0x4000  # Linux; not exported by Python 3.11's mmap module
_DIRTY = 1
READAHEAD = 16  # a fault brings back the absent pages among this many from the first it needs


def runs_of_ones(bits: mmap.mmap | bytearray, start: int = 0,
                  end: int | None = None) -> list[tuple[int, int]]:
    """The (first, count) runs of 1 bytes in a byte-a-page map, from ``start`` to ``end``,
    found at memchr speed: a sparse map (a migration's last round) costs microseconds."""
    end = len(bits) if end is None else end
    runs = []
    first = bits.find(b"\1", start, end)
    while first >= 0:
        stop = bits.find(b"\0", first, end)
        stop = end if stop < 0 else stop
        runs.append((first, stop - first))
        first = bits.find(b"\1", stop, end)
    return runs


class BusError(Exception):
    """Nothing answers at a physical address (the hart turns it into an access fault)."""

    def __init__(self, pa: int) -> None:
        super().__init__(f"no memory or device at physical address {pa:#x}")
        self.pa = pa


class Device(Protocol):
    """What the bus needs from a memory-mapped device."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class HartTlb(Protocol):
    """A hart's cache of translations to RAM pages (its MMU), which must forget pages on
    demand: writable (or readable) ones, or all."""

    def drop_writable(self, page: int | None) -> None:
        """Forget every writable translation to the RAM page at host offset ``page``
        (None: to any page), so that the next write to it takes the slow path."""

    def drop_readable(self, page: int) -> None:
        """Forget every readable translation to the RAM page at host offset ``page``."""

    def flush(self) -> None:
        """Forget every translation, so that the next access to any page fills again."""


class PageSource(Protocol):
    """Where the contents of absent pages are (see "Absent pages" in the module docstring):
    a swap file, a migration's source VMM. It holds each page it was given until the page
    is fetched, and may be asked for a page again after it was marked absent again."""

    def fetch(self, runs: list[tuple[int, int]], ram: memoryview) -> None:
        """Write the contents of the (first page, count) runs into ``ram`` (all of guest
        RAM) at their places, ``ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE]``.
        Raise OSError when they cannot be had: the access that needed them fails."""


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
        runs = runs_of_ones(self.bits)
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
        view = ctypes.c_char.from_buffer(self.ram)
        self.ram_address = ctypes.addressof(view)  # for native code and the host's page map
        del view  # the export would pin the mapping, which lives as long as this memory
        self._dev_starts: list[int] = []
        self._devices: list[tuple[int, int, Device]] = []
        # Write watching (see the module docstring).
        self._tlbs: list[HartTlb] = []
        self._logs: list[mmap.mmap] = []
        self._watches: dict[int, list[WriteWatcher]] = {}
        self._read_watches: dict[int, ReadWatcher] = {}
        # Absent pages (see the module docstring): a byte a page, made on first use (the
        # process VM's RAM spans 2**26 pages and never has any).
        self.absent_pages = 0
        self._absent: bytearray | None = None
        self._source: PageSource | None = None

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
            if self.absent_pages:
                self.make_present(off, size)
            return int.from_bytes(self.ram[off:off + size], "little")
        hit = self.device_at(pa)
        if hit is None:
            raise BusError(pa)
        return hit[1].read(hit[0], size)

    def store(self, pa: int, size: int, value: int) -> None:
        off = pa - self.base
        if 0 <= off and off + size <= self.size:
            if self.absent_pages:
                self.make_present(off, size)
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
        if self.absent_pages:
            self.make_present(off, n)
        return self.ram[off:off + n]

    def write(self, pa: int, data: bytes) -> None:
        """Store bytes in RAM (loaders, DMA, firmware, system calls); raises BusError
        outside RAM."""
        off = self.ram_offset(pa)
        if off is None or off + len(data) > self.size:
            raise BusError(pa)
        if self.absent_pages:
            self._present_for_write(off, len(data))
        self._before_write(off, len(data))
        self.ram[off:off + len(data)] = data

    def discard(self, off: int, length: int) -> None:
        """Zero the whole pages at host offsets ``[off, off + length)`` and give their
        memory back to the host; absent ones are forgotten, not fetched."""
        if self.absent_pages:
            self._forget_absent(off >> PAGE_SHIFT, (off + length) >> PAGE_SHIFT)
        self._before_write(off, length)
        self.ram.madvise(mmap.MADV_DONTNEED, off, length)
        if self.backed:
            # Dropped pages of a private file mapping read the file again, not zeros:
            # zero them (private zeroed pages, which KSM folds into the zero page).
            self.ram[off:off + length] = bytes(length)

    def move(self, dst: int, src: int, length: int) -> None:
        """Copy ``length`` bytes from host offset ``src`` to ``dst`` (they may overlap)."""
        if self.absent_pages:
            self.make_present(src, length)
            self.make_present(dst, length)
        self._before_write(dst, length)
        self.ram.move(dst, src, length)

    # -- write watching (see the module docstring) --------------------------------------
    def add_tlb(self, tlb: HartTlb) -> None:
        """A hart's MMU: it caches pages for writing only as ``admit_write`` allows, and
        forgets them all when pages go absent."""
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

    # -- absent pages (see the module docstring) ----------------------------------------
    def mark_absent(self, runs: list[tuple[int, int]], source: PageSource) -> None:
        """Drop the (first page, count) runs of RAM, whose contents ``source`` now holds:
        their next access of any kind fetches them from it. Every hart's TLB forgets all
        its pages. Raises ValueError while another source still holds absent pages."""
        if self.absent_pages and source is not self._source:
            raise ValueError("guest memory already has absent pages from another source")
        if self._absent is None:
            self._absent = bytearray(self.size >> PAGE_SHIFT)
        absent = self._absent
        for first, count in runs:
            if first < 0 or count <= 0 or first + count > len(absent):
                raise ValueError(f"pages {first}+{count} are outside guest RAM")
            self.absent_pages += count - absent.count(1, first, first + count)
            absent[first:first + count] = b"\1" * count
            self.ram.madvise(mmap.MADV_DONTNEED, first << PAGE_SHIFT, count << PAGE_SHIFT)
        self._source = source
        for tlb in self._tlbs:
            tlb.flush()

    def make_present(self, off: int, length: int) -> None:
        """Bring back the absent pages among host offsets ``[off, off + length)`` (and
        those among the READAHEAD pages from its first) from their source, before an
        access."""
        absent = self._absent
        if not self.absent_pages or absent is None or length <= 0:
            return
        first, end = off >> PAGE_SHIFT, ((off + length - 1) >> PAGE_SHIFT) + 1
        if absent.find(1, first, end) < 0:
            return
        end = min(len(absent), max(end, first + READAHEAD))
        runs = runs_of_ones(absent, first, end)
        with memoryview(self.ram) as ram:
            self._source.fetch(runs, ram)
        self._forget_absent(first, end)

    def fill_absent(self, first: int, data: bytes | memoryview) -> None:
        """Contents that came unasked for the pages from ``first`` on (a post-copy
        migration's source pushes the pages its destination has not touched yet): the
        pages still absent take them and are present from then on; the others, brought
        back since and maybe written, are left alone. Like a fetch, this is no write."""
        absent = self._absent
        count = len(data) >> PAGE_SHIFT
        if not self.absent_pages or absent is None:
            return
        for start, run in runs_of_ones(absent, first, min(first + count, len(absent))):
            at = (start - first) << PAGE_SHIFT
            self.ram[start << PAGE_SHIFT:(start + run) << PAGE_SHIFT] = \
                data[at:at + (run << PAGE_SHIFT)]
            self._forget_absent(start, start + run)

    def _present_for_write(self, off: int, length: int) -> None:
        """``[off, off + length)`` is about to be overwritten: the absent pages it covers
        whole are forgotten (their old contents are never needed: DMA into a swapped-out
        page, a loader's image), and those it covers in part fetched."""
        first, end = (off + PAGE_MASK) >> PAGE_SHIFT, (off + length) >> PAGE_SHIFT
        if first >= end:  # no page whole
            self.make_present(off, length)
            return
        self._forget_absent(first, end)
        self.make_present(off, (first << PAGE_SHIFT) - off)  # the head, the tail: in part
        self.make_present(end << PAGE_SHIFT, off + length - (end << PAGE_SHIFT))

    def absent_runs(self) -> list[tuple[int, int]]:
        """The (first page, count) runs of absent pages, in ascending order."""
        if not self.absent_pages or self._absent is None:
            return []
        return runs_of_ones(self._absent)

    def _forget_absent(self, first: int, end: int) -> None:
        """Pages ``[first, end)`` are no longer absent (fetched, or discarded)."""
        absent = self._absent
        if absent is None:
            return
        self.absent_pages -= absent.count(1, first, end)
        absent[first:end] = bytes(end - first)
        if not self.absent_pages:
            self._source = None
