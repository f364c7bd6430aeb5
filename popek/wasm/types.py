"""Value, function, table, memory and global types, and the limits of one module's resources.

Values travel as Python objects: ``i32``/``i64`` as unsigned ints (the bits), ``f32``/``f64``
as their IEEE bit patterns (so NaN payloads survive), references as a :class:`Function`,
any host object (``externref``) or ``None`` for null.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_TYPES = ("i32", "i64", "f32", "f64")
REF_TYPES = ("funcref", "externref")
VALUE_TYPE_CODES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64",
                    0x70: "funcref", 0x6F: "externref"}

PAGE = 65536
MAX_PAGES = 65536  # 4 GiB of 32-bit address space

# Implementation limits, so that hostile modules cannot exhaust the host.
MAX_LOCALS = 50000
MAX_CALL_DEPTH = 10000
MAX_TABLE_ELEMENTS = 10_000_000


def default_value(t: str) -> object:
    """The zero value of a local or table slot of type ``t``."""
    return None if t in REF_TYPES else 0


@dataclass(frozen=True)
class FuncType:
    params: tuple[str, ...]
    results: tuple[str, ...]

    def __str__(self) -> str:
        return f"[{' '.join(self.params)}] -> [{' '.join(self.results)}]"


@dataclass(frozen=True)
class Limits:
    min: int
    max: int | None

    def fits_in(self, other: Limits) -> bool:
        """Import matching: these limits are a subtype of ``other``'s."""
        if self.min < other.min:
            return False
        if other.max is None:
            return True
        return self.max is not None and self.max <= other.max


@dataclass(frozen=True)
class TableType:
    limits: Limits
    elem: str


@dataclass(frozen=True)
class MemoryType:
    limits: Limits


@dataclass(frozen=True)
class GlobalType:
    type: str
    mutable: bool
