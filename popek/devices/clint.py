"""CLINT: per-hart software interrupt (msip), timer compare (mtimecmp) and mtime.

Laid out like QEMU's virt board (SiFive CLINT = ACLINT MSWI at 0 + MTIMER at 0x4000),
so OpenSBI's and Linux's drivers work unchanged. mtime is an external 10 MHz clock plus
an offset that guest writes to mtime adjust; the device holds no timer of its own: the
machine calls :meth:`update` at block/slice boundaries and asks :meth:`next_deadline`
before sleeping while every hart waits in WFI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from popek.devices.device import MASK32, MASK64, InterruptTarget, check_version

MSIP_BIT = 3
MTIP_BIT = 7

MSIP_BASE = 0x0000
MTIMECMP_BASE = 0x4000
MTIME = 0xBFF8
SIZE = 0x10000
STATE_VERSION = 1


class Clint:
    """msip[h] at 4*h, mtimecmp[h] at 0x4000 + 8*h, mtime at 0xbff8 (32- or 64-bit access)."""

    def __init__(self, harts: Sequence[InterruptTarget], clock: Callable[[], int]) -> None:
        self.harts = list(harts)
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """mtime restarts at 0 and mtimecmp reads 0, as on QEMU (so MTIP is pending at boot)."""
        n = len(self.harts)
        self.offset = -self.clock()
        self.msip = [0] * n
        self.mtimecmp = [0] * n
        self._mtip = [False] * n
        self._drive_all()

    # -- time ---------------------------------------------------------------------------
    def mtime(self) -> int:
        """Current mtime; wire each hart's ``time`` to this so rdtime agrees with the CLINT."""
        return (self.clock() + self.offset) & MASK64

    def update(self) -> None:
        """Bring every hart's MTIP up to date with mtime >= mtimecmp."""
        now = self.mtime()
        for h, cmp in enumerate(self.mtimecmp):
            if (now >= cmp) != self._mtip[h]:
                self._mtip[h] = not self._mtip[h]
                self.harts[h].set_interrupt(MTIP_BIT, self._mtip[h])

    def next_deadline(self) -> int | None:
        """Smallest mtimecmp still in the future (mtime ticks), or None if no timer is armed.

        Compare against :meth:`mtime`; a compare value already reached is left out because
        its MTIP is already raised and cannot wake anyone later.
        """
        now = self.mtime()
        return min((cmp for cmp in self.mtimecmp if cmp > now), default=None)

    # -- bus ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if not 0 <= offset < SIZE:
            return 0
        if offset < MTIMECMP_BASE:
            h = offset >> 2
            if size == 4 and not offset & 3 and h < len(self.harts):
                return self.msip[h]
            return 0
        if size not in (4, 8) or offset & 3:
            return 0
        if offset >= MTIME:
            if offset > MTIME + 4:
                return 0
            now = self.mtime()
            if offset == MTIME:
                return now if size == 8 else now & MASK32
            return now >> 32
        h = (offset - MTIMECMP_BASE) >> 3
        if h >= len(self.harts):
            return 0
        cmp = self.mtimecmp[h]
        if offset & 4:
            return cmp >> 32
        return cmp if size == 8 else cmp & MASK32

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < SIZE:
            return
        if offset < MTIMECMP_BASE:
            h = offset >> 2
            if size == 4 and not offset & 3 and h < len(self.harts):
                self.msip[h] = value & 1
                self.harts[h].set_interrupt(MSIP_BIT, bool(self.msip[h]))
            return
        if size not in (4, 8) or offset & 3:
            return
        if offset >= MTIME:
            if offset <= MTIME + 4:
                self._set_mtime(self._merge(self.mtime(), offset & 4, size, value))
            return
        h = (offset - MTIMECMP_BASE) >> 3
        if h < len(self.harts):
            cmp = self._merge(self.mtimecmp[h], offset & 4, size, value)
            if cmp is not None:
                self.mtimecmp[h] = cmp
                self.update()

    @staticmethod
    def _merge(old: int, high: int, size: int, value: int) -> int | None:
        """A 64-bit register after a write of one half or the whole; None if not allowed."""
        if size == 8:
            return None if high else value & MASK64
        if high:
            return (value & MASK32) << 32 | (old & MASK32)
        return (old & ~MASK32 & MASK64) | (value & MASK32)

    def _set_mtime(self, value: int | None) -> None:
        if value is not None:
            self.offset = value - self.clock()
            self.update()

    # -- state --------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        """mtime is saved as a value, so a restored guest sees time continue from here."""
        return {"version": STATE_VERSION, "mtime": self.mtime(),
                "msip": list(self.msip), "mtimecmp": list(self.mtimecmp)}

    def load_state(self, state: dict[str, Any]) -> None:
        check_version(state, STATE_VERSION)
        n = len(self.harts)
        msip, mtimecmp = list(state["msip"]), list(state["mtimecmp"])
        if len(msip) != n or len(mtimecmp) != n:
            raise ValueError(f"saved CLINT has {len(msip)} harts, this machine {n}")
        self.msip = [int(m) & 1 for m in msip]
        self.mtimecmp = [int(c) & MASK64 for c in mtimecmp]
        self.offset = int(state["mtime"]) - self.clock()
        self._drive_all()

    def _drive_all(self) -> None:
        """Drive every output from state, whatever the harts held before (reset, restore)."""
        now = self.mtime()
        for h, hart in enumerate(self.harts):
            self._mtip[h] = now >= self.mtimecmp[h]
            hart.set_interrupt(MTIP_BIT, self._mtip[h])
            hart.set_interrupt(MSIP_BIT, bool(self.msip[h]))
