"""IEEE 754 binary32/binary64 arithmetic exactly as the RISC-V F and D extensions define it.

Host floats cannot serve: they know one rounding mode, raise no flags, produce
non-canonical NaNs, and Python 3.11 has no fused multiply-add. So every operation
here computes its exact result with integers (a significand and a power of two; a
quotient or square root carries a sticky bit for the discarded remainder) and
rounds it once, in the requested mode, detecting tininess after rounding as RISC-V
requires. Any NaN result is the canonical NaN, and a signalling NaN operand raises NV.

API. Operands and results are raw bit patterns as Python ints: 32-bit for ``f32_*``,
64-bit for ``f64_*``. ``rm`` is a resolved rounding mode ``FP_RNE``..``FP_RMM`` (see
:func:`fp_rm`); ``flags`` is an fflags value (``FP_NV | FP_DZ | FP_OF | FP_UF | FP_NX``).
Each name below exists for ``f32_`` and ``f64_``:

- ``add``, ``sub``, ``mul``, ``div`` ``(a, b, rm) -> (bits, flags)``; ``sqrt(a, rm)``;
- ``fmadd(a, b, c, rm)`` is a*b+c, ``fmsub`` a*b-c, ``fnmsub`` -(a*b)+c, ``fnmadd`` -(a*b)-c,
  each rounded once;
- ``min``, ``max`` ``(a, b) -> (bits, flags)``: -0 < +0, a lone NaN yields the other operand;
- ``eq``, ``lt``, ``le`` ``(a, b) -> (0 or 1, flags)``: eq signals only on sNaN, lt/le on any NaN;
- ``classify(a) -> mask`` (the 10-bit fclass result), ``sgnj``, ``sgnjn``, ``sgnjx``
  ``(a, b) -> bits``: these raise no flags, so they return the value alone;
- ``to_i32``, ``to_u32``, ``to_i64``, ``to_u64`` ``(a, rm) -> (bits, flags)``: the integer as
  two's-complement bits of its own width, saturated as RISC-V specifies (NaN gives the
  largest value; out of range gives the nearest bound and NV; otherwise NX if inexact);
- ``from_i32``, ``from_u32``, ``from_i64``, ``from_u64`` ``(v, rm) -> (bits, flags)``: the low
  32/64 bits of ``v`` read as signed/unsigned;
- ``f32_to_f64(a) -> (bits, flags)`` and ``f64_to_f32(a, rm) -> (bits, flags)``.

And for the instruction semantics: ``fp_rm(rm_field, fcsr)`` resolves a rounding mode or
raises illegal instruction, ``fp_box32`` / ``fp_unbox32`` apply NaN-boxing.
"""

from __future__ import annotations

from functools import partial
from math import isqrt
from typing import NamedTuple

from popek.cpu.causes import ILLEGAL_INSN, Trap

FP_RNE, FP_RTZ, FP_RDN, FP_RUP, FP_RMM = 0, 1, 2, 3, 4
FP_NV, FP_DZ, FP_OF, FP_UF, FP_NX = 0x10, 0x08, 0x04, 0x02, 0x01

F32_QNAN = 0x7FC00000
F64_QNAN = 0x7FF8000000000000
_BOX = 0xFFFFFFFF00000000


class _Fmt(NamedTuple):
    """Constants of one binary format; values are ``mant * 2**exp`` with integer ``mant``."""

    p: int  # precision, hidden bit included
    w1: int  # position of the sign bit
    sign: int  # sign bit
    inf: int  # bits of +inf (also the exponent mask)
    qnan: int  # canonical NaN
    quiet: int  # the quiet bit of a NaN
    frac: int  # fraction mask
    hidden: int  # 1 << (p - 1)
    emin: int  # exponent of the smallest normal, 2**emin
    qmin: int  # exponent of the smallest subnormal's unit, emin - (p - 1)
    qmax: int  # exponent of the largest finite number's unit
    maxf: int  # bits of the largest finite number


def _fmt(ebits: int, p: int) -> _Fmt:
    w1 = ebits + p - 1
    bias = (1 << (ebits - 1)) - 1
    inf = ((1 << ebits) - 1) << (p - 1)
    return _Fmt(
        p=p,
        w1=w1,
        sign=1 << w1,
        inf=inf,
        qnan=inf | 1 << (p - 2),
        quiet=1 << (p - 2),
        frac=(1 << (p - 1)) - 1,
        hidden=1 << (p - 1),
        emin=1 - bias,
        qmin=1 - bias - (p - 1),
        qmax=bias - (p - 1),
        maxf=inf - 1,
    )


