"""The run-time objects of an instance (memories, tables, globals, segments) and the
bulk operations on them that instruction semantics call.

Every access is bounds-checked here or by the tier before it touches the bytes, and growth
is limited, so a module cannot reach beyond its own objects or exhaust the host.
"""

from __future__ import annotations

import struct

from popek.wasm.errors import Trap
from popek.wasm.types import MAX_PAGES, MAX_TABLE_ELEMENTS, PAGE

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
OOB_MEMORY = "out of bounds memory access"
OOB_TABLE = "out of bounds table access"


DEFAULT_MEMORY_LIMIT = 1 << 30  # bytes a memory may reach unless the embedder says otherwise


class Memory:
    """A linear memory: a bytearray that only ever grows in place (tiers hold on to it).

    ``limit_bytes`` caps it below the module's own maximum: memory is real host memory here,
    so a module asking for more is refused at instantiation and its growth fails (-1).
    """

    def __init__(self, pages: int, max_pages: int | None = None,
                 limit_bytes: int = DEFAULT_MEMORY_LIMIT) -> None:
        self.max_pages = max_pages
        self.limit_pages = min(MAX_PAGES, limit_bytes // PAGE)
        if pages > self.limit_pages:
            raise Trap(f"memory of {pages} pages exceeds the limit of {self.limit_pages} pages")
        self.data = bytearray(pages * PAGE)

    @property
    def pages(self) -> int:
        return len(self.data) // PAGE

    @property
    def size(self) -> int:
        return len(self.data)

    def grow(self, delta: int) -> int:
        """Add ``delta`` pages; the old size in pages, or -1 if the limits forbid it."""
        old = self.pages
        new = old + delta
        if delta < 0 or new > min(self.limit_pages, MAX_PAGES if self.max_pages is None
                                   else self.max_pages):
            return -1
        if delta:
            self.data.extend(bytes(delta * PAGE))
        return old

    def _check(self, addr: int, n: int) -> None:
        if addr < 0 or n < 0 or addr + n > len(self.data):
            raise Trap(OOB_MEMORY)

    def read(self, addr: int, n: int) -> bytes:
        self._check(addr, n)
        return bytes(self.data[addr:addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        self.data[addr:addr + len(data)] = data

    def load_u32(self, addr: int) -> int:
        self._check(addr, 4)
        return _U32.unpack_from(self.data, addr)[0]

    def store_u32(self, addr: int, value: int) -> None:
        self._check(addr, 4)
        _U32.pack_into(self.data, addr, value & 0xFFFFFFFF)

    def load_u64(self, addr: int) -> int:
        self._check(addr, 8)
        return _U64.unpack_from(self.data, addr)[0]

    def store_u64(self, addr: int, value: int) -> None:
        self._check(addr, 8)
        _U64.pack_into(self.data, addr, value & 0xFFFFFFFFFFFFFFFF)


class Table:
    """A table of references (functions or host objects; None is null)."""

    def __init__(self, elem: str, size: int, max_size: int | None, init: object = None):
        if size > MAX_TABLE_ELEMENTS:
            raise Trap(f"table of {size} elements exceeds the limit of {MAX_TABLE_ELEMENTS}")
        self.elem = elem
        self.max = max_size
        self.elements: list[object] = [init] * size

    def grow(self, delta: int, init: object) -> int:
        old = len(self.elements)
        new = old + delta
        if new > MAX_TABLE_ELEMENTS or (self.max is not None and new > self.max):
            return -1
        self.elements.extend([init] * delta)
        return old


class Global:
    def __init__(self, type_: str, mutable: bool, value: object) -> None:
        self.type = type_
        self.mutable = mutable
        self.value = value


class Segment:
    """A data or element segment's contents, which ``data.drop``/``elem.drop`` empty."""

    def __init__(self, items: bytes | list[object]) -> None:
        self.items = items

    def drop(self) -> None:
        self.items = self.items[:0]


# --- semantics of bulk memory and table instructions -------------------------------------

def _copy(dst: bytearray | list, at: int, src: bytes | bytearray | list, start: int, n: int,
          message: str) -> None:
    """Copy ``n`` items after checking both ranges (overlap is fine: the source is sliced)."""
    if start + n > len(src) or at + n > len(dst):
        raise Trap(message)
    dst[at:at + n] = src[start:start + n]


def memory_init(mem: Memory, seg: Segment, dst: int, src: int, n: int) -> None:
    _copy(mem.data, dst, seg.items, src, n, OOB_MEMORY)


def memory_copy(mem: Memory, dst: int, src: int, n: int) -> None:
    _copy(mem.data, dst, mem.data, src, n, OOB_MEMORY)


def memory_fill(mem: Memory, dst: int, value: int, n: int) -> None:
    if dst + n > len(mem.data):
        raise Trap(OOB_MEMORY)
    mem.data[dst:dst + n] = bytes([value & 0xFF]) * n


def table_get(t: Table, i: int) -> object:
    if i >= len(t.elements):
        raise Trap(OOB_TABLE)
    return t.elements[i]


def table_set(t: Table, i: int, value: object) -> None:
    if i >= len(t.elements):
        raise Trap(OOB_TABLE)
    t.elements[i] = value


def table_init(t: Table, seg: Segment, dst: int, src: int, n: int) -> None:
    _copy(t.elements, dst, seg.items, src, n, OOB_TABLE)


def table_copy(dst_t: Table, src_t: Table, dst: int, src: int, n: int) -> None:
    _copy(dst_t.elements, dst, src_t.elements, src, n, OOB_TABLE)


def table_fill(t: Table, dst: int, value: object, n: int) -> None:
    if dst + n > len(t.elements):
        raise Trap(OOB_TABLE)
    t.elements[dst:dst + n] = [value] * n
