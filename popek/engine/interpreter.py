"""The reference tier: run a decoded block by calling one handler per instruction."""

from __future__ import annotations

from collections.abc import Callable

from popek.cpu.causes import Trap
from popek.engine.handlers import Handler

Op = tuple[Handler, int, int, int, int]
BlockFn = Callable[[int], int]


def interpret(ops: tuple[Op, ...], offsets: tuple[int, ...],
              on_hot: Callable[[], None] | None = None, hot_after: int = 0) -> BlockFn:
    """A function running ``ops`` from a pc; calls ``on_hot`` after ``hot_after`` runs.

    A trap leaves the faulting instruction's index on the exception (``index``),
    as translated blocks do, so the engine restores the precise pc for both tiers.
    """
    remaining = hot_after

    def run(pc: int) -> int:
        nonlocal remaining
        if on_hot is not None:
            remaining -= 1
            if remaining == 0:
                on_hot()
        start = pc
        try:
            for fn, a, b, c, d in ops:
                pc = fn(pc, a, b, c, d)
        except Trap as trap:
            trap.index = offsets.index(pc - start)
            raise
        return pc

    return run