_F32 = _fmt(8, 24)
_F64 = _fmt(11, 53)


def fp_rm(rm: int, fcsr: int) -> int:
    """Resolve an instruction's rm field (7 = dynamic, from fcsr.frm); reserved modes trap."""
    if rm == 7:
        rm = (fcsr >> 5) & 7
    if rm > 4:
        raise Trap(ILLEGAL_INSN, None)
    return rm


def fp_box32(v: int) -> int:
    """A single in a 64-bit FP register has its upper 32 bits all ones."""
    return v | _BOX


def fp_unbox32(v: int) -> int:
    """Read a single from a 64-bit FP register: an improperly boxed value is the canonical NaN."""
    return v & 0xFFFFFFFF if v >> 32 == 0xFFFFFFFF else F32_QNAN


# --- rounding -----------------------------------------------------------------------------


def _increment(rm: int, sign: int, sig: int, rem: int, half: int) -> bool:
    """Whether rounding away the nonzero remainder ``rem`` adds one unit to ``sig``."""
    if rm == FP_RNE:
        return rem > half or (rem == half and sig & 1 == 1)
    if rm == FP_RMM:
        return rem >= half
    if rm == FP_RTZ:
        return False
    return (rm == FP_RDN) == (sign == 1)


def _shift_round(mant: int, shift: int, sign: int, rm: int) -> tuple[int, bool]:
    """Round ``mant / 2**shift`` (shift > 0) to an integer; also say whether it was inexact."""
    sig = mant >> shift
    rem = mant & ((1 << shift) - 1)
    if not rem:
        return sig, False
    if _increment(rm, sign, sig, rem, 1 << (shift - 1)):
        sig += 1
    return sig, True


def _overflow(f: _Fmt, sign: int, rm: int) -> tuple[int, int]:
    """Overflow gives infinity or the largest finite number, whichever the mode rounds to."""
    if rm == FP_RNE or rm == FP_RMM:
        to_inf = True
    elif rm == FP_RTZ:
        to_inf = False
    else:
        to_inf = (rm == FP_RDN) == (sign == 1)
    return (sign << f.w1) | (f.inf if to_inf else f.maxf), FP_OF | FP_NX


def _tiny(f: _Fmt, mant: int, top: int, exp: int, sign: int, rm: int) -> bool:
    """Tininess after rounding: would the value, rounded with unbounded exponent, be < 2**emin?

    Only called when the exact value is below 2**emin (``top < emin``).
    """
    if top < f.emin - 1:
        return True
    shift = mant.bit_length() - f.p  # bits below a p-bit significand
    if shift <= 0:
        return True
    sig, _ = _shift_round(mant, shift, sign, rm)
    return sig >> f.p == 0


def _round(f: _Fmt, sign: int, mant: int, exp: int, rm: int) -> tuple[int, int]:
    """Round ``(-1)**sign * mant * 2**exp`` (mant > 0) to format ``f``, once."""
    p = f.p
    top = exp + mant.bit_length() - 1  # exponent of the leading bit
    q = (top if top > f.emin else f.emin) - (p - 1)  # exponent of the result's unit
    shift = q - exp
    flags = 0
    if shift <= 0:
        sig = mant << -shift
    else:
        sig, inexact = _shift_round(mant, shift, sign, rm)
        if inexact:
            flags = FP_NX
            if sig >> p:  # rounded up to the next power of two
                sig >>= 1
                q += 1
            if top < f.emin and _tiny(f, mant, top, exp, sign, rm):
                flags |= FP_UF
    if q > f.qmax:
        return _overflow(f, sign, rm)
    # A normal sig carries the hidden bit, which adds the 1 that the biased exponent needs.
    return (sign << f.w1) | (((q - f.qmin) << (p - 1)) + sig), flags


def _finite(f: _Fmt, a: int) -> tuple[int, int]:
    """Significand and exponent of a finite operand (sign excluded); zero gives mant 0."""
    e = (a & f.inf) >> (f.p - 1)
    m = a & f.frac
    if e:
        return m | f.hidden, e - 1 + f.qmin
    return m, f.qmin


def _nan_flags(f: _Fmt, *ops: int) -> int:
    """NV if any operand is a signalling NaN."""
    for x in ops:
        if x & ~f.sign > f.inf and not x & f.quiet:
            return FP_NV
    return 0


