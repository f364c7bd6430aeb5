"""The boot ROM at the reset vector: a few instructions that jump to the firmware.

As QEMU's virt reset vector does, it hands the firmware (or, with ``--bios none``, the
kernel) a0 = mhartid, a1 = the device tree's address and a2 = the address of an
OpenSBI ``fw_dynamic_info`` that names the kernel, which OpenSBI's fw_dynamic reads;
the same words at the same addresses, so code that peeks at them finds what it would.
"""

from __future__ import annotations

import struct
from typing import Any

BASE = 0x1000
SIZE = 0xF000

_CODE = (
    0x00000297,  # auipc t0, 0
    0x02828613,  # addi  a2, t0, 40   fw_dynamic_info
    0xF1402573,  # csrr  a0, mhartid
    0x0202B583,  # ld    a1, 32(t0)   device tree address
    0x0182B283,  # ld    t0, 24(t0)   firmware entry
    0x00028067,  # jr    t0
)
FW_DYNAMIC_MAGIC = 0x4942534F  # "OSBI"
FW_DYNAMIC_VERSION = 2
NEXT_MODE_S = 1


class BootRom:
    """Read-only memory holding the reset vector code, its jump table and the
    fw_dynamic_info (magic, version, next address, next mode, options, boot hart)."""

    def __init__(self, entry: int, dtb_addr: int, kernel_entry: int) -> None:
        self.image = struct.pack("<6I", *_CODE) + struct.pack(
            "<8Q", entry, dtb_addr, FW_DYNAMIC_MAGIC, FW_DYNAMIC_VERSION, kernel_entry,
            NEXT_MODE_S, 0, 0)

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
