"""The boot ROM at the reset vector: a few instructions that jump to the firmware.

Like QEMU's virt reset vector, it hands the firmware a0 = mhartid and a1 = the
device tree's address, both read from a small table that follows the code.
"""

from __future__ import annotations

import struct
from typing import Any

BASE = 0x1000
SIZE = 0xF000

_CODE = (
    0x00000297,  # auipc t0, 0
    0xF1402573,  # csrr  a0, mhartid
    0x0202B583,  # ld    a1, 32(t0)   device tree address
    0x0182B283,  # ld    t0, 24(t0)   firmware entry
    0x00028067,  # jr    t0
    0x00000000,  # (padding to the table at +24)
)


class BootRom:
    """Read-only memory holding the reset vector code and its jump table."""

    def __init__(self, entry: int, dtb_addr: int) -> None:
        self.image = struct.pack("<6I", *_CODE) + struct.pack("<QQ", entry, dtb_addr)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.image[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """ROM: writes are ignored."""

    def reset(self) -> None:
        """Nothing changes at run time."""

    def save_state(self) -> dict[str, Any]:
        return {"version": 1, "image": self.image.hex()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.image = bytes.fromhex(state["image"])
