"""The one-line summary ``--stats`` prints, shared by ``popek run`` and ``popek exec``."""

from __future__ import annotations


def instruction_summary(instructions: int, seconds: float) -> str:
    mips = instructions / seconds / 1e6 if seconds > 0 else 0.0
    return f"popek: {instructions} guest instructions in {seconds:.2f} s ({mips:.2f} MIPS)"
