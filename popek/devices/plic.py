"""PLIC as on QEMU's virt board: 96 sources (1..95), two contexts per hart.

Context 2*h is hart h in M-mode (drives MEIP), 2*h+1 the same hart in S-mode (SEIP).
Pending bits latch as QEMU's sifive_plic latches them: a device raising its line (each
time it drives it high, whether or not it was high already) makes its source pending,
lowering the line withdraws the request, and a claim clears the bit and gates the
source until its completion. The completion does not make the source pending again
while the line stays high: the device asks again when its state next changes (the
virt board's UART, RTC and virtio-mmio drive their lines at each change, as QEMU's
do). A spec PLIC would re-raise a still-high line at once, and xv6, which never
acknowledges the UART's transmitter-empty interrupt (QEMU does not make it), would
spend every hart's time taking that one interrupt again and again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from popek.devices.device import (
    MASK32,
    InterruptTarget,
    IrqLine,
    bits,
    pack_state,
    unpack_state,
)

MEIP_BIT = 11
SEIP_BIT = 9

NUM_SOURCES = 96
PRIORITY_BITS = 3  # QEMU virt: 7 priority levels, the register is WARL over 3 bits
PRIORITY_MASK = (1 << PRIORITY_BITS) - 1
WORDS = NUM_SOURCES // 32
PENDING_BASE = 0x1000
ENABLE_BASE = 0x2000
ENABLE_STRIDE = 0x80
CONTEXT_BASE = 0x20_0000
CONTEXT_STRIDE = 0x1000
SIZE = 0x60_0000
STATE_VERSION = 2  # 2: pending bits latch (1 had the input lines, level, instead)


@dataclass
class PlicState:
    priority: list[int] = field(default_factory=lambda: [0] * NUM_SOURCES,
                                metadata=bits(PRIORITY_BITS))
    pending: int = field(default=0, metadata=bits(NUM_SOURCES))  # bit per source
    # bit per source: claimed and not yet completed
    claimed: int = field(default=0, metadata=bits(NUM_SOURCES))
    # bitmask per context
    enable: list[int] = field(default_factory=list, metadata=bits(NUM_SOURCES))
    threshold: list[int] = field(default_factory=list, metadata=bits(PRIORITY_BITS))


class Plic:
    """Platform-level interrupt controller; outputs are updated on every change."""

    def __init__(self, harts: Sequence[InterruptTarget]) -> None:
        self.harts = list(harts)
        self.contexts = 2 * len(self.harts)
        self.reset()

    def reset(self) -> None:
        n = self.contexts
        self.s = PlicState(enable=[0] * n, threshold=[0] * n)
        self._outputs = [False] * n
        self._drive_all()

    # -- interrupt sources --------------------------------------------------------------
    def irq_line(self, source: int) -> IrqLine:
        """The wire a device raises source ``source`` with."""
        self._check_source(source)
        return lambda level: self.set_source(source, level)

    def set_source(self, source: int, level: bool) -> None:
        """The device drives its line: high latches a request, low withdraws it."""
        self._check_source(source)
        bit = 1 << source
        old = self.s.pending
        self.s.pending = old | bit if level else old & ~bit
        if self.s.pending != old:
            self._update()

    @staticmethod
    def _check_source(source: int) -> None:
        if not 0 < source < NUM_SOURCES:
            raise ValueError(f"PLIC source {source} outside 1..{NUM_SOURCES - 1}")

    @property
    def pending(self) -> int:
        return self.s.pending & ~self.s.claimed

    def _best(self, ctx: int) -> int:
        """Highest-priority pending enabled source above the threshold; ties -> lowest id."""
        candidates = self.pending & self.s.enable[ctx]
        best, best_prio = 0, self.s.threshold[ctx]
        while candidates:
            low = candidates & -candidates
            source = low.bit_length() - 1
            if self.s.priority[source] > best_prio:
                best, best_prio = source, self.s.priority[source]
            candidates ^= low
        return best

    def _update(self) -> None:
        for ctx in range(self.contexts):
            level = self._best(ctx) != 0
            if level != self._outputs[ctx]:
                self._outputs[ctx] = level
                self._drive(ctx)

    def _drive(self, ctx: int) -> None:
        self.harts[ctx >> 1].set_interrupt(SEIP_BIT if ctx & 1 else MEIP_BIT, self._outputs[ctx])

    def _drive_all(self) -> None:
        for ctx in range(self.contexts):
            self._outputs[ctx] = self._best(ctx) != 0
            self._drive(ctx)

    # -- bus ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset & 3 or not 0 <= offset < SIZE:
            return 0
        if offset < PENDING_BASE:
            return self.s.priority[offset >> 2] if offset >> 2 < NUM_SOURCES else 0
        if offset < ENABLE_BASE:
            word = (offset - PENDING_BASE) >> 2
            return (self.pending >> (32 * word)) & MASK32 if word < WORDS else 0
        if offset < CONTEXT_BASE:
            ctx, word = divmod(offset - ENABLE_BASE, ENABLE_STRIDE)
            word >>= 2
            if ctx < self.contexts and word < WORDS:
                return (self.s.enable[ctx] >> (32 * word)) & MASK32
            return 0
        ctx, reg = divmod(offset - CONTEXT_BASE, CONTEXT_STRIDE)
        if ctx >= self.contexts:
            return 0
        if reg == 0:
            return self.s.threshold[ctx]
        if reg == 4:
            return self._claim(ctx)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3 or not 0 <= offset < SIZE:
            return
        value &= MASK32
        if offset < PENDING_BASE:
            if offset >> 2 < NUM_SOURCES:
                self.s.priority[offset >> 2] = value & PRIORITY_MASK
                self._update()
        elif offset < ENABLE_BASE:
            pass  # pending bits are read-only
        elif offset < CONTEXT_BASE:
            ctx, word = divmod(offset - ENABLE_BASE, ENABLE_STRIDE)
            word >>= 2
            if ctx < self.contexts and word < WORDS:
                shift = 32 * word
                self.s.enable[ctx] = self.s.enable[ctx] & ~(MASK32 << shift) | value << shift
                self._update()
        else:
            ctx, reg = divmod(offset - CONTEXT_BASE, CONTEXT_STRIDE)
            if ctx >= self.contexts:
                return
            if reg == 0:
                self.s.threshold[ctx] = value & PRIORITY_MASK
                self._update()
            elif reg == 4 and value < NUM_SOURCES:
                self.s.claimed &= ~(1 << value)
                self._update()

    def _claim(self, ctx: int) -> int:
        source = self._best(ctx)
        if source:
            self.s.pending &= ~(1 << source)
            self.s.claimed |= 1 << source
            self._update()
        return source

    # -- state --------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return pack_state(STATE_VERSION, self.s)

    def load_state(self, state: dict[str, Any]) -> None:
        if isinstance(state, dict) and state.get("version") == 1 and \
                type(state.get("level")) is type(state.get("claimed")) is int:
            # Saved before pending bits latched: what was pending then is pending now.
            state = {**state, "version": STATE_VERSION,
                     "pending": state["level"] & ~state["claimed"]}
            del state["level"]
        s = unpack_state(PlicState, STATE_VERSION, state)
        if len(s.priority) != NUM_SOURCES:
            raise ValueError(f"saved PLIC has {len(s.priority)} sources, expected {NUM_SOURCES}")
        if len(s.enable) != self.contexts or len(s.threshold) != self.contexts:
            raise ValueError(f"saved PLIC has {len(s.enable)} contexts, this one {self.contexts}")
        self.s = s
        self._drive_all()
