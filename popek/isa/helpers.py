"""Names that instruction semantics may use besides registers and memory.

Semantics run with this module's public names in scope (see :mod:`popek.isa.spec`).
Integer values in registers are unsigned 64-bit; these helpers convert at the edges.
"""

from __future__ import annotations

from popek.cpu.causes import (
    BREAKPOINT,
    ECALL_U,
    ILLEGAL_INSN,
    LOAD_MISALIGNED,
    STORE_MISALIGNED,
    Trap,
)

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
SB = 1 << 63  # sign bit: (v ^ SB) - SB reads v as signed, (a ^ SB) < (b ^ SB) compares signed


def sext32(v: int) -> int:
    """Sign-extend the low 32 bits of ``v`` to an unsigned 64-bit value."""
    return (((v & M32) ^ 0x80000000) - 0x80000000) & M64


def sext16(v: int) -> int:
    return (((v & 0xFFFF) ^ 0x8000) - 0x8000) & M64


def sext8(v: int) -> int:
    return (((v & 0xFF) ^ 0x80) - 0x80) & M64


def signed(v: int) -> int:
    """Read an unsigned 64-bit register value as a signed integer."""
    return (v ^ SB) - SB


def signed32(v: int) -> int:
    return ((v & M32) ^ 0x80000000) - 0x80000000


def div_trunc(a: int, b: int) -> int:
    """Signed division rounding toward zero, as RISC-V (and C) define it; b != 0."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def rem_trunc(a: int, b: int) -> int:
    """Remainder whose sign follows the dividend; b != 0."""
    return a - b * div_trunc(a, b)


def clz(v: int, bits: int) -> int:
    """Leading zeros of a ``bits``-wide value (``bits`` for zero)."""
    return bits - v.bit_length()


def ctz(v: int, bits: int) -> int:
    """Trailing zeros of a ``bits``-wide value (``bits`` for zero)."""
    return (v & -v).bit_length() - 1 if v else bits


def cpop(v: int) -> int:
    return v.bit_count()


def rev8(v: int) -> int:
    """The bytes of a 64-bit value in reverse order."""
    return int.from_bytes(v.to_bytes(8, "little"), "big")


def clmul(a: int, b: int) -> int:
    """The 128-bit carry-less product of two 64-bit values."""
    product = 0
    while b:
        low = b & -b
        product ^= a << (low.bit_length() - 1)
        b ^= low
    return product


def check_aligned(addr: int, size: int, cause: int) -> None:
    """Atomics must be naturally aligned; ordinary accesses need not be."""
    if addr & (size - 1):
        raise Trap(cause, addr)


__all__ = [
    "BREAKPOINT",
    "ECALL_U",
    "ILLEGAL_INSN",
    "LOAD_MISALIGNED",
    "M32",
    "M64",
    "SB",
    "STORE_MISALIGNED",
    "Trap",
    "check_aligned",
    "clmul",
    "clz",
    "cpop",
    "ctz",
    "div_trunc",
    "rem_trunc",
    "rev8",
    "sext16",
    "sext32",
    "sext8",
    "signed",
    "signed32",
]
