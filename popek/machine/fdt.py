"""A small flattened-device-tree (DTB, version 17) writer.

popek describes its board to the guest itself, so booting never needs ``dtc``.
Property values are given as Python values: ``int`` (one 32-bit cell), a list of
ints (cells), ``str`` (NUL-terminated), a list of strings (a string list), or
``bytes`` (raw, e.g. from :func:`u64`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_END = 9
HEADER_SIZE = 40

PropValue = int | list[int] | str | list[str] | bytes


def u64(*values: int) -> bytes:
    """64-bit big-endian values, for properties such as ``linux,initrd-start``."""
    return b"".join(struct.pack(">Q", v) for v in values)


def _encode(value: PropValue) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        raise TypeError("use b'' for an empty (boolean) property")
    if isinstance(value, int):
        return struct.pack(">I", value)
    if isinstance(value, str):
        return value.encode() + b"\0"
    if all(isinstance(v, str) for v in value):
        return b"".join(v.encode() + b"\0" for v in value)  # type: ignore[union-attr]
    return b"".join(struct.pack(">I", v) for v in value)  # type: ignore[arg-type]


@dataclass
class Node:
    """A device-tree node: its properties in order, and its children."""

    name: str
    props: dict[str, PropValue] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    def add(self, name: str, props: dict[str, PropValue] | None = None) -> Node:
        """Add and return a child node with the given properties (in order)."""
        child = Node(name, dict(props or {}))
        self.children.append(child)
        return child


class _Strings:
    def __init__(self) -> None:
        self.blob = bytearray()
        self.offsets: dict[str, int] = {}

    def offset(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.blob)
            self.blob += name.encode() + b"\0"
        return self.offsets[name]


def _pad4(data: bytearray) -> None:
    data += b"\0" * (-len(data) % 4)


def build(root: Node, boot_cpuid: int = 0) -> bytes:
    """Serialize ``root`` (named "") into a DTB."""
    strings = _Strings()
    structure = bytearray()

    def emit(node: Node) -> None:
        structure.extend(struct.pack(">I", FDT_BEGIN_NODE))
        structure.extend(node.name.encode() + b"\0")
        _pad4(structure)
        for name, value in node.props.items():
            data = _encode(value)
            structure.extend(struct.pack(">III", FDT_PROP, len(data), strings.offset(name)))
            structure.extend(data)
            _pad4(structure)
        for child in node.children:
            emit(child)
        structure.extend(struct.pack(">I", FDT_END_NODE))

    emit(root)
    structure.extend(struct.pack(">I", FDT_END))
    rsvmap = bytes(16)  # an empty memory reservation map: one all-zero entry
    off_rsv = HEADER_SIZE
    off_struct = off_rsv + len(rsvmap)
    off_strings = off_struct + len(structure)
    total = off_strings + len(strings.blob)
    header = struct.pack(
        ">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsv, 17, 16, boot_cpuid,
        len(strings.blob), len(structure),
    )
    return header + rsvmap + bytes(structure) + bytes(strings.blob)
