"""SiFive test finisher as on QEMU's virt board (0x0010_0000): power off or reboot.

Bare-metal tests write a status to offset 0 to end the run; Linux reaches the same
register through ``syscon-poweroff`` (0x5555) and ``syscon-reboot`` (0x7777) regmap
writes. The VMM decides what "poweroff" and "reboot" mean, through ``on_finish``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from popek.devices.device import check_version

SIZE = 0x1000
STATE_VERSION = 1

FINISHER_FAIL = 0x3333
FINISHER_PASS = 0x5555
FINISHER_RESET = 0x7777


class Finisher:
    """``on_finish(kind, code)``: kind "poweroff" (exit status ``code``) or "reboot"."""

    def __init__(self, on_finish: Callable[[str, int], None]) -> None:
        self.on_finish = on_finish

    def reset(self) -> None:
        """Nothing to reset: the device has no state."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """16- and 32-bit writes at offset 0, as QEMU accepts; anything else is ignored."""
        if offset != 0 or size not in (2, 4):
            return
        value &= (1 << 8 * size) - 1
        status, code = value & 0xFFFF, (value >> 16) & 0xFFFF
        if status == FINISHER_PASS:
            self.on_finish("poweroff", 0)
        elif status == FINISHER_FAIL:
            self.on_finish("poweroff", code)
        elif status == FINISHER_RESET:
            self.on_finish("reboot", 0)

    def save_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION}

    def load_state(self, state: dict[str, Any]) -> None:
        check_version(state, STATE_VERSION)
