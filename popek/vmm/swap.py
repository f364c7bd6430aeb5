"""VM swap-out: a guest's RAM in a file, brought back page by page on first touch.

"The VMM may swap out a VM to avoid thrashing" (the seeds): a swapped-out guest keeps
running, but the host holds almost none of its RAM. :meth:`Swapper.swap_out` writes the
pages the host holds for the guest into its swap file, then marks them absent in guest
memory (:meth:`PhysicalMemory.mark_absent`, "Absent pages" in
:mod:`popek.cpu.physmem`), which drops them; the guest's next access to any of them, by
any tier or device, reads it back from the file (:class:`SwapFile`, the page source).
The guest changes nothing and notices nothing but time.

What must be written, and what the host can simply drop:

- fresh RAM (anonymous memory) reads as zeros once dropped, so zero pages are dropped,
  never written;
- a restored guest's RAM maps its snapshot copy-on-write, and a dropped page reads the
  snapshot again, so only the pages the host copied since are written: the host says
  which (``/proc/self/pagemap``: present or swapped, and not a file page; opened before
  the worker confines itself, when it still may);
- a page the file already holds, read back since but not written (a dirty log started at
  the first swap-out says which), is dropped again without writing it twice.

The file is the VMM's (a confined worker may create no file): it hands the worker a
descriptor, and each page lives at its own offset (``page * PAGE_SIZE``), so the file
needs no map and is as sparse as the guest. Every write is synced and then evicted from
the host's page cache, so swapping out really gives memory back, and a full disk
(ENOSPC, EFBIG, EIO) is found before any page is dropped: the guest stays resident, and
the error says why. Swap out and in on the machine's thread, between the harts' slices.
"""

from __future__ import annotations

import mmap
import os
import re

from popek.cpu.physmem import PAGE_SHIFT, PhysicalMemory
from popek.vmm.snapshot import nonzero_runs

_RUN = re.compile(rb"\x01+")
_NOT = bytes.maketrans(b"\0\1", b"\1\0")
# The top byte of a pagemap entry: bit 7 present, 6 swapped, 5 a file page (or shared).
_COPIED = bytes(1 if b & 0xC0 and not b & 0x20 else 0 for b in range(256))
PAGEMAP = "/proc/self/pagemap"


class SwapError(Exception):
    """Swap-out failed; nothing was dropped. The message says why, in one line."""


class SwapFile:
    """The page source of a swapped-out guest: its pages in a file, page n at offset
    n * PAGE_SIZE."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fetch(self, runs: list[tuple[int, int]], ram: memoryview) -> None:
        for first, count in runs:
            start, end = first << PAGE_SHIFT, (first + count) << PAGE_SHIFT
            with ram[start:end] as view:
                if os.preadv(self.fd, [view], start) != end - start:
                    raise OSError(f"the swap file lacks pages {first}+{count}")

    def store(self, runs: list[tuple[int, int]], ram: memoryview) -> None:
        """Write the pages of ``runs`` from ``ram`` and make sure they are on disk (the
        disk, not the host's memory, holds them); OSError if the file cannot take them."""
        for first, count in runs:
            start, end = first << PAGE_SHIFT, (first + count) << PAGE_SHIFT
            with ram[start:end] as view:
                done = 0
                while done < end - start:
                    done += os.pwritev(self.fd, [view[done:]], start + done)
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self.fd)


class Swapper:
    """Swaps one machine's RAM out to a file (the same one every time) and back in. Make
    it with the machine, before the guest runs: its dirty log tells which pages the
    guest wrote since the file took them."""

    def __init__(self, mem: PhysicalMemory, pagemap: int | None) -> None:
        """``pagemap``: a descriptor of this process's ``/proc/self/pagemap`` (restored
        RAM cannot swap out without it)."""
        self.mem = mem
        self.pagemap = pagemap
        pages = mem.size >> PAGE_SHIFT
        self.in_file = bytearray(pages)  # 1: the file holds the page as it is now
        self.log = mem.dirty_log()

    def swap_out(self, file: SwapFile) -> int:
        """Move the guest's RAM to ``file``, keeping nothing resident; returns the bytes
        now absent (held by the file). SwapError, with the guest as it was, if the file
        cannot take them."""
        mem = self.mem
        for first, count in self.log.take():
            self.in_file[first:first + count] = bytes(count)
        keep = self._runs_to_keep()
        new = [run for first, count in keep
               for run in _runs_in(self.in_file[first:first + count].translate(_NOT), first)]
        try:
            with memoryview(mem.ram) as ram:
                file.store(new, ram)
        except OSError as err:
            raise SwapError(f"cannot swap out: writing the swap file failed: "
                            f"{err.strerror or err}") from None
        for first, count in new:
            self.in_file[first:first + count] = b"\1" * count
        if keep:
            mem.mark_absent(keep, file)
        mem.ram.madvise(mmap.MADV_DONTNEED)  # what is left reads the same when dropped
        return mem.absent_pages << PAGE_SHIFT

    def swap_in(self) -> None:
        """Bring every absent page back now (instead of on first touch)."""
        self.mem.make_present(0, self.mem.size)

    def _runs_to_keep(self) -> list[tuple[int, int]]:
        """The runs of present pages that dropping would lose (see the module docstring)."""
        mem = self.mem
        if not mem.backed:
            return list(nonzero_runs(mem))  # absent pages are dropped: zero here
        if self.pagemap is None:
            raise SwapError("cannot swap out: the worker cannot read its page map")
        pages = mem.size >> PAGE_SHIFT
        try:
            entries = os.pread(self.pagemap, 8 * pages, 8 * (mem.ram_address >> PAGE_SHIFT))
        except OSError as err:
            raise SwapError(f"cannot swap out: reading {PAGEMAP}: {err.strerror}") from None
        return _runs_in(entries[7::8].translate(_COPIED), 0)  # absent ones are not present

    def close(self) -> None:
        """The machine is gone (its absent pages with it)."""
        self.log.close()


def _runs_in(flags: bytes | bytearray, offset: int) -> list[tuple[int, int]]:
    """(first page, count) runs of the set bytes of ``flags``, its byte 0 being page
    ``offset``."""
    return [(offset + m.start(), m.end() - m.start()) for m in _RUN.finditer(flags)]
