"""The small interface every memory-mapped device of the virt board implements.

The bus only needs ``read``/``write`` (see :class:`popek.cpu.physmem.Device`); the VMM
also needs ``reset`` (reboot) and ``save_state``/``load_state`` (snapshots, live
migration). State is a plain JSON-able dict with a ``"version"`` key, so a snapshot
written by one popek can be checked, and refused cleanly, by another.

Guest accesses never raise: a device answers a bad offset or size by reading 0 and
ignoring the write, because a guest must not be able to crash the host. Host-side
mistakes (a malformed saved state, an invalid interrupt source) do raise.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, Protocol, TypeVar, get_type_hints, runtime_checkable

from popek.jsontypes import has_type

IrqLine = Callable[[bool], None]
"""One interrupt wire into the PLIC: call with the line's new level."""

MASK32 = (1 << 32) - 1
MASK64 = (1 << 64) - 1


class InterruptTarget(Protocol):
    """What CLINT and PLIC drive: a hart's ``mip`` bits (MSIP, MTIP, SEIP, MEIP)."""

    def set_interrupt(self, bit: int, level: bool) -> None: ...


@runtime_checkable
class Device(Protocol):
    """A device on the bus with serializable state."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class HostEvents(Protocol):
    """Where a device that receives from the host (a NIC) registers the host descriptor
    it waits on: the machine runner, which sleeps on every such descriptor at once while
    the harts idle and calls back when one is ready. A device never polls."""

    def watch(self, fd: int, readable: Callable[[], None] | None,
              writable: Callable[[], None] | None = None) -> None:
        """Call ``readable``/``writable`` when ``fd`` is; both None: stop watching it."""


S = TypeVar("S")


def bits(n: int) -> dict[str, int]:
    """Metadata for a state field that holds an ``n``-bit register (or, for a list field,
    one per source, context or hart): :func:`unpack_state` refuses saved values outside
    0 .. 2**n - 1, which the guest could otherwise read back or feed into arithmetic."""
    return {"bits": n}


def pack_state(version: int, state: Any) -> dict[str, Any]:
    """A device's state dataclass as a versioned plain dict (deep copy: no aliasing)."""
    return {"version": version, **asdict(state)}


def unpack_state(cls: type[S], version: int, data: dict[str, Any]) -> S:
    """Rebuild a state dataclass from :func:`pack_state` output, refusing other versions.

    Saved state comes from a file, so every field must have its declared type (an int
    field takes no bool, a list[int] only ints): a device never runs on a value its code
    cannot handle; fields declared with :func:`bits` must also fit their width."""
    check_version(data, version)
    return unpack_fields(cls, data)


def unpack_fields(cls: type[S], data: Any) -> S:
    """Rebuild a state dataclass from the plain dict of its fields (``asdict``'s output,
    as a part of a device's state), checked as :func:`unpack_state` checks them."""
    if not isinstance(data, dict):
        raise ValueError(f"saved {cls.__name__} is a {type(data).__name__}, not an object")
    hints = _type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in data:
            raise ValueError(f"saved {cls.__name__} lacks {f.name!r}")
        value = data[f.name]
        if not has_type(value, hints[f.name]):
            raise ValueError(f"saved {cls.__name__}.{f.name} is not {hints[f.name]}: "
                             f"{value!r:.40}")
        width = f.metadata.get("bits")
        if width is not None and not all(v is None or 0 <= v < 1 << width
                                         for v in (value if type(value) is list else [value])):
            raise ValueError(f"saved {cls.__name__}.{f.name} does not fit {width} bits: "
                             f"{value!r:.40}")
        values[f.name] = copy.deepcopy(data[f.name])
    return cls(**values)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """A state class's field types, evaluated once: a migration's destination loads every
    device's state while the guest stands still."""
    return get_type_hints(cls)


def check_version(data: dict[str, Any], version: int) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"saved state is a {type(data).__name__}, not an object")
    if data.get("version") != version:
        raise ValueError(f"saved state version {data.get('version')!r}, expected {version}")
