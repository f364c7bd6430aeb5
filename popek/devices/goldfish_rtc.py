"""Goldfish RTC as on QEMU's virt board (google,goldfish-rtc, PLIC source 11).

The time is nanoseconds since the Unix epoch: the host's wall clock plus an offset the
guest sets by writing TIME_LOW/TIME_HIGH. Only the offset is state, so a restored or
migrated guest reads the true date, as with QEMU's default ``-rtc clock=host``. The
alarm has no timer of its own: the machine calls :meth:`GoldfishRtc.update`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from popek.devices.device import MASK32, MASK64, IrqLine, bits, pack_state, unpack_state

SIZE = 0x1000
STATE_VERSION = 1

TIME_LOW = 0x00
TIME_HIGH = 0x04
ALARM_LOW = 0x08
ALARM_HIGH = 0x0C
IRQ_ENABLED = 0x10
CLEAR_ALARM = 0x14
ALARM_STATUS = 0x18
CLEAR_INTERRUPT = 0x1C


@dataclass
class RtcState:
    offset_ns: int = 0  # guest time minus host wall-clock time
    # latched by reading TIME_LOW, so the two halves are consistent
    time_high: int = field(default=0, metadata=bits(32))
    alarm_next: int = field(default=0, metadata=bits(64))
    alarm_running: bool = False
    irq_pending: bool = False
    irq_enabled: bool = False


class GoldfishRtc:
    """``irq(level)`` drives PLIC source 11; ``wall_clock()`` gives host ns since the epoch."""

    def __init__(self, irq: IrqLine, wall_clock: Callable[[], int] = time.time_ns) -> None:
        self.irq = irq
        self.wall_clock = wall_clock
        self.s = RtcState()
        self.reset()

    def reset(self) -> None:
        """Alarm and interrupt state clear; the time the guest set survives, as on QEMU."""
        self.s = RtcState(offset_ns=self.s.offset_ns)
        self._update_irq()

    def now(self) -> int:
        return (self.wall_clock() + self.s.offset_ns) & MASK64

    def update(self) -> None:
        """Fire the alarm once its time has come."""
        if self.s.alarm_running and self.now() >= self.s.alarm_next:
            self._fire()

    def seconds_to_alarm(self) -> float | None:
        """How long until the armed alarm fires (None: none is armed), so a host whose
        harts all idle knows when to wake up for it."""
        if not self.s.alarm_running:
            return None
        return max(0, self.s.alarm_next - self.now()) / 1e9

    def _fire(self) -> None:
        self.s.alarm_running = False
        self.s.irq_pending = True
        self._update_irq()

    def _update_irq(self) -> None:
        self.irq(self.s.irq_pending and self.s.irq_enabled)

    # -- bus ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        s = self.s
        if offset == TIME_LOW:
            now = self.now()
            s.time_high = now >> 32
            return now & MASK32
        if offset == TIME_HIGH:
            return s.time_high
        if offset == ALARM_LOW:
            return s.alarm_next & MASK32
        if offset == ALARM_HIGH:
            return s.alarm_next >> 32
        if offset == IRQ_ENABLED:
            return int(s.irq_enabled)
        if offset == ALARM_STATUS:
            return int(s.alarm_running)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            return
        value &= MASK32
        s = self.s
        if offset in (TIME_LOW, TIME_HIGH):
            now = self.now()
            new = _deposit(now, offset == TIME_HIGH, value)
            s.offset_ns += new - now
        elif offset == ALARM_LOW:  # the low half arms the alarm (drivers write it last)
            s.alarm_next = _deposit(s.alarm_next, False, value)
            if s.alarm_next <= self.now():
                self._fire()
            else:
                s.alarm_running = True
        elif offset == ALARM_HIGH:
            s.alarm_next = _deposit(s.alarm_next, True, value)
        elif offset == IRQ_ENABLED:
            s.irq_enabled = bool(value & 1)
            self._update_irq()
        elif offset == CLEAR_ALARM:
            s.alarm_running = False
        elif offset == CLEAR_INTERRUPT:
            s.irq_pending = False
            self._update_irq()

    # -- state --------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return pack_state(STATE_VERSION, self.s)

    def load_state(self, state: dict[str, Any]) -> None:
        self.s = unpack_state(RtcState, STATE_VERSION, state)
        self._update_irq()


def _deposit(old: int, high: bool, value: int) -> int:
    """``old`` with one 32-bit half replaced by ``value``."""
    if high:
        return value << 32 | (old & MASK32)
    return (old & ~MASK32 & MASK64) | value
