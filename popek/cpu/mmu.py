"""The hart's memory access path: a software TLB in front of translation and PMP.

The TLB is the VMM's shadow of the guest page tables: three dicts (read, write,
execute) from virtual page number to the host offset of the backing RAM page.
Loads and stores are closures that hit the TLB inline; everything else (a miss,
a page-crossing access, MMIO, a PMP region smaller than a page, a write to a page
someone watches, such as one holding decoded code) takes the slow path, which
translates, checks, and fills. Pages enter the write TLB only as guest memory admits
them (``PhysicalMemory.admit_write``), which is how dirty logs and write watches see
every write without the fast path doing anything; an absent page (dropped, its contents
elsewhere) is brought back before it enters any of the three.

``translate`` is pluggable: the system emulator walks the guest page tables
(:mod:`popek.cpu.pagewalk`); the process VM looks up its own address-space map.

A change of address space (a satp write, ``sfence.vma`` of one ASID) empties the
dicts, but the native mirror keeps the global translations (``flush_local``), and after
a fence of every address space those whose page-table entries still hold what their
walk read (``fence``): Linux's kernel mappings are global, and a boot re-walked ~29,000
of them after its ~150 context switches and full fences when each dropped everything.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Protocol

from popek.cpu import pagewalk, pmp
from popek.cpu.causes import (
    ACCESS_EXEC,
    ACCESS_FAULT_FOR_ACCESS,
    ACCESS_READ,
    ACCESS_WRITE,
    Trap,
)
from popek.cpu.physmem import PAGE_SIZE, BusError, PhysicalMemory

Translate = Callable[[int, int], int]



class TlbMirror(Protocol):
    """A copy of the TLB kept elsewhere (the native tier's tables): it hears every fill and
    every invalidation, so it never holds a translation a walk would not give. It keeps
    the global ones when the address space changes (``flush_local``), as the TLB's
    dicts do not (see Mmu._forget)."""

    # ``local``: the translation belongs to the address space (else it is global)
    def fill(self, access: int, vpn: int, host_page: int, local: bool = True) -> None: ...

    def flush(self) -> None: ...

    def flush_local(self) -> None: ...  # forget the local translations

    def flush_page(self, vpn: int) -> None: ...

    def switch_priv(self, old: int, new: int) -> None: ...

    def drop_writable(self, page: int | None) -> None: ...

TLB_LIMIT = 8192  # entries per dict before it is simply cleared
_PAGE_MASK = PAGE_SIZE - 1
PAGE_SHIFT = 12
# 64 KiB NAPOT pages (Svnapot), megapages, gigapages, terapages (Sv48).
_SUPERPAGE_SHIFTS = (16, 21, 30, 39)


class Mmu:
    """Software TLB and load/store accessors for one hart."""

    def __init__(self, hart, mem: PhysicalMemory, translate: Translate | None = None) -> None:
        self.hart = hart
        self.mem = mem
        self.tlb_r: dict[int, int] = {}
        self.tlb_w: dict[int, int] = {}
        self.tlb_x: dict[int, int] = {}
        self.system = translate is None  # else the process VM's own address-space map
        self.translate = translate
        # What page-table walks told about the cached pages, to drop no more than needed:
        # the superpages (as (log2 size, vaddr >> that)), the pages only SUM grants, and
        # the pages and superpages of one address space (not global: see flush_local),
        # and the global pages by the trail of their walk (pagewalk.unchanged), which is
        # each global page's only one (a page walked along two goes with local ones).
        self.superpages: set[tuple[int, int]] = set()
        self.sum_pages: set[int] = set()
        self.local_pages: set[int] = set()
        self.local_superpages: set[tuple[int, int]] = set()
        self.trails: dict[pagewalk.Trail, set[int]] = {}
        self.trail_of: dict[int, pagewalk.Trail] = {}
        # The (read, write, execute) translations of privileges not running now: a system
        # call returns to the same user pages, a trap handler runs on the same kernel pages.
        self.saved: dict[int, tuple[dict[int, int], dict[int, int], dict[int, int]]] = {}
        mem.add_tlb(self)
        self.accessors = self._make_accessors()
        self.mirror: TlbMirror | None = None

    def flush(self) -> None:
        """Forget every translation (satp, sfence.vma, privilege or permission changes)."""
        self.tlb_r.clear()
        self.tlb_w.clear()
        self.tlb_x.clear()
        self.superpages.clear()
        self.sum_pages.clear()
        self.local_pages.clear()
        self.local_superpages.clear()
        self.trails.clear()
        self.trail_of.clear()
        self.saved.clear()
        if self.mirror is not None:
            self.mirror.flush()

    def flush_local(self) -> None:
        """Forget the translations of the address space (satp changes, ``sfence.vma`` of
        one ASID): the TLB has no ASIDs, so the old address space's must go. The native
        mirror keeps the global ones, which every address space shares."""
        self._forget(set())
        if self.mirror is not None:
            self.mirror.flush_local()

    def fence(self) -> None:
        """``sfence.vma`` of every address space: forget every translation, but let the
        native mirror keep the global ones whose walk would read the same page-table
        entries now (so give the same answer); Linux fences everything after each
        unmapping of a user range."""
        doomed: set[int] = set()
        every_global_kept = True
        for trail, vpns in list(self.trails.items()):
            if not vpns:
                del self.trails[trail]
            elif not pagewalk.unchanged(self.hart, trail):
                del self.trails[trail]
                doomed |= vpns
                every_global_kept = False
        self._forget(doomed)
        if self.mirror is not None:
            if every_global_kept:  # its global entries are all still good
                self.mirror.flush_local()
            else:
                self.mirror.flush()

    def _forget(self, doomed: set[int]) -> None:
        """Empty the dicts, and forget the trails of the pages ``doomed`` and of the
        local ones. The dicts keep no global translation: each privilege change copies
        them (switch_priv), which a boot's thousands of kernel pages made cost more
        than the walks it saved; the native mirror's tables cost nothing to switch."""
        for tlb in (self.tlb_r, self.tlb_w, self.tlb_x):
            tlb.clear()
        self.saved.clear()
        trail_of, trails = self.trail_of, self.trails
        for vpn in trail_of.keys() & (doomed | self.local_pages):
            vpns = trails.get(trail_of.pop(vpn))
            if vpns is not None:
                vpns.discard(vpn)
        self.sum_pages &= trail_of.keys()  # global user pages the mirror may still hold
        self.local_pages.clear()
        self.superpages -= self.local_superpages
        self.local_superpages.clear()

    def switch_priv(self, old: int, new: int) -> None:
        """The privilege changes from ``old`` to ``new`` (a trap or xRET): its translations
        were checked for ``old``, so set them aside and bring back those of ``new``."""
        tlbs = (self.tlb_r, self.tlb_w, self.tlb_x)
        self.saved[old] = (self.tlb_r.copy(), self.tlb_w.copy(), self.tlb_x.copy())
        back = self.saved.pop(new, ({}, {}, {}))
        for tlb, entries in zip(tlbs, back, strict=True):
            tlb.clear()
            tlb.update(entries)
        if self.mirror is not None:
            self.mirror.switch_priv(old, new)

    def _tlbs(self) -> list[dict[int, int]]:
        """Every TLB dict, the current privilege's and those set aside."""
        return [self.tlb_r, self.tlb_w, self.tlb_x, *(t for s in self.saved.values() for t in s)]

    def flush_page(self, vaddr: int) -> None:
        """Forget the translation of the page holding ``vaddr`` (``sfence.vma`` with an
        address: Linux issues one per page it remaps). A page inside a cached superpage
        takes the whole TLB with it, as the superpage's one PTE may have changed."""
        if any((shift, vaddr >> shift) in self.superpages for shift in _SUPERPAGE_SHIFTS):
            self.flush()
            return
        vpn = vaddr >> 12
        for tlb in self._tlbs():
            tlb.pop(vpn, None)
        trail = self.trail_of.pop(vpn, None)
        if trail is not None:
            self.trails[trail].discard(vpn)
        if self.mirror is not None:
            self.mirror.flush_page(vpn)

    def drop_sum_pages(self) -> None:
        """mstatus.SUM was cleared: S-mode may no longer touch the user pages it granted."""
        for tlb in self._tlbs():
            for vpn in self.sum_pages:
                tlb.pop(vpn, None)
        if self.mirror is not None:
            for vpn in self.sum_pages:
                self.mirror.flush_page(vpn)
        self.sum_pages.clear()

    def drop_writable(self, page: int | None) -> None:
        """Forget the writable translations to host page ``page`` (None: all of them), those
        of privileges set aside too: guest memory asks when it starts watching the page
        or a dirty log starts over."""
        for tlb_w in [self.tlb_w, *(s[1] for s in self.saved.values())]:
            if page is None:
                tlb_w.clear()
            else:
                for vpn in [vpn for vpn, base in tlb_w.items() if base == page]:
                    del tlb_w[vpn]
        if self.mirror is not None:
            self.mirror.drop_writable(page)

    def drop_readable(self, page: int) -> None:
        """Forget the readable translations to host page ``page``, those of privileges set
        aside too: guest memory asks when a debugger starts watching its reads."""
        for tlb_r in [self.tlb_r, *(s[0] for s in self.saved.values())]:
            for vpn in [vpn for vpn, base in tlb_r.items() if base == page]:
                del tlb_r[vpn]
        if self.mirror is not None:
            self.mirror.flush()

    # -- slow path ----------------------------------------------------------------------
    def resolve(self, vaddr: int, size: int, access: int) -> tuple[int, int | None]:
        """Translate and check one access within a page: (physical address, host offset).

        Caches the page in the TLB when the whole page may be accessed the same way.
        The host offset is None for addresses that are not RAM (devices).
        """
        if self.system:
            pa, span, needs_sum, trail = pagewalk.walk(self.hart, vaddr, access)
        else:  # one address space, which only flush() changes
            pa, span, needs_sum, trail = self.translate(vaddr, access), PAGE_SHIFT, False, ()
        off = self.mem.ram_offset(pa)
        cacheable = off is not None
        if cacheable and self.mem.absent_pages:
            self.mem.make_present(off, size)  # every tier's accesses to RAM pass here first
        if self.system:
            priv = pagewalk.effective_priv(self.hart, access)
            page = pa & ~_PAGE_MASK
            if not pmp.pmp_page_uniform(self.hart, page, access, priv):
                cacheable = False
                if not pmp.pmp_check(self.hart, pa, size, access, priv):
                    raise Trap(ACCESS_FAULT_FOR_ACCESS[access], vaddr)
        if access == ACCESS_WRITE and cacheable:
            cacheable = self.mem.admit_write(off & ~_PAGE_MASK)
        elif access == ACCESS_READ and cacheable:
            cacheable = self.mem.admit_read(off & ~_PAGE_MASK)
        if cacheable:
            tlb = (self.tlb_r, self.tlb_w, self.tlb_x)[access]
            if len(tlb) >= TLB_LIMIT:
                tlb.clear()  # capacity, not invalidation: the mirror may keep its copies
                if len(self.sum_pages) + len(self.superpages) + len(self.local_pages) \
                        + len(self.trail_of) >= TLB_LIMIT:
                    self.flush()  # bound what the walks told, which a clear leaves stale
            vpn = vaddr >> 12
            tlb[vpn] = off & ~_PAGE_MASK
            if span > PAGE_SHIFT:
                self.superpages.add((span, vaddr >> span))
                if trail is None:
                    self.local_superpages.add((span, vaddr >> span))
            if self.system:  # the process VM has one address space: nothing is local
                self._track(vpn, trail)
            if needs_sum:
                self.sum_pages.add(vaddr >> 12)
            if self.mirror is not None:
                self.mirror.fill(access, vpn, off & ~_PAGE_MASK, self._local(vpn))
        return pa, off

    def fetch_page(self, pc: int) -> int | None:
        """Host offset of the RAM page holding ``pc`` (None: fetch from a device)."""
        _, off = self.resolve(pc, 2, ACCESS_EXEC)
        return None if off is None else off & ~_PAGE_MASK

    def fetch_slow(self, pc: int, size: int) -> int:
        """Instruction bits from anywhere (devices, page-crossing instructions)."""
        value = 0
        for i in range(size // 2):
            pa, off = self.resolve(pc + 2 * i, 2, ACCESS_EXEC)
            try:
                half = self.mem.load(pa, 2)
            except BusError:
                raise Trap(ACCESS_FAULT_FOR_ACCESS[ACCESS_EXEC], pc + 2 * i) from None
            value |= half << (16 * i)
        return value

    def load_slow(self, vaddr: int, size: int, access: int = ACCESS_READ) -> int:
        first = PAGE_SIZE - (vaddr & _PAGE_MASK)
        if first < size:  # crosses a page: both halves, low first
            low = self.load_slow(vaddr, first, access)
            high = self.load_slow((vaddr + first) & ((1 << 64) - 1), size - first, access)
            return low | (high << (8 * first))
        base = (self.tlb_r if access == ACCESS_READ else self.tlb_w).get(vaddr >> 12)
        if base is not None:  # only the native TLB's smaller copy had lost it
            self.refill_mirror(access, vaddr, base)
            off = base | (vaddr & _PAGE_MASK)
            return int.from_bytes(self.mem.ram[off:off + size], "little")
        pa, off = self.resolve(vaddr, size, access)
        if off is not None:
            self.mem.before_read(off, size)
            return int.from_bytes(self.mem.ram[off:off + size], "little")
        try:
            return self.mem.load(pa, size)
        except BusError:
            raise Trap(ACCESS_FAULT_FOR_ACCESS[access], vaddr) from None

    def store_slow(self, vaddr: int, size: int, value: int) -> None:
        first = PAGE_SIZE - (vaddr & _PAGE_MASK)
        if first < size:  # crosses a page: check the second page before writing the first
            high_addr = (vaddr + first) & ((1 << 64) - 1)
            self.resolve(high_addr, size - first, ACCESS_WRITE)
            self.store_slow(vaddr, first, value)
            self.store_slow(high_addr, size - first, value >> (8 * first))
            return
        base = self.tlb_w.get(vaddr >> 12)
        if base is not None:  # as in load_slow
            self.refill_mirror(ACCESS_WRITE, vaddr, base)
            off = base | (vaddr & _PAGE_MASK)
            self.mem.ram[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
                size, "little")
            return
        pa, _ = self.resolve(vaddr, size, ACCESS_WRITE)
        try:
            self.mem.store(pa, size, value & ((1 << (8 * size)) - 1))  # RAM or a device
        except BusError:
            raise Trap(ACCESS_FAULT_FOR_ACCESS[ACCESS_WRITE], vaddr) from None

    def refill_mirror(self, access: int, vaddr: int, base: int) -> None:
        """The native TLB, direct-mapped and smaller (and cleared whole where these dicts
        drop one page), missed a page these dicts hold: give it back rather than walk."""
        if self.mirror is not None:
            self.mirror.fill(access, vaddr >> 12, base, self._local(vaddr >> 12))

    def _track(self, vpn: int, trail: pagewalk.Trail | None) -> None:
        """Note whether the translation of ``vpn`` just cached is local or global (with
        the trail of its walk, the page's only one: walked along two, it is local)."""
        if trail is not None and self.trail_of.setdefault(vpn, trail) == trail:
            self.trails.setdefault(trail, set()).add(vpn)
        elif vpn not in self.local_pages:
            self.local_pages.add(vpn)
            if vpn in self.trail_of and self.mirror is not None:
                self.mirror.flush_page(vpn)  # the mirror may hold it as global

    def _local(self, vpn: int) -> bool:
        """Whether the cached translation of ``vpn`` belongs to the address space."""
        return self.system and (vpn in self.local_pages or vpn not in self.trail_of)

    # -- fast path ----------------------------------------------------------------------
    def _make_accessors(self) -> dict[str, Callable]:
        """Loads and stores for the semantics' namespace, with the TLB hit inline."""
        ram = self.mem.ram
        tlb_r, tlb_w = self.tlb_r, self.tlb_w
        load_slow, store_slow = self.load_slow, self.store_slow
        acc: dict[str, Callable] = {}
        for size, code in ((1, "B"), (2, "H"), (4, "I"), (8, "Q")):
            fmt = struct.Struct("<" + code)
            acc[f"ld{size * 8}"] = _make_load(size, fmt.unpack_from, ram, tlb_r, load_slow)
            acc[f"st{size * 8}"] = _make_store(size, fmt.pack_into, ram, tlb_w, store_slow)
            acc[f"amo_ld{size * 8}"] = _make_load(
                size, fmt.unpack_from, ram, tlb_w,
                lambda va, n: load_slow(va, n, ACCESS_WRITE),
            )
        return acc


def _make_load(size, unpack, ram, tlb, slow) -> Callable[[int], int]:
    limit = PAGE_SIZE - size
    mask = (1 << (8 * size)) - 1 if size < 8 else (1 << 64) - 1

    def load(addr: int) -> int:
        base = tlb.get(addr >> 12)
        if base is not None:
            o = addr & 4095
            if o <= limit:
                return unpack(ram, base | o)[0]
        return slow(addr, size) & mask

    return load


def _make_store(size, pack, ram, tlb, slow) -> Callable[[int, int], None]:
    limit = PAGE_SIZE - size
    mask = (1 << (8 * size)) - 1

    def store(addr: int, value: int) -> None:
        base = tlb.get(addr >> 12)
        if base is not None:
            o = addr & 4095
            if o <= limit:
                pack(ram, base | o, value & mask)
                return
        slow(addr, size, value)

    return store
