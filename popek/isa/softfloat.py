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
from types import SimpleNamespace

from popek.cpu.causes import ILLEGAL_INSN, Trap

FP_RNE, FP_RTZ, FP_RDN, FP_RUP, FP_RMM = 0, 1, 2, 3, 4
FP_NV, FP_DZ, FP_OF, FP_UF, FP_NX = 0x10, 0x08, 0x04, 0x02, 0x01

F32_QNAN = 0x7FC00000
F64_QNAN = 0x7FF8000000000000
_BOX = 0xFFFFFFFF00000000


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


def _binary_format(ebits: int, p: int) -> SimpleNamespace:
    """The operations of one binary format.

    The format's constants are closure cells rather than attributes because these are
    the emulator's hot paths. A finite operand unpacks to ``(mant, exp)`` with value
    ``mant * 2**exp``: exponent field ``e`` gives ``exp = max(e, 1) + e0``, and the hidden
    bit is set when ``e`` is nonzero.
    """
    w1 = ebits + p - 1  # position of the sign bit
    sign_bit = 1 << w1
    abs_mask = sign_bit - 1
    inf = ((1 << ebits) - 1) << (p - 1)  # also the exponent mask
    maxf = inf - 1
    quiet = 1 << (p - 2)
    qnan = inf | quiet
    frac = (1 << (p - 1)) - 1
    hidden = 1 << (p - 1)
    pm1 = p - 1
    bias = (1 << (ebits - 1)) - 1
    emin = 1 - bias  # the smallest normal is 2**emin
    qmin = emin - pm1  # exponent of a subnormal's unit
    e0 = qmin - 1  # exp = max(e, 1) + e0 for exponent field e
    qmax = bias - pm1  # exponent of the largest finite number's unit

    def is_nan(x: int) -> bool:
        return x & abs_mask > inf

    def nan_flags(*ops: int) -> int:
        """NV if any operand is a signalling NaN."""
        for x in ops:
            if x & abs_mask > inf and not x & quiet:
                return FP_NV
        return 0

    def finite(a: int) -> tuple[int, int]:
        e = a & inf
        return (a & frac) | (hidden if e else 0), ((e >> pm1) or 1) + e0

    def overflow(sign: int, rm: int) -> tuple[int, int]:
        """Infinity or the largest finite number, whichever the mode rounds to."""
        if rm == FP_RNE or rm == FP_RMM:
            to_inf = True
        elif rm == FP_RTZ:
            to_inf = False
        else:
            to_inf = (rm == FP_RDN) == (sign == 1)
        return (sign << w1) | (inf if to_inf else maxf), FP_OF | FP_NX

    def tiny(sign: int, mant: int, top: int, rm: int) -> bool:
        """Tininess after rounding, for an exact value below 2**emin (``top < emin``):
        rounded to p bits with an unbounded exponent, is it still below 2**emin?"""
        if top < emin - 1:
            return True
        shift = mant.bit_length() - p
        if shift <= 0:
            return True
        return _shift_round(mant, shift, sign, rm)[0] >> p == 0

    def round_(sign: int, mant: int, exp: int, rm: int) -> tuple[int, int]:
        """Round ``(-1)**sign * mant * 2**exp`` (mant > 0) to this format, once."""
        top = exp + mant.bit_length() - 1  # exponent of the leading bit
        q = (top if top > emin else emin) - pm1  # exponent of the result's unit
        shift = q - exp
        flags = 0
        if shift <= 0:
            sig = mant << -shift
        else:
            sig = mant >> shift
            rem = mant & ((1 << shift) - 1)
            if rem:
                flags = FP_NX
                half = 1 << (shift - 1)
                if rm == FP_RNE:  # the common case, decided inline
                    up = rem > half or (rem == half and sig & 1 == 1)
                else:
                    up = _increment(rm, sign, sig, rem, half)
                if up:
                    sig += 1
                    if sig >> p:  # carried into the next power of two
                        sig >>= 1
                        q += 1
                if top < emin and tiny(sign, mant, top, rm):
                    flags |= FP_UF
        if q > qmax:
            return overflow(sign, rm)
        # A normal sig carries the hidden bit, which adds the 1 the biased exponent needs.
        return (sign << w1) | (((q - qmin) << pm1) + sig), flags

    def sum_(sa: int, ma: int, ea: int, sb: int, mb: int, eb: int, rm: int) -> tuple[int, int]:
        """Exact sum of two signed finite values, rounded once (add and fma)."""
        if ea > eb:
            ma <<= ea - eb
            ea = eb
        else:
            mb <<= eb - ea
        v = (-ma if sa else ma) + (-mb if sb else mb)
        if v > 0:
            return round_(0, v, ea, rm)
        if v < 0:
            return round_(1, -v, ea, rm)
        # Exact zero: like-signed zeros keep their sign, anything else is +0 (-0 rounding down).
        return (sa if sa == sb else int(rm == FP_RDN)) << w1, 0

    def add(a: int, b: int, rm: int) -> tuple[int, int]:
        ea = a & inf
        eb = b & inf
        if ea == inf or eb == inf:
            if is_nan(a) or is_nan(b):
                return qnan, nan_flags(a, b)
            if ea == eb and (a ^ b) >> w1:
                return qnan, FP_NV  # inf - inf
            return (a if ea == inf else b), 0
        ma = (a & frac) | (hidden if ea else 0)
        mb = (b & frac) | (hidden if eb else 0)
        return sum_(a >> w1, ma, ((ea >> pm1) or 1) + e0, b >> w1, mb, ((eb >> pm1) or 1) + e0, rm)

    def sub(a: int, b: int, rm: int) -> tuple[int, int]:
        return add(a, b ^ sign_bit, rm)

    def mul(a: int, b: int, rm: int) -> tuple[int, int]:
        s = (a ^ b) >> w1
        ea = a & inf
        eb = b & inf
        if ea == inf or eb == inf:
            if is_nan(a) or is_nan(b):
                return qnan, nan_flags(a, b)
            if not a & abs_mask or not b & abs_mask:
                return qnan, FP_NV  # inf * 0
            return s << w1 | inf, 0
        ma = (a & frac) | (hidden if ea else 0)
        mb = (b & frac) | (hidden if eb else 0)
        if not ma or not mb:
            return s << w1, 0
        return round_(s, ma * mb, ((ea >> pm1) or 1) + ((eb >> pm1) or 1) + 2 * e0, rm)

    def div(a: int, b: int, rm: int) -> tuple[int, int]:
        s = (a ^ b) >> w1
        ea = a & inf
        eb = b & inf
        if ea == inf or eb == inf:
            if is_nan(a) or is_nan(b):
                return qnan, nan_flags(a, b)
            if ea != inf:
                return s << w1, 0  # finite / inf
            return (qnan, FP_NV) if eb == inf else (s << w1 | inf, 0)
        ma = (a & frac) | (hidden if ea else 0)
        mb = (b & frac) | (hidden if eb else 0)
        if not mb:
            return (qnan, FP_NV) if not ma else (s << w1 | inf, FP_DZ)
        if not ma:
            return s << w1, 0
        # At least p + 3 quotient bits, then a sticky bit for a nonzero remainder.
        k = max(0, p + 3 + mb.bit_length() - ma.bit_length())
        q, r = divmod(ma << k, mb)
        exp = ((ea >> pm1) or 1) - ((eb >> pm1) or 1) - k - 1
        return round_(s, (q << 1) | (r != 0), exp, rm)

    def sqrt(a: int, rm: int) -> tuple[int, int]:
        if is_nan(a):
            return qnan, nan_flags(a)
        if not a & abs_mask or a == inf:
            return a, 0  # sqrt(-0) is -0
        if a >> w1:
            return qnan, FP_NV
        m, e = finite(a)
        if e & 1:
            m <<= 1
            e -= 1
        # At least p + 3 root bits, then a sticky bit for an inexact root.
        k = max(0, (2 * p + 7 - m.bit_length()) // 2)
        n = m << (2 * k)
        r = isqrt(n)
        return round_(0, (r << 1) | (r * r != n), e // 2 - k - 1, rm)

    def fma(negp: int, negc: int, a: int, b: int, c: int, rm: int) -> tuple[int, int]:
        """(-1)**negp * a * b + (-1)**negc * c with one rounding."""
        ea = a & inf
        eb = b & inf
        ec = c & inf
        if ea == inf or eb == inf or ec == inf:
            # RISC-V: inf * 0 is invalid even when the addend is a quiet NaN.
            if (a & abs_mask == inf and not b & abs_mask) or (
                b & abs_mask == inf and not a & abs_mask
            ):
                return qnan, FP_NV
            if is_nan(a) or is_nan(b) or is_nan(c):
                return qnan, nan_flags(a, b, c)
            sp = ((a ^ b) >> w1) ^ negp
            sc = (c >> w1) ^ negc
            if ea == inf or eb == inf:
                if ec == inf and sc != sp:
                    return qnan, FP_NV
                return sp << w1 | inf, 0
            return sc << w1 | inf, 0
        ma = (a & frac) | (hidden if ea else 0)
        mb = (b & frac) | (hidden if eb else 0)
        mc = (c & frac) | (hidden if ec else 0)
        ep = ((ea >> pm1) or 1) + ((eb >> pm1) or 1) + 2 * e0
        sp = ((a ^ b) >> w1) ^ negp
        return sum_(sp, ma * mb, ep, (c >> w1) ^ negc, mc, ((ec >> pm1) or 1) + e0, rm)

    def total_key(a: int) -> int:
        """Order of non-NaN values with -0 below +0."""
        return -(a & abs_mask) - 1 if a >> w1 else a

    def value_key(a: int) -> int:
        """Order of non-NaN values with -0 equal to +0."""
        return -(a & abs_mask) if a >> w1 else a

    def minmax(want_max: bool, a: int, b: int) -> tuple[int, int]:
        an = is_nan(a)
        bn = is_nan(b)
        if an or bn:
            if an and bn:
                return qnan, nan_flags(a, b)
            return (b if an else a), nan_flags(a, b)
        a_less = total_key(a) < total_key(b)
        return (b if a_less == want_max else a), 0

    def eq(a: int, b: int) -> tuple[int, int]:
        if is_nan(a) or is_nan(b):
            return 0, nan_flags(a, b)
        return int(a == b or not (a | b) & abs_mask), 0

    def lt(a: int, b: int) -> tuple[int, int]:
        if is_nan(a) or is_nan(b):
            return 0, FP_NV
        return int(value_key(a) < value_key(b)), 0

    def le(a: int, b: int) -> tuple[int, int]:
        if is_nan(a) or is_nan(b):
            return 0, FP_NV
        return int(value_key(a) <= value_key(b)), 0

    def classify(a: int) -> int:
        neg = a >> w1
        mag = a & abs_mask
        if mag > inf:
            return 1 << 9 if mag & quiet else 1 << 8
        if mag == inf:
            return 1 if neg else 1 << 7
        if not mag:
            return 1 << 3 if neg else 1 << 4
        if mag < hidden:
            return 1 << 2 if neg else 1 << 5
        return 1 << 1 if neg else 1 << 6

    def sgnj(a: int, b: int) -> int:
        return (a & abs_mask) | (b & sign_bit)

    def sgnjn(a: int, b: int) -> int:
        return (a & abs_mask) | (~b & sign_bit)

    def sgnjx(a: int, b: int) -> int:
        return a ^ (b & sign_bit)

    def to_int(bits: int, signed: bool, a: int, rm: int) -> tuple[int, int]:
        """Round to an integer of ``bits`` bits; out of range saturates with NV."""
        lo = -(1 << (bits - 1)) if signed else 0
        hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        mask = (1 << bits) - 1
        neg = a >> w1
        if is_nan(a):
            return hi & mask, FP_NV
        if a & inf == inf:
            return (lo if neg else hi) & mask, FP_NV
        m, e = finite(a)
        if e >= 0:
            n, inexact = m << e, False
        else:
            n, inexact = _shift_round(m, -e, neg, rm)
        v = -n if neg else n
        if v < lo or v > hi:
            return (lo if neg else hi) & mask, FP_NV
        return v & mask, FP_NX if inexact else 0

    def from_int(bits: int, signed: bool, v: int, rm: int) -> tuple[int, int]:
        v &= (1 << bits) - 1
        if signed and v >> (bits - 1):
            return round_(1, (1 << bits) - v, 0, rm)
        if not v:
            return 0, 0
        return round_(0, v, 0, rm)

    def convert_to(dst: SimpleNamespace, a: int, rm: int) -> tuple[int, int]:
        """To another format; only narrowing can round."""
        if is_nan(a):
            return dst.qnan, nan_flags(a)
        sign = a >> w1
        if a & inf == inf:
            return sign << dst.w1 | dst.inf, 0
        m, e = finite(a)
        if not m:
            return sign << dst.w1, 0
        return dst.round(sign, m, e, rm)

    return SimpleNamespace(
        w1=w1, inf=inf, qnan=qnan, round=round_, add=add, sub=sub, mul=mul, div=div, sqrt=sqrt,
        fmadd=partial(fma, 0, 0), fmsub=partial(fma, 0, 1), fnmsub=partial(fma, 1, 0),
        fnmadd=partial(fma, 1, 1), min=partial(minmax, False), max=partial(minmax, True),
        eq=eq, lt=lt, le=le, classify=classify, sgnj=sgnj, sgnjn=sgnjn, sgnjx=sgnjx,
        to_i32=partial(to_int, 32, True), to_u32=partial(to_int, 32, False),
        to_i64=partial(to_int, 64, True), to_u64=partial(to_int, 64, False),
        from_i32=partial(from_int, 32, True), from_u32=partial(from_int, 32, False),
        from_i64=partial(from_int, 64, True), from_u64=partial(from_int, 64, False),
        convert_to=convert_to,
    )  # fmt: skip


_S = _binary_format(8, 24)
_D = _binary_format(11, 53)

f32_add, f64_add = _S.add, _D.add
f32_sub, f64_sub = _S.sub, _D.sub
f32_mul, f64_mul = _S.mul, _D.mul
f32_div, f64_div = _S.div, _D.div
f32_sqrt, f64_sqrt = _S.sqrt, _D.sqrt
f32_fmadd, f64_fmadd = _S.fmadd, _D.fmadd
f32_fmsub, f64_fmsub = _S.fmsub, _D.fmsub
f32_fnmsub, f64_fnmsub = _S.fnmsub, _D.fnmsub
f32_fnmadd, f64_fnmadd = _S.fnmadd, _D.fnmadd
f32_min, f64_min = _S.min, _D.min
f32_max, f64_max = _S.max, _D.max
f32_eq, f64_eq = _S.eq, _D.eq
f32_lt, f64_lt = _S.lt, _D.lt
f32_le, f64_le = _S.le, _D.le
f32_classify, f64_classify = _S.classify, _D.classify
f32_sgnj, f64_sgnj = _S.sgnj, _D.sgnj
f32_sgnjn, f64_sgnjn = _S.sgnjn, _D.sgnjn
f32_sgnjx, f64_sgnjx = _S.sgnjx, _D.sgnjx
f32_to_i32, f64_to_i32 = _S.to_i32, _D.to_i32
f32_to_u32, f64_to_u32 = _S.to_u32, _D.to_u32
f32_to_i64, f64_to_i64 = _S.to_i64, _D.to_i64
f32_to_u64, f64_to_u64 = _S.to_u64, _D.to_u64
f32_from_i32, f64_from_i32 = _S.from_i32, _D.from_i32
f32_from_u32, f64_from_u32 = _S.from_u32, _D.from_u32
f32_from_i64, f64_from_i64 = _S.from_i64, _D.from_i64
f32_from_u64, f64_from_u64 = _S.from_u64, _D.from_u64


def f32_to_f64(a: int) -> tuple[int, int]:
    """Widening is exact; only a signalling NaN raises a flag."""
    return _S.convert_to(_D, a, FP_RNE)


def f64_to_f32(a: int, rm: int) -> tuple[int, int]:
    return _D.convert_to(_S, a, rm)


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
    *(name for name in tuple(globals()) if name.startswith(("f32_", "f64_"))),
]
