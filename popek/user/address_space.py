"""A process's virtual address space: its mappings, over one sparse host mapping.

Guest virtual address == offset in the process VM's RAM (one MAP_NORESERVE mmap
covering the 2^38-byte Sv39 user range), so translation is a permission check on
the mapping list: the hart's software TLB then caches it per page like any other
translation. Anything that takes access away must flush that TLB, which the owner
does through ``on_revoke``.

System calls reach guest memory through :meth:`read` and :meth:`write`, which check
the mappings first: a bad pointer is an EFAULT, never a host exception.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from popek.cpu.causes import PAGE_FAULT_FOR_ACCESS, Trap
from popek.cpu.physmem import PAGE_SIZE, PhysicalMemory

USER_TOP = 1 << 38  # end of the Sv39 user half
PAGE_MASK = PAGE_SIZE - 1
PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
PROT_ALL = PROT_READ | PROT_WRITE | PROT_EXEC
PROT_FOR_ACCESS = (PROT_READ, PROT_WRITE, PROT_EXEC)  # indexed by causes.ACCESS_*
MIN_MMAP_ADDR = 0x10000  # like vm.mmap_min_addr: page zero and its neighbours stay unmapped


def page_floor(addr: int) -> int:
    return addr & ~PAGE_MASK


def page_ceil(addr: int) -> int:
    return (addr + PAGE_MASK) & ~PAGE_MASK


class GuestFault(Exception):
    """A system call named guest memory the process may not access that way."""


class StringTooLong(Exception):
    """A guest string is longer than the call allows (ENAMETOOLONG, E2BIG for execve)."""


@dataclass(slots=True)
class Vma:
    """One mapping: pages [start, end) with PROT_* permissions."""

    start: int
    end: int
    prot: int


class AddressSpace:
    """The mappings of one process over ``mem``; translation for the hart."""

    def __init__(self, mem: PhysicalMemory, mmap_top: int) -> None:
        self.mem = mem
        self.mmap_top = mmap_top  # mappings without an address are placed below this
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self.on_revoke: Callable[[], None] = lambda: None

    # -- translation (the hart's slow path) ---------------------------------------------
    def translate(self, vaddr: int, access: int) -> int:
        i = bisect_right(self._starts, vaddr) - 1
        if i >= 0:
            vma = self.vmas[i]
            if vaddr < vma.end and vma.prot & PROT_FOR_ACCESS[access]:
                return vaddr
        raise Trap(PAGE_FAULT_FOR_ACCESS[access], vaddr)

    def find(self, addr: int) -> Vma | None:
        """The mapping containing ``addr``."""
        i = bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    # -- changing the mappings ----------------------------------------------------------
    def map(self, start: int, length: int, prot: int) -> None:
        """Map zeroed pages at [start, start + length), replacing whatever was there."""
        end = page_ceil(start + length)
        self._carve(start, end)
        self.mem.discard(start, end - start)
        self._insert(Vma(start, end, prot))

    def unmap(self, start: int, length: int) -> None:
        end = page_ceil(start + length)
        if self._carve(start, end):
            self.mem.discard(start, end - start)

    def protect(self, start: int, length: int, prot: int) -> bool:
        """Change permissions; False (and no change) if part of the range is unmapped."""
        end = page_ceil(start + length)
        if not self.is_mapped(start, end):
            return False
        for piece in self._carve(start, end):
            piece.prot = prot
            self._insert(piece)
        return True

    def is_mapped(self, start: int, end: int) -> bool:
        """Whether every page of [start, end) belongs to some mapping."""
        addr = start
        while addr < end:
            vma = self.find(addr)
            if vma is None:
                return False
            addr = vma.end
        return True

    def is_free(self, start: int, end: int) -> bool:
        if start < MIN_MMAP_ADDR or end > USER_TOP or start >= end:
            return False
        i = bisect_right(self._starts, start) - 1
        if i >= 0 and self.vmas[i].end > start:
            return False
        return i + 1 >= len(self.vmas) or self.vmas[i + 1].start >= end

    def find_free(self, length: int, hint: int = 0) -> int | None:
        """Where to put a new mapping: at ``hint`` if free, else the highest gap below the top."""
        length = page_ceil(length)
        hint = page_floor(hint)
        if hint and self.is_free(hint, hint + length):
            return hint
        top = self.mmap_top
        for vma in reversed(self.vmas):
            if vma.start >= top:
                continue
            if vma.end + length <= top:
                return top - length
            top = vma.start
        return top - length if top - length >= MIN_MMAP_ADDR else None

    def clear(self) -> None:
        """Unmap everything (execve)."""
        for vma in self.vmas:
            self.mem.discard(vma.start, vma.end - vma.start)
        self.vmas.clear()
        self._starts.clear()
        self.on_revoke()

    def _carve(self, start: int, end: int) -> list[Vma]:
        """Remove [start, end) from the mappings; returns the removed pieces."""
        removed: list[Vma] = []
        kept: list[Vma] = []
        for vma in self._overlapping(start, end):
            if vma.start < start:
                kept.append(Vma(vma.start, start, vma.prot))
            if vma.end > end:
                kept.append(Vma(end, vma.end, vma.prot))
            removed.append(Vma(max(vma.start, start), min(vma.end, end), vma.prot))
            self._remove(vma)
        for vma in kept:
            self._insert(vma, merge=False)
        if removed:
            self.on_revoke()
        return removed

    def _overlapping(self, start: int, end: int) -> list[Vma]:
        i = max(bisect_right(self._starts, start) - 1, 0)
        found = []
        while i < len(self.vmas) and self.vmas[i].start < end:
            if self.vmas[i].end > start:
                found.append(self.vmas[i])
            i += 1
        return found

    def _remove(self, vma: Vma) -> None:
        i = self._starts.index(vma.start)
        del self.vmas[i]
        del self._starts[i]

    def _insert(self, vma: Vma, merge: bool = True) -> None:
        i = bisect_right(self._starts, vma.start)
        if merge and i > 0:
            prev = self.vmas[i - 1]
            if prev.end == vma.start and prev.prot == vma.prot:
                vma = Vma(prev.start, vma.end, vma.prot)
                i -= 1
                del self.vmas[i]
                del self._starts[i]
        if merge and i < len(self.vmas):
            nxt = self.vmas[i]
            if nxt.start == vma.end and nxt.prot == vma.prot:
                vma = Vma(vma.start, nxt.end, vma.prot)
                del self.vmas[i]
                del self._starts[i]
        self.vmas.insert(i, vma)
        self._starts.insert(i, vma.start)

    def copy(self, dst: int, src: int, length: int) -> None:
        """Move page contents within the space (mremap)."""
        self.mem.move(dst, src, length)

    # -- guest memory for system calls --------------------------------------------------
    def check(self, addr: int, length: int, prot: int) -> None:
        """Raise GuestFault unless all of [addr, addr + length) allows ``prot``."""
        end = addr + length
        if length <= 0:
            return
        if addr < 0 or end > USER_TOP:
            raise GuestFault(addr)
        while addr < end:
            vma = self.find(addr)
            if vma is None or not vma.prot & prot:
                raise GuestFault(addr)
            addr = vma.end

    def read(self, addr: int, length: int) -> bytes:
        self.check(addr, length, PROT_READ)
        return self.mem.ram[addr:addr + length]

    def write(self, addr: int, data: bytes) -> None:
        self.check(addr, len(data), PROT_WRITE)
        if data:
            self.mem.write(addr, data)

    def read_cstr(self, addr: int, limit: int = 1 << 16) -> bytes:
        """The NUL-terminated string at ``addr`` (without the NUL)."""
        ram = self.mem.ram
        pos = addr
        while True:
            vma = self.find(pos)
            if vma is None or not vma.prot & PROT_READ:
                raise GuestFault(pos)
            stop = min(vma.end, addr + limit)
            nul = ram.find(b"\0", pos, stop)
            if nul >= 0:
                return ram[addr:nul]
            if stop == addr + limit:
                raise StringTooLong(addr)
            pos = stop

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def read_pointers(self, addr: int, limit: int = 1 << 17) -> list[int]:
        """A NULL-terminated array of pointers (argv, envp)."""
        values = []
        while (value := self.read_u64(addr)) != 0:
            values.append(value)
            addr += 8
            if len(values) > limit:
                raise StringTooLong(addr)
        return values
