"""The names numeric instruction semantics may use (see :mod:`popek.wasm.isa`).

Integers are unsigned bit patterns of their width; floats are IEEE bit patterns. Float
arithmetic runs on host doubles: a binary32 add, subtract, multiply, divide or square root
computed in binary64 and rounded once to binary32 is exactly the binary32 result (binary64
has more than twice binary32's precision plus two bits). Every NaN an arithmetic operation
produces is the canonical NaN, which WebAssembly's NaN rules allow (it is an arithmetic NaN)
and which makes results deterministic: which operand's payload the host's NaN carries
depends on how CPython's code path happens to order a commutative operation, which differs
between tiers. Sign operations (neg, abs, copysign) act on the bits alone, as the
specification requires.
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable

from popek.wasm.errors import Trap

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
S32 = 0x80000000
S64 = 0x8000000000000000
F32_QUIET = 0x00400000
F64_QUIET = 0x0008000000000000
F32_CANON = 0x7FC00000
F64_CANON = 0x7FF8000000000000

_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# --- integers -------------------------------------------------------------------------

def s32(a: int) -> int:
    return (a ^ S32) - S32


def s64(a: int) -> int:
    return (a ^ S64) - S64


def sext(a: int, bits: int, width_mask: int) -> int:
    """Sign-extend the low ``bits`` of ``a`` into the width ``width_mask`` covers."""
    sign = 1 << (bits - 1)
    return (((a & ((sign << 1) - 1)) ^ sign) - sign) & width_mask


def ctz(a: int, bits: int) -> int:
    return (a & -a).bit_length() - 1 if a else bits


def rotl(a: int, n: int, bits: int, mask: int) -> int:
    n %= bits
    return ((a << n) | (a >> (bits - n))) & mask


def div_s(a: int, b: int, bits: int) -> int:
    if b == 0:
        raise Trap("integer divide by zero")
    sign = 1 << (bits - 1)
    x, y = (a ^ sign) - sign, (b ^ sign) - sign
    q = abs(x) // abs(y)
    if (x < 0) != (y < 0):
        q = -q
    if q == sign:
        raise Trap("integer overflow")
    return q & ((sign << 1) - 1)


def div_u(a: int, b: int) -> int:
    if b == 0:
        raise Trap("integer divide by zero")
    return a // b


def rem_s(a: int, b: int, bits: int) -> int:
    if b == 0:
        raise Trap("integer divide by zero")
    sign = 1 << (bits - 1)
    x, y = (a ^ sign) - sign, (b ^ sign) - sign
    r = abs(x) % abs(y)
    return (-r if x < 0 else r) & ((sign << 1) - 1)


def rem_u(a: int, b: int) -> int:
    if b == 0:
        raise Trap("integer divide by zero")
    return a % b


# --- float bits <-> host floats ---------------------------------------------------------

def f32(bits: int) -> float:
    return _F32.unpack(_U32.pack(bits))[0]


def f64(bits: int) -> float:
    return _F64.unpack(_U64.pack(bits))[0]


def b32(x: float) -> int:
    """The binary32 nearest ``x`` (ties to even), as bits; overflow gives infinity and any
    NaN the canonical one."""
    if x != x:
        return F32_CANON
    try:
        return _U32.unpack(_F32.pack(x))[0]
    except OverflowError:  # struct refuses finite values beyond binary32; a C cast rounds
        return _U32.unpack(array("f", [x]).tobytes())[0]


def b64(x: float) -> int:
    return F64_CANON if x != x else _U64.unpack(_F64.pack(x))[0]


# --- float arithmetic -------------------------------------------------------------------

def fdiv(x: float, y: float) -> float:
    """IEEE division (Python raises on division by zero)."""
    if y == 0.0:
        if x == 0.0 or x != x:
            return math.nan
        return math.copysign(math.inf, x) * math.copysign(1.0, y)
    return x / y


def fsqrt(x: float) -> float:
    if x < 0.0:
        return math.nan
    return math.sqrt(x) if x == x else x + x  # a NaN operand comes out quiet


def f32_min(a: int, b: int) -> int:
    return _min_max(a, b, f32, F32_QUIET, True)


def f32_max(a: int, b: int) -> int:
    return _min_max(a, b, f32, F32_QUIET, False)


def f64_min(a: int, b: int) -> int:
    return _min_max(a, b, f64, F64_QUIET, True)


def f64_max(a: int, b: int) -> int:
    return _min_max(a, b, f64, F64_QUIET, False)


def _min_max(a: int, b: int, unpack: Callable[[int], float], quiet: int, is_min: bool) -> int:
    x, y = unpack(a), unpack(b)
    if x != x or y != y:
        return (a if x != x else b) | quiet  # an arithmetic NaN
    if x == y:  # +0 and -0: min takes the negative one, max the positive one
        return (a | b) if is_min else (a & b)
    return a if (x < y) == is_min else b


def _round_op(a: int, unpack: Callable[[int], float], pack: Callable[[float], int], quiet: int,
              fn: Callable[[float], int]) -> int:
    x = unpack(a)
    if x != x:
        return a | quiet
    if math.isinf(x) or x == 0.0:
        return a
    return pack(math.copysign(float(fn(x)), x))


def _nearest(x: float) -> int:
    return round(x)  # ties to even


def f32_ceil(a: int) -> int:
    return _round_op(a, f32, b32, F32_QUIET, math.ceil)


def f32_floor(a: int) -> int:
    return _round_op(a, f32, b32, F32_QUIET, math.floor)


def f32_trunc(a: int) -> int:
    return _round_op(a, f32, b32, F32_QUIET, math.trunc)


def f32_nearest(a: int) -> int:
    return _round_op(a, f32, b32, F32_QUIET, _nearest)


def f64_ceil(a: int) -> int:
    return _round_op(a, f64, b64, F64_QUIET, math.ceil)


def f64_floor(a: int) -> int:
    return _round_op(a, f64, b64, F64_QUIET, math.floor)


def f64_trunc(a: int) -> int:
    return _round_op(a, f64, b64, F64_QUIET, math.trunc)


def f64_nearest(a: int) -> int:
    return _round_op(a, f64, b64, F64_QUIET, _nearest)


# --- conversions ------------------------------------------------------------------------

def trunc(x: float, lo: int, hi: int, mask: int) -> int:
    """Trapping float-to-integer conversion into [lo, hi], as bits of hi's width."""
    if x != x:
        raise Trap("invalid conversion to integer")
    if math.isinf(x):
        raise Trap("integer overflow")
    v = math.trunc(x)
    if v < lo or v > hi:
        raise Trap("integer overflow")
    return v & mask


def trunc_sat(x: float, lo: int, hi: int, mask: int) -> int:
    """Saturating float-to-integer conversion: NaN gives 0, out of range the nearest bound."""
    if x != x:
        return 0
    if x == math.inf:
        return hi & mask
    if x == -math.inf:
        return lo & mask
    return min(max(math.trunc(x), lo), hi) & mask


def int_to_f32(v: int) -> int:
    """The binary32 nearest the integer ``v`` (ties to even), rounding once."""
    if abs(v) < (1 << 53):
        return b32(float(v))  # exact in binary64, so rounded once by the cast
    shift = abs(v).bit_length() - 25  # keep 24 significant bits plus a guard bit
    m = abs(v) >> shift
    sticky = (abs(v) & ((1 << shift) - 1)) != 0
    guard = m & 1
    m >>= 1
    if guard and (sticky or m & 1):
        m += 1
    return b32(math.copysign(math.ldexp(float(m), shift + 1), v))
