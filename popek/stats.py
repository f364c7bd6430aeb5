"""What runs count: the one-line summary ``--stats`` prints (``popek run`` and ``popek
exec``), and the traps a guest takes (VMM workers and ``popek.Machine``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from popek.cpu import causes

_CAUSE_NAMES = {getattr(causes, n): n.lower() for n in (
    "INSN_MISALIGNED", "INSN_ACCESS", "ILLEGAL_INSN", "BREAKPOINT", "LOAD_MISALIGNED",
    "LOAD_ACCESS", "STORE_MISALIGNED", "STORE_ACCESS", "ECALL_U", "ECALL_S", "ECALL_M",
    "INSN_PAGE_FAULT", "LOAD_PAGE_FAULT", "STORE_PAGE_FAULT")}
_IRQ_NAMES = {causes.INTERRUPT_BIT | getattr(causes, n): n.lower() for n in (
    "IRQ_S_SOFT", "IRQ_M_SOFT", "IRQ_S_TIMER", "IRQ_M_TIMER", "IRQ_S_EXT", "IRQ_M_EXT")}


def instruction_summary(instructions: int, seconds: float) -> str:
    mips = instructions / seconds / 1e6 if seconds > 0 else 0.0
    return f"popek: {instructions} guest instructions in {seconds:.2f} s ({mips:.2f} MIPS)"


def count_traps(harts: Iterable[Any], counter: Counter[int]) -> None:
    """Count every trap the ``harts`` take in ``counter``, by cause, wrapping their handlers."""
    for hart in harts:
        inner = hart.on_trap

        def on_trap(cause: int, tval: int, pc: int, inner=inner) -> int:
            counter[cause] += 1
            return inner(cause, tval, pc)

        hart.on_trap = on_trap


def trap_names(counts: dict[int, int]) -> dict[str, int]:
    """Trap counts by cause number as counts by name (``load_page_fault``, ``irq_s_timer``)."""
    return {_CAUSE_NAMES.get(cause) or _IRQ_NAMES.get(cause) or str(cause): n
            for cause, n in counts.items()}