def _is_nan(f: _Fmt, x: int) -> bool:
    return x & ~f.sign > f.inf


# --- arithmetic ---------------------------------------------------------------------------


def _sum(f: _Fmt, sa: int, ma: int, ea: int, sb: int, mb: int, eb: int, rm: int) -> tuple[int, int]:
    """Exact sum of two signed finite values, rounded once (shared by add and fma)."""
    if ea > eb:
        ma <<= ea - eb
        e = eb
    else:
        mb <<= eb - ea
        e = ea
    v = (-ma if sa else ma) + (-mb if sb else mb)
    if v == 0:
        # Exact zero: like-signed zeros keep their sign, anything else is +0 (-0 rounding down).
        sign = sa if sa == sb else int(rm == FP_RDN)
        return sign << f.w1, 0
    if v < 0:
        return _round(f, 1, -v, e, rm)
    return _round(f, 0, v, e, rm)


def _addsub(f: _Fmt, negb: int, a: int, b: int, rm: int) -> tuple[int, int]:
    inf = f.inf
    sa = a >> f.w1
    sb = (b >> f.w1) ^ negb
    if a & inf == inf or b & inf == inf:
        if _is_nan(f, a) or _is_nan(f, b):
            return f.qnan, _nan_flags(f, a, b)
        if a & inf == inf and b & inf == inf and sa != sb:
            return f.qnan, FP_NV
        return (sa << f.w1 | inf, 0) if a & inf == inf else (sb << f.w1 | inf, 0)
    ma, ea = _finite(f, a)
    mb, eb = _finite(f, b)
    return _sum(f, sa, ma, ea, sb, mb, eb, rm)


def _mul(f: _Fmt, a: int, b: int, rm: int) -> tuple[int, int]:
    inf = f.inf
    s = (a ^ b) >> f.w1
    if a & inf == inf or b & inf == inf:
        if _is_nan(f, a) or _is_nan(f, b):
            return f.qnan, _nan_flags(f, a, b)
        if not a & ~f.sign or not b & ~f.sign:
            return f.qnan, FP_NV  # inf * 0
        return s << f.w1 | inf, 0
    ma, ea = _finite(f, a)
    mb, eb = _finite(f, b)
    if not ma or not mb:
        return s << f.w1, 0
    return _round(f, s, ma * mb, ea + eb, rm)


def _div(f: _Fmt, a: int, b: int, rm: int) -> tuple[int, int]:
    inf = f.inf
    s = (a ^ b) >> f.w1
    if a & inf == inf or b & inf == inf:
        if _is_nan(f, a) or _is_nan(f, b):
            return f.qnan, _nan_flags(f, a, b)
        if a & inf == inf:
            return (f.qnan, FP_NV) if b & inf == inf else (s << f.w1 | inf, 0)
        return s << f.w1, 0  # finite / inf
    ma, ea = _finite(f, a)
    mb, eb = _finite(f, b)
    if not mb:
        return (f.qnan, FP_NV) if not ma else (s << f.w1 | inf, FP_DZ)
    if not ma:
        return s << f.w1, 0
    # At least p + 3 quotient bits, then a sticky bit for a nonzero remainder.
    k = max(0, f.p + 3 + mb.bit_length() - ma.bit_length())
    q, r = divmod(ma << k, mb)
    return _round(f, s, (q << 1) | (r != 0), ea - eb - k - 1, rm)


def _sqrt(f: _Fmt, a: int, rm: int) -> tuple[int, int]:
    if _is_nan(f, a):
        return f.qnan, _nan_flags(f, a)
    if not a & ~f.sign:
        return a, 0  # sqrt(-0) = -0
    if a >> f.w1:
        return f.qnan, FP_NV
    if a == f.inf:
        return a, 0
    m, e = _finite(f, a)
    if e & 1:
        m <<= 1
        e -= 1
    # At least p + 3 root bits, then a sticky bit for an inexact root.
    k = max(0, (2 * f.p + 7 - m.bit_length()) // 2)
    n = m << (2 * k)
    r = isqrt(n)
    return _round(f, 0, (r << 1) | (r * r != n), e // 2 - k - 1, rm)


def _fma(f: _Fmt, negp: int, negc: int, a: int, b: int, c: int, rm: int) -> tuple[int, int]:
    """(-1)**negp * a * b + (-1)**negc * c with one rounding."""
    inf = f.inf
    mag_a = a & ~f.sign
    mag_b = b & ~f.sign
    # RISC-V: inf * 0 is invalid even when the addend is a quiet NaN.
    if (mag_a == inf and not mag_b) or (mag_b == inf and not mag_a):
        return f.qnan, FP_NV
    if _is_nan(f, a) or _is_nan(f, b) or _is_nan(f, c):
        return f.qnan, _nan_flags(f, a, b, c)
    sp = ((a ^ b) >> f.w1) ^ negp
    sc = (c >> f.w1) ^ negc
    if mag_a == inf or mag_b == inf:
        if c & inf == inf and sc != sp:
            return f.qnan, FP_NV
        return sp << f.w1 | inf, 0
    if c & inf == inf:
        return sc << f.w1 | inf, 0
    ma, ea = _finite(f, a)
    mb, eb = _finite(f, b)
    mc, ec = _finite(f, c)
    return _sum(f, sp, ma * mb, ea + eb, sc, mc, ec, rm)


# --- comparisons, min/max, classify, sign injection ---------------------------------------


def _total_key(f: _Fmt, a: int) -> int:
    """Order of non-NaN values with -0 below +0."""
    return -(a & ~f.sign) - 1 if a >> f.w1 else a


def _value_key(f: _Fmt, a: int) -> int:
    """Order of non-NaN values with -0 equal to +0."""
    return -(a & ~f.sign) if a >> f.w1 else a


def _minmax(f: _Fmt, want_max: bool, a: int, b: int) -> tuple[int, int]:
    an = _is_nan(f, a)
    bn = _is_nan(f, b)
    if an or bn:
        flags = _nan_flags(f, a, b)
        if an and bn:
            return f.qnan, flags
        return (b if an else a), flags
    a_less = _total_key(f, a) < _total_key(f, b)
    return (b if a_less == want_max else a), 0


def _eq(f: _Fmt, a: int, b: int) -> tuple[int, int]:
    if _is_nan(f, a) or _is_nan(f, b):
        return 0, _nan_flags(f, a, b)
    return int(a == b or not (a | b) & ~f.sign), 0


def _lt(f: _Fmt, a: int, b: int) -> tuple[int, int]:
    if _is_nan(f, a) or _is_nan(f, b):
        return 0, FP_NV
    return int(_value_key(f, a) < _value_key(f, b)), 0


def _le(f: _Fmt, a: int, b: int) -> tuple[int, int]:
    if _is_nan(f, a) or _is_nan(f, b):
        return 0, FP_NV
    return int(_value_key(f, a) <= _value_key(f, b)), 0


def _classify(f: _Fmt, a: int) -> int:
    neg = a >> f.w1
    mag = a & ~f.sign
    if mag > f.inf:
        return 1 << 9 if mag & f.quiet else 1 << 8
    if mag == f.inf:
        return 1 if neg else 1 << 7
    if not mag:
        return 1 << 3 if neg else 1 << 4
    if mag < f.hidden:
        return 1 << 2 if neg else 1 << 5
    return 1 << 1 if neg else 1 << 6


def _sgnj(f: _Fmt, a: int, b: int) -> int:
    return (a & ~f.sign) | (b & f.sign)


def _sgnjn(f: _Fmt, a: int, b: int) -> int:
    return (a & ~f.sign) | (~b & f.sign)


def _sgnjx(f: _Fmt, a: int, b: int) -> int:
    return a ^ (b & f.sign)


# --- conversions --------------------------------------------------------------------------


def _to_int(f: _Fmt, bits: int, signed: bool, a: int, rm: int) -> tuple[int, int]:
    """Round to an integer of ``bits`` bits; RISC-V saturates out-of-range results with NV."""
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    mask = (1 << bits) - 1
    neg = a >> f.w1
    if _is_nan(f, a):
        return hi & mask, FP_NV
    if a & f.inf == f.inf:
        return (lo if neg else hi) & mask, FP_NV
    m, e = _finite(f, a)
    if e >= 0:
        n, inexact = m << e, False
    else:
        n, inexact = _shift_round(m, -e, neg, rm)
    v = -n if neg else n
    if v < lo or v > hi:
        return (lo if neg else hi) & mask, FP_NV
    return v & mask, FP_NX if inexact else 0


def _from_int(f: _Fmt, bits: int, signed: bool, v: int, rm: int) -> tuple[int, int]:
    v &= (1 << bits) - 1
    if signed and v >> (bits - 1):
        return _round(f, 1, (1 << bits) - v, 0, rm)
    if not v:
        return 0, 0
    return _round(f, 0, v, 0, rm)


def _convert(src: _Fmt, dst: _Fmt, a: int, rm: int) -> tuple[int, int]:
    """Between formats; only narrowing can round."""
    if _is_nan(src, a):
        return dst.qnan, _nan_flags(src, a)
    sign = a >> src.w1
    if a & src.inf == src.inf:
        return sign << dst.w1 | dst.inf, 0
    m, e = _finite(src, a)
    if not m:
        return sign << dst.w1, 0
    return _round(dst, sign, m, e, rm)


# --- the public names ---------------------------------------------------------------------

f32_add = partial(_addsub, _F32, 0)
f32_sub = partial(_addsub, _F32, 1)
f32_mul = partial(_mul, _F32)
f32_div = partial(_div, _F32)
f32_sqrt = partial(_sqrt, _F32)
f32_fmadd = partial(_fma, _F32, 0, 0)
f32_fmsub = partial(_fma, _F32, 0, 1)
f32_fnmsub = partial(_fma, _F32, 1, 0)
f32_fnmadd = partial(_fma, _F32, 1, 1)
f32_min = partial(_minmax, _F32, False)
f32_max = partial(_minmax, _F32, True)
f32_eq = partial(_eq, _F32)
f32_lt = partial(_lt, _F32)
f32_le = partial(_le, _F32)
f32_classify = partial(_classify, _F32)
f32_sgnj = partial(_sgnj, _F32)
f32_sgnjn = partial(_sgnjn, _F32)
f32_sgnjx = partial(_sgnjx, _F32)
f32_to_i32 = partial(_to_int, _F32, 32, True)
f32_to_u32 = partial(_to_int, _F32, 32, False)
f32_to_i64 = partial(_to_int, _F32, 64, True)
f32_to_u64 = partial(_to_int, _F32, 64, False)
f32_from_i32 = partial(_from_int, _F32, 32, True)
f32_from_u32 = partial(_from_int, _F32, 32, False)
f32_from_i64 = partial(_from_int, _F32, 64, True)
f32_from_u64 = partial(_from_int, _F32, 64, False)

f64_add = partial(_addsub, _F64, 0)
f64_sub = partial(_addsub, _F64, 1)
f64_mul = partial(_mul, _F64)
f64_div = partial(_div, _F64)
f64_sqrt = partial(_sqrt, _F64)
f64_fmadd = partial(_fma, _F64, 0, 0)
f64_fmsub = partial(_fma, _F64, 0, 1)
f64_fnmsub = partial(_fma, _F64, 1, 0)
f64_fnmadd = partial(_fma, _F64, 1, 1)
f64_min = partial(_minmax, _F64, False)
f64_max = partial(_minmax, _F64, True)
f64_eq = partial(_eq, _F64)
f64_lt = partial(_lt, _F64)
f64_le = partial(_le, _F64)
f64_classify = partial(_classify, _F64)
f64_sgnj = partial(_sgnj, _F64)
f64_sgnjn = partial(_sgnjn, _F64)
f64_sgnjx = partial(_sgnjx, _F64)
f64_to_i32 = partial(_to_int, _F64, 32, True)
f64_to_u32 = partial(_to_int, _F64, 32, False)
f64_to_i64 = partial(_to_int, _F64, 64, True)
f64_to_u64 = partial(_to_int, _F64, 64, False)
f64_from_i32 = partial(_from_int, _F64, 32, True)
f64_from_u32 = partial(_from_int, _F64, 32, False)
f64_from_i64 = partial(_from_int, _F64, 64, True)
f64_from_u64 = partial(_from_int, _F64, 64, False)


def f32_to_f64(a: int) -> tuple[int, int]:
    """Widening is exact; only a signalling NaN raises a flag."""
    return _convert(_F32, _F64, a, FP_RNE)


f64_to_f32 = partial(_convert, _F64, _F32)

__all__ = [
    "F32_QNAN",
    "F64_QNAN",
    "FP_DZ",
    "FP_NV",
    "FP_NX",
    "FP_OF",
    "FP_RDN",
    "FP_RMM",
    "FP_RNE",
    "FP_RTZ",
    "FP_RUP",
    "FP_UF",
    "fp_box32",
    "fp_rm",
    "fp_unbox32",
    *(n for n in dict(globals()) if n.startswith(("f32_", "f64_"))),
]
