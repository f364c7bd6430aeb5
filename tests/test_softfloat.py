"""softfloat against hand-derived IEEE 754 / RISC-V results and against the host FPU.

The hand-derived cases pin the behaviour a host FPU cannot show (rounding modes,
flags, tininess after rounding, RISC-V NaN and saturation rules); the randomized
cases compare round-to-nearest-even results with the host, whose binary64 arithmetic
is IEEE-exact, and check flags against exact rational arithmetic.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from fractions import Fraction

import pytest

from popek.cpu.causes import ILLEGAL_INSN, Trap
from popek.isa import softfloat as sf
from popek.isa.softfloat import (
    F32_QNAN,
    F64_QNAN,
    FP_DZ,
    FP_NV,
    FP_NX,
    FP_OF,
    FP_RDN,
    FP_RMM,
    FP_RNE,
    FP_RTZ,
    FP_RUP,
    FP_UF,
)

ALL_RM = (FP_RNE, FP_RTZ, FP_RDN, FP_RUP, FP_RMM)


def d(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def f(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def from_d(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def from_f(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


D_MAX = 0x7FEFFFFFFFFFFFFF
D_INF = 0x7FF0000000000000
D_MIN_NORMAL = 0x0010000000000000
D_MAX_SUB = 0x000FFFFFFFFFFFFF
D_SNAN = 0x7FF0000000000001
D_QNAN_PAYLOAD = 0xFFF8000000000123
S_MAX = 0x7F7FFFFF
S_INF = 0x7F800000
S_MIN_NORMAL = 0x00800000
S_SNAN = 0x7F800001
NEG64 = 1 << 63
NEG32 = 1 << 31


# --- rounding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rm", "expected"),
    [
        (FP_RNE, 1.0),  # tie goes to the even significand
        (FP_RTZ, 1.0),
        (FP_RDN, 1.0),
        (FP_RUP, 1.0 + 2**-52),
        (FP_RMM, 1.0 + 2**-52),  # tie goes away from zero
    ],
)
def test_halfway_case_rounds_per_mode(rm: int, expected: float) -> None:
    assert sf.f64_add(d(1.0), d(2**-53), rm) == (d(expected), FP_NX)


@pytest.mark.parametrize(
    ("rm", "expected"),
    [
        (FP_RNE, -1.0),
        (FP_RTZ, -1.0),
        (FP_RDN, -(1.0 + 2**-52)),
        (FP_RUP, -1.0),
        (FP_RMM, -(1.0 + 2**-52)),
    ],
)
def test_negative_halfway_case_rounds_per_mode(rm: int, expected: float) -> None:
    assert sf.f64_sub(d(-1.0), d(2**-53), rm) == (d(expected), FP_NX)


def test_tie_with_odd_significand_rounds_up_to_even() -> None:
    assert sf.f64_add(d(1 + 2**-52), d(2**-53), FP_RNE) == (d(1 + 2**-51), FP_NX)
    assert sf.f32_add(f(1 + 2**-23), f(2**-24), FP_RNE) == (f(1 + 2**-22), FP_NX)
    assert sf.f32_add(f(1 + 2**-23), f(2**-24), FP_RTZ) == (f(1 + 2**-23), FP_NX)


def test_exact_results_raise_no_flags() -> None:
    assert sf.f64_add(d(1.5), d(2.25), FP_RUP) == (d(3.75), 0)
    assert sf.f32_mul(f(3.0), f(-0.5), FP_RDN) == (f(-1.5), 0)
    assert sf.f64_div(d(1.0), d(4.0), FP_RTZ) == (d(0.25), 0)
    assert sf.f64_sqrt(d(9.0), FP_RMM) == (d(3.0), 0)


def test_division_and_sqrt_round_in_each_direction() -> None:
    third_down = d(1 / 3)  # 1/3 RNE happens to round down
    assert sf.f64_div(d(1.0), d(3.0), FP_RNE) == (third_down, FP_NX)
    assert sf.f64_div(d(1.0), d(3.0), FP_RTZ) == (third_down, FP_NX)
    assert sf.f64_div(d(1.0), d(3.0), FP_RUP) == (third_down + 1, FP_NX)
    assert sf.f64_div(d(-1.0), d(3.0), FP_RDN) == (NEG64 | (third_down + 1), FP_NX)
    root2 = d(math.sqrt(2.0))  # rounds up under RNE
    assert sf.f64_sqrt(d(2.0), FP_RDN) == (root2 - 1, FP_NX)
    assert sf.f64_sqrt(d(2.0), FP_RUP) == (root2, FP_NX)


# --- overflow -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rm", "positive", "negative"),
    [
        (FP_RNE, D_INF, NEG64 | D_INF),
        (FP_RTZ, D_MAX, NEG64 | D_MAX),
        (FP_RDN, D_MAX, NEG64 | D_INF),
        (FP_RUP, D_INF, NEG64 | D_MAX),
        (FP_RMM, D_INF, NEG64 | D_INF),
    ],
)
def test_overflow_gives_inf_or_max_finite_per_mode(rm: int, positive: int, negative: int) -> None:
    assert sf.f64_mul(D_MAX, d(2.0), rm) == (positive, FP_OF | FP_NX)
    assert sf.f64_mul(D_MAX, d(-2.0), rm) == (negative, FP_OF | FP_NX)
    s_pos = S_INF if positive == D_INF else S_MAX
    assert sf.f32_add(S_MAX, S_MAX, rm) == (s_pos, FP_OF | FP_NX)


def test_rounding_up_past_max_finite_overflows() -> None:
    # MAX has an odd significand, so adding exactly half its ulp (2**970) ties upward.
    assert sf.f64_add(D_MAX, d(2.0**970), FP_RNE) == (D_INF, FP_OF | FP_NX)
    assert sf.f64_add(D_MAX, d(2.0**970), FP_RTZ) == (D_MAX, FP_NX)
    assert sf.f64_add(D_MAX, d(2.0**969), FP_RNE) == (D_MAX, FP_NX)


def test_narrowing_overflow_and_infinity() -> None:
    assert sf.f64_to_f32(d(1e300), FP_RNE) == (S_INF, FP_OF | FP_NX)
    assert sf.f64_to_f32(d(-1e300), FP_RTZ) == (NEG32 | S_MAX, FP_OF | FP_NX)
    assert sf.f64_to_f32(NEG64 | D_INF, FP_RTZ) == (NEG32 | S_INF, 0)


# --- underflow: tininess is detected after rounding -------------------------------------


def test_tiny_before_but_not_after_rounding_raises_only_inexact() -> None:
    # 31 * 1162219258676257 * 2**-1077 = 2**-1022 - 2**-1077: below the smallest normal, but
    # rounding to 53 bits with unbounded exponent gives 2**-1022, so it is not tiny.
    a, b = d(31 * 2.0**-600), d(1162219258676257 * 2.0**-477)
    assert 31 * 1162219258676257 == 2**55 - 1
    assert sf.f64_mul(a, b, FP_RNE) == (D_MIN_NORMAL, FP_NX)
    assert sf.f64_mul(a, b, FP_RUP) == (D_MIN_NORMAL, FP_NX)
    # Rounding toward zero stays below 2**-1022 either way: tiny.
    assert sf.f64_mul(a, b, FP_RTZ) == (D_MAX_SUB, FP_UF | FP_NX)
    # binary32: 2**-126 - 2**-151 is a tie at 24 bits that rounds up to 2**-126.
    a32, b32 = f(18631 * 2.0**-75), f(1801 * 2.0**-76)
    assert 18631 * 1801 == 2**25 - 1
    assert sf.f32_mul(a32, b32, FP_RNE) == (S_MIN_NORMAL, FP_NX)
    assert sf.f32_mul(a32, b32, FP_RTZ) == (S_MIN_NORMAL - 1, FP_UF | FP_NX)


def test_tiny_after_rounding_raises_underflow_even_if_result_is_normal() -> None:
    # (1 - 2**-53) * 2**-1022 = 2**-1022 - 2**-1075: exactly representable with 53 bits and
    # an unbounded exponent, so tiny; the subnormal grid rounds it (a tie) up to 2**-1022.
    a, b = d(1 - 2**-53), D_MIN_NORMAL
    assert sf.f64_mul(a, b, FP_RNE) == (D_MIN_NORMAL, FP_UF | FP_NX)
    assert sf.f64_mul(a, b, FP_RMM) == (D_MIN_NORMAL, FP_UF | FP_NX)
    assert sf.f64_mul(a, b, FP_RUP) == (D_MIN_NORMAL, FP_UF | FP_NX)
    assert sf.f64_mul(a, b, FP_RDN) == (D_MAX_SUB, FP_UF | FP_NX)


def test_subnormal_results() -> None:
    assert sf.f64_mul(1, d(2.0), FP_RNE) == (2, 0)  # exact subnormal: no underflow
    assert sf.f64_sub(D_MIN_NORMAL, 1, FP_RNE) == (D_MAX_SUB, 0)
    # Half the smallest subnormal: a tie between 0 (even) and 2**-1074.
    assert sf.f64_div(1, d(2.0), FP_RNE) == (0, FP_UF | FP_NX)
    assert sf.f64_div(1, d(2.0), FP_RMM) == (1, FP_UF | FP_NX)
    assert sf.f64_div(1, d(-2.0), FP_RDN) == (NEG64 | 1, FP_UF | FP_NX)
    assert sf.f64_div(1, d(-2.0), FP_RUP) == (NEG64, FP_UF | FP_NX)
    assert sf.f32_mul(1, f(0.75), FP_RNE) == (1, FP_UF | FP_NX)
    assert sf.f64_to_f32(d(2.0**-149 * 0.25), FP_RNE) == (0, FP_UF | FP_NX)
    assert sf.f32_to_f64(1) == (d(2.0**-149), 0)  # widening makes subnormals normal
    assert sf.f64_sqrt(1, FP_RNE) == (d(2.0**-537), 0)


# --- signed zeros and special operands ---------------------------------------------------


def test_exact_zero_sum_is_positive_except_when_rounding_down() -> None:
    assert sf.f64_sub(d(1.5), d(1.5), FP_RNE) == (0, 0)
    assert sf.f64_sub(d(1.5), d(1.5), FP_RDN) == (NEG64, 0)
    assert sf.f64_add(NEG64, 0, FP_RNE) == (0, 0)
    assert sf.f64_add(NEG64, 0, FP_RDN) == (NEG64, 0)
    assert sf.f64_add(NEG64, NEG64, FP_RNE) == (NEG64, 0)
    assert sf.f32_sub(NEG32, 0, FP_RUP) == (NEG32, 0)


def test_invalid_operations_give_canonical_nan() -> None:
    assert sf.f64_sub(D_INF, D_INF, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_mul(D_INF, NEG64, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_div(0, NEG64, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_div(D_INF, D_INF, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_sqrt(d(-1.0), FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_sqrt(NEG64 | D_INF, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f32_sqrt(f(-2.0), FP_RNE) == (F32_QNAN, FP_NV)


def test_division_by_zero_and_infinities() -> None:
    assert sf.f64_div(d(1.0), 0, FP_RNE) == (D_INF, FP_DZ)
    assert sf.f64_div(d(1.0), NEG64, FP_RNE) == (NEG64 | D_INF, FP_DZ)
    assert sf.f64_div(D_INF, 0, FP_RNE) == (D_INF, 0)
    assert sf.f64_div(d(-1.0), D_INF, FP_RNE) == (NEG64, 0)
    assert sf.f64_add(D_INF, d(-1e308), FP_RNE) == (D_INF, 0)
    assert sf.f64_sqrt(D_INF, FP_RNE) == (D_INF, 0)
    assert sf.f64_sqrt(NEG64, FP_RNE) == (NEG64, 0)


def test_nan_operands_give_canonical_nan_and_only_signalling_ones_raise_nv() -> None:
    assert sf.f64_add(D_QNAN_PAYLOAD, d(1.0), FP_RNE) == (F64_QNAN, 0)
    assert sf.f64_add(d(1.0), D_SNAN, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_mul(D_SNAN, D_INF, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f32_div(0x7FC12345, f(1.0), FP_RNE) == (F32_QNAN, 0)
    assert sf.f32_sqrt(S_SNAN, FP_RNE) == (F32_QNAN, FP_NV)
    assert sf.f64_to_f32(D_SNAN, FP_RNE) == (F32_QNAN, FP_NV)
    assert sf.f64_to_f32(D_QNAN_PAYLOAD, FP_RNE) == (F32_QNAN, 0)
    assert sf.f32_to_f64(0xFFC00001) == (F64_QNAN, 0)
    assert sf.f32_to_f64(S_SNAN) == (F64_QNAN, FP_NV)


# --- fused multiply-add: one rounding ------------------------------------------------------


def test_fma_keeps_the_product_bits_a_separate_multiply_would_round_away() -> None:
    a = d(1 + 2**-30)  # a*a = 1 + 2**-29 + 2**-60 exactly
    assert sf.f64_fmadd(a, a, d(-(1 + 2**-29)), FP_RNE) == (d(2.0**-60), 0)
    assert sf.f64_fmsub(a, a, d(1 + 2**-29), FP_RNE) == (d(2.0**-60), 0)
    assert sf.f64_fnmsub(a, a, d(1 + 2**-29), FP_RNE) == (d(-(2.0**-60)), 0)
    assert sf.f64_fnmadd(a, a, d(-(1 + 2**-29)), FP_RNE) == (d(-(2.0**-60)), 0)
    # The unfused computation loses it entirely.
    product, _ = sf.f64_mul(a, a, FP_RNE)
    assert sf.f64_add(product, d(-(1 + 2**-29)), FP_RNE) == (0, 0)
    a32 = f(1 + 2**-12)
    assert sf.f32_fmadd(a32, a32, f(-(1 + 2**-11)), FP_RNE) == (f(2.0**-24), 0)


def test_fma_addend_breaks_a_product_tie() -> None:
    # (1 + 2**-26)(1 + 2**-27) = 1 + 3*2**-27 + 2**-53: alone a tie that rounds to even
    # (down); a tiny addend lifts it above the tie, so the single rounding goes up.
    a, b = d(1 + 2**-26), d(1 + 2**-27)
    base = 1 + 3 * 2**-27
    assert sf.f64_mul(a, b, FP_RNE) == (d(base), FP_NX)
    assert sf.f64_fmadd(a, b, d(2.0**-80), FP_RNE) == (d(base + 2**-52), FP_NX)
    assert sf.f64_fmsub(a, b, d(2.0**-80), FP_RNE) == (d(base), FP_NX)


def test_fma_special_cases() -> None:
    # RISC-V: inf * 0 is invalid even when the addend is a quiet NaN.
    assert sf.f64_fmadd(D_INF, 0, F64_QNAN, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f32_fnmadd(0, NEG32 | S_INF, F32_QNAN, FP_RNE) == (F32_QNAN, FP_NV)
    assert sf.f64_fmadd(D_QNAN_PAYLOAD, d(1.0), d(1.0), FP_RNE) == (F64_QNAN, 0)
    assert sf.f64_fmadd(d(1.0), d(1.0), D_SNAN, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_fmadd(D_INF, d(1.0), NEG64 | D_INF, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_fmsub(D_INF, d(1.0), D_INF, FP_RNE) == (F64_QNAN, FP_NV)
    assert sf.f64_fmadd(D_INF, d(-1.0), NEG64 | D_INF, FP_RNE) == (NEG64 | D_INF, 0)
    assert sf.f64_fmadd(d(1.0), d(1.0), NEG64 | D_INF, FP_RNE) == (NEG64 | D_INF, 0)
    # Overflow of the product is not an intermediate event: only the final sum rounds.
    assert sf.f64_fmadd(D_MAX, d(2.0), NEG64 | D_MAX, FP_RNE) == (D_MAX, 0)


def test_fma_zero_signs() -> None:
    assert sf.f64_fmadd(0, d(-1.0), 0, FP_RNE) == (0, 0)  # -0 + +0
    assert sf.f64_fmadd(0, d(-1.0), 0, FP_RDN) == (NEG64, 0)
    assert sf.f64_fmadd(0, d(-1.0), NEG64, FP_RNE) == (NEG64, 0)  # -0 + -0
    assert sf.f64_fnmadd(0, d(1.0), 0, FP_RNE) == (NEG64, 0)  # -(+0) - (+0)
    assert sf.f64_fmadd(d(1.0), d(1.0), d(-1.0), FP_RNE) == (0, 0)
    assert sf.f64_fmadd(d(1.0), d(1.0), d(-1.0), FP_RDN) == (NEG64, 0)


# --- min/max, comparisons, classify, sign injection ---------------------------------------


def test_min_max_order_negative_zero_below_positive_zero() -> None:
    for a, b in ((0, NEG64), (NEG64, 0)):
        assert sf.f64_min(a, b) == (NEG64, 0)
        assert sf.f64_max(a, b) == (0, 0)
    assert sf.f32_min(NEG32, 0) == (NEG32, 0)
    assert sf.f32_max(NEG32, 0) == (0, 0)
    assert sf.f64_min(d(-3.0), d(2.0)) == (d(-3.0), 0)
    assert sf.f64_max(NEG64 | D_INF, d(-1e300)) == (d(-1e300), 0)


def test_min_max_with_nans() -> None:
    assert sf.f64_min(D_QNAN_PAYLOAD, d(1.0)) == (d(1.0), 0)
    assert sf.f64_max(d(1.0), D_QNAN_PAYLOAD) == (d(1.0), 0)
    assert sf.f64_min(D_SNAN, d(1.0)) == (d(1.0), FP_NV)
    assert sf.f32_max(f(2.0), S_SNAN) == (f(2.0), FP_NV)
    assert sf.f64_min(D_QNAN_PAYLOAD, D_QNAN_PAYLOAD) == (F64_QNAN, 0)
    assert sf.f64_max(D_SNAN, D_QNAN_PAYLOAD) == (F64_QNAN, FP_NV)


def test_comparisons() -> None:
    assert sf.f64_eq(0, NEG64) == (1, 0)
    assert sf.f64_lt(NEG64, 0) == (0, 0)
    assert sf.f64_le(NEG64, 0) == (1, 0)
    assert sf.f64_lt(d(-2.0), d(-1.0)) == (1, 0)
    assert sf.f64_le(d(-1.0), d(-2.0)) == (0, 0)
    assert sf.f32_lt(f(1.0), S_INF) == (1, 0)
    assert sf.f32_eq(f(1.5), f(1.5)) == (1, 0)


def test_eq_is_quiet_but_lt_le_signal_on_any_nan() -> None:
    assert sf.f64_eq(F64_QNAN, F64_QNAN) == (0, 0)
    assert sf.f64_eq(D_SNAN, d(1.0)) == (0, FP_NV)
    assert sf.f64_lt(F64_QNAN, d(1.0)) == (0, FP_NV)
    assert sf.f64_le(d(1.0), F64_QNAN) == (0, FP_NV)
    assert sf.f32_eq(F32_QNAN, f(1.0)) == (0, 0)
    assert sf.f32_le(S_SNAN, S_SNAN) == (0, FP_NV)


@pytest.mark.parametrize(
    ("bits64", "bits32", "mask"),
    [
        (NEG64 | D_INF, NEG32 | S_INF, 1 << 0),
        (d(-1.0), f(-1.0), 1 << 1),
        (NEG64 | 1, NEG32 | 1, 1 << 2),
        (NEG64, NEG32, 1 << 3),
        (0, 0, 1 << 4),
        (D_MAX_SUB, S_MIN_NORMAL - 1, 1 << 5),
        (D_MIN_NORMAL, S_MIN_NORMAL, 1 << 6),
        (D_INF, S_INF, 1 << 7),
        (D_SNAN, S_SNAN, 1 << 8),
        (NEG64 | D_SNAN, NEG32 | S_SNAN, 1 << 8),
        (F64_QNAN, F32_QNAN, 1 << 9),
        (D_QNAN_PAYLOAD, 0xFFC00001, 1 << 9),
    ],
)
def test_classify(bits64: int, bits32: int, mask: int) -> None:
    assert sf.f64_classify(bits64) == mask
    assert sf.f32_classify(bits32) == mask


def test_sign_injection_copies_bits_even_of_nans() -> None:
    assert sf.f64_sgnj(d(1.0), d(-5.0)) == d(-1.0)
    assert sf.f64_sgnjn(d(1.0), d(-5.0)) == d(1.0)
    assert sf.f64_sgnjx(d(-1.0), d(-5.0)) == d(1.0)
    assert sf.f64_sgnjn(D_SNAN, D_SNAN) == NEG64 | D_SNAN  # fneg keeps a signalling NaN
    assert sf.f32_sgnjx(f(-2.0), f(3.0)) == f(-2.0)
    assert sf.f32_sgnj(S_SNAN, NEG32) == NEG32 | S_SNAN


# --- conversions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rm", "pos", "neg"),
    [
        (FP_RNE, 2, -2),
        (FP_RTZ, 2, -2),
        (FP_RDN, 2, -3),
        (FP_RUP, 3, -2),
        (FP_RMM, 3, -3),
    ],
)
def test_float_to_int_rounds_per_mode(rm: int, pos: int, neg: int) -> None:
    assert sf.f64_to_i32(d(2.5), rm) == (pos, FP_NX)
    assert sf.f64_to_i32(d(-2.5), rm) == (neg & 0xFFFFFFFF, FP_NX)
    assert sf.f32_to_i64(f(-2.5), rm) == (neg & (2**64 - 1), FP_NX)


def test_float_to_int_saturates_with_invalid() -> None:
    assert sf.f64_to_i32(F64_QNAN, FP_RNE) == (0x7FFFFFFF, FP_NV)
    assert sf.f64_to_i32(NEG64 | F64_QNAN, FP_RNE) == (0x7FFFFFFF, FP_NV)  # sign ignored
    assert sf.f64_to_i32(D_INF, FP_RNE) == (0x7FFFFFFF, FP_NV)
    assert sf.f64_to_i32(NEG64 | D_INF, FP_RNE) == (0x80000000, FP_NV)
    assert sf.f64_to_i32(d(2.0**31), FP_RTZ) == (0x7FFFFFFF, FP_NV)
    # Range is judged after rounding: 2**31 - 0.5 rounds (to even) out of range...
    assert sf.f64_to_i32(d(2.0**31 - 0.5), FP_RNE) == (0x7FFFFFFF, FP_NV)
    assert sf.f64_to_i32(d(2.0**31 - 0.5), FP_RTZ) == (0x7FFFFFFF, FP_NX)
    # ...and -2**31 - 0.5 rounds (to even) onto the bound.
    assert sf.f64_to_i32(d(-(2.0**31) - 0.5), FP_RNE) == (0x80000000, FP_NX)
    assert sf.f64_to_i32(d(-(2.0**31) - 0.5), FP_RDN) == (0x80000000, FP_NV)
    assert sf.f64_to_u32(d(-1.0), FP_RNE) == (0, FP_NV)
    assert sf.f64_to_u32(d(-0.5), FP_RNE) == (0, FP_NX)  # rounds to -0: in range
    assert sf.f64_to_u32(d(-0.5), FP_RDN) == (0, FP_NV)
    assert sf.f64_to_u32(NEG64, FP_RNE) == (0, 0)
    assert sf.f64_to_u32(d(4294967295.0), FP_RNE) == (0xFFFFFFFF, 0)
    assert sf.f64_to_u32(d(4294967296.0), FP_RNE) == (0xFFFFFFFF, FP_NV)
    assert sf.f64_to_u64(F64_QNAN, FP_RNE) == (2**64 - 1, FP_NV)
    assert sf.f64_to_u64(d(2.0**64), FP_RNE) == (2**64 - 1, FP_NV)
    assert sf.f64_to_i64(d(-(2.0**63)), FP_RNE) == (1 << 63, 0)
    assert sf.f64_to_i64(d(2.0**63), FP_RNE) == (2**63 - 1, FP_NV)
    assert sf.f64_to_i64(D_MAX, FP_RNE) == (2**63 - 1, FP_NV)
    assert sf.f32_to_u64(f(-(2.0**70)), FP_RNE) == (0, FP_NV)
    assert sf.f32_to_i32(S_SNAN, FP_RNE) == (0x7FFFFFFF, FP_NV)
    assert sf.f32_to_i64(1, FP_RUP) == (1, FP_NX)  # the smallest subnormal rounds up to 1


def test_int_to_float() -> None:
    assert sf.f64_from_i64(2**53 + 1, FP_RNE) == (d(2.0**53), FP_NX)
    assert sf.f64_from_i64(2**53 + 1, FP_RUP) == (d(2.0**53 + 2), FP_NX)
    assert sf.f64_from_i64(-(2**53) - 1 & (2**64 - 1), FP_RDN) == (d(-(2.0**53) - 2), FP_NX)
    assert sf.f64_from_u64(2**64 - 1, FP_RNE) == (d(2.0**64), FP_NX)
    assert sf.f64_from_u64(2**64 - 1, FP_RTZ) == (d(2.0**64 - 2048), FP_NX)
    assert sf.f64_from_i64(1 << 63, FP_RNE) == (d(-(2.0**63)), 0)
    assert sf.f64_from_i32(0xFFFFFFFF, FP_RNE) == (d(-1.0), 0)
    assert sf.f64_from_i32(0x1234_FFFFFFFF, FP_RNE) == (d(-1.0), 0)  # only the low 32 bits
    assert sf.f64_from_u32(0xFFFFFFFF, FP_RNE) == (d(4294967295.0), 0)
    assert sf.f32_from_i32(2**24 + 1, FP_RNE) == (f(2.0**24), FP_NX)
    assert sf.f32_from_i32(2**24 + 3, FP_RNE) == (f(2.0**24 + 4), FP_NX)
    assert sf.f32_from_u64(0, FP_RNE) == (0, 0)
    assert sf.f32_from_i64(2**64 - 1, FP_RNE) == (f(-1.0), 0)


def test_between_precisions() -> None:
    assert sf.f64_to_f32(d(1 + 2**-24), FP_RNE) == (f(1.0), FP_NX)
    assert sf.f64_to_f32(d(1 + 2**-24), FP_RUP) == (f(1 + 2**-23), FP_NX)
    assert sf.f64_to_f32(d(-(1 + 2**-24)), FP_RMM) == (f(-(1 + 2**-23)), FP_NX)
    assert sf.f64_to_f32(d(0.1), FP_RNE) == (f(0.1), FP_NX)
    assert sf.f64_to_f32(NEG64, FP_RNE) == (NEG32, 0)
    assert sf.f32_to_f64(f(0.1)) == (d(from_f(f(0.1))), 0)
    assert sf.f32_to_f64(NEG32 | S_INF) == (NEG64 | D_INF, 0)


# --- instruction-side helpers -------------------------------------------------------------


def test_rounding_mode_resolution() -> None:
    for rm in ALL_RM:
        assert sf.fp_rm(rm, 0) == rm
        assert sf.fp_rm(7, rm << 5 | 0x1F) == rm
    for bad_static in (5, 6):
        with pytest.raises(Trap) as info:
            sf.fp_rm(bad_static, 0)
        assert (info.value.cause, info.value.tval) == (ILLEGAL_INSN, None)
    for bad_frm in (5, 6, 7):
        with pytest.raises(Trap):
            sf.fp_rm(7, bad_frm << 5)


def test_nan_boxing() -> None:
    assert sf.fp_box32(f(1.0)) == 0xFFFFFFFF_3F800000
    assert sf.fp_unbox32(0xFFFFFFFF_3F800000) == f(1.0)
    assert sf.fp_unbox32(0x3FF0000000000000) == F32_QNAN
    assert sf.fp_unbox32(0xFFFFFFFE_3F800000) == F32_QNAN


def test_public_names_are_prefixed_for_the_semantics_namespace() -> None:
    for name in sf.__all__:
        assert name.lower().startswith(("f32_", "f64_", "fp_")), name
        assert hasattr(sf, name)


# --- randomized cross-check with the host FPU (round to nearest even) --------------------


def _operand(rng: random.Random, width: int) -> int:
    """Bit patterns weighted toward the interesting places: edges, near ties, specials."""
    p = 24 if width == 32 else 53
    ebits = width - p
    sign = rng.getrandbits(1) << (width - 1)
    pick = rng.random()
    if pick < 0.1:
        inf = ((1 << ebits) - 1) << (p - 1)
        specials = [
            0,
            1,
            (1 << (p - 1)) - 1,
            1 << (p - 1),
            inf,
            inf - 1,
            inf | 1,
            inf | 1 << (p - 2),
        ]
        return sign | rng.choice(specials)
    if pick < 0.5:
        bias = (1 << (ebits - 1)) - 1
        exp = rng.choice(
            [
                rng.randint(0, 2),
                rng.randint((1 << ebits) - 4, (1 << ebits) - 2),
                rng.randint(bias - 2 * p, bias + 2 * p),
            ]
        )
        frac = rng.getrandbits(p - 1) & ~((1 << rng.randint(0, p - 1)) - 1)  # few low bits set
        return sign | (exp << (p - 1)) | frac
    return rng.getrandbits(width)


def _exact(width: int, bits: int) -> Fraction:
    p = 24 if width == 32 else 53
    mag = bits & ((1 << (width - 1)) - 1)
    exp, frac = mag >> (p - 1), mag & ((1 << (p - 1)) - 1)
    bias = (1 << (width - p - 1)) - 1
    value = Fraction(frac if exp == 0 else frac | 1 << (p - 1)) * Fraction(2) ** (
        max(exp, 1) - bias - (p - 1)
    )
    return -value if bits >> (width - 1) else value


def _tiny_rne(width: int, x: Fraction) -> bool:
    """IEEE tininess after rounding: |x| rounded to p bits, exponent unbounded, < 2**emin."""
    p, emin = (24, -126) if width == 32 else (53, -1022)
    x = abs(x)
    if x == 0 or x >= Fraction(2) ** emin:
        return False
    top = math.floor(math.log2(x.numerator) - math.log2(x.denominator))
    while Fraction(2) ** (top + 1) <= x:
        top += 1
    while Fraction(2) ** top > x:
        top -= 1
    ulp = Fraction(2) ** (top - (p - 1))
    return round(x / ulp) * ulp < Fraction(2) ** emin  # round() ties to even


def _host_result(width: int, op: str, a: float, b: float) -> float:
    """The host's binary64 result; binary32 rounds it again, which is innocuous for
    +, -, *, / and sqrt because 53 >= 2 * 24 + 2."""
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "mul":
        return a * b
    if op == "div":
        if b == 0:
            return (
                math.nan
                if a == 0 or math.isnan(a)
                else math.copysign(math.inf, a) * (math.copysign(1.0, b))
            )
        return a / b
    return math.sqrt(a) if a >= 0 or math.isnan(a) else math.nan


def _to_bits(width: int, x: float) -> int:
    if width == 64:
        return d(x)
    try:
        return f(x)
    except OverflowError:  # struct refuses to round a finite double to binary32 infinity
        return f(math.copysign(math.inf, x))


@pytest.mark.parametrize("width", [32, 64])
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "sqrt"])
def test_round_to_nearest_even_matches_host_fpu(width: int, op: str) -> None:
    rng = random.Random(f"{op}{width}")
    fn = getattr(sf, f"f{width}_{op}")
    decode = from_f if width == 32 else from_d
    qnan = F32_QNAN if width == 32 else F64_QNAN
    quiet = 1 << (22 if width == 32 else 51)
    for _ in range(1500):
        a, b = _operand(rng, width), _operand(rng, width)
        bits, flags = fn(a, FP_RNE) if op == "sqrt" else fn(a, b, FP_RNE)
        host = _host_result(width, op, decode(a), decode(b))
        operands = (a,) if op == "sqrt" else (a, b)
        nans = [x for x in operands if math.isnan(decode(x))]
        if math.isnan(host):
            assert bits == qnan, (hex(a), hex(b))
            signalling = any(not x & quiet for x in nans)
            assert flags == (FP_NV if signalling or not nans else 0), (hex(a), hex(b))
            continue
        assert bits == _to_bits(width, host), (hex(a), hex(b))
        if any(math.isinf(decode(x)) for x in operands) or (op == "div" and decode(b) == 0):
            expected = FP_DZ if op == "div" and decode(b) == 0 and not math.isinf(decode(a)) else 0
            assert flags == expected, (hex(a), hex(b))
            continue
        result = decode(bits)
        if math.isinf(result):
            assert flags == FP_OF | FP_NX, (hex(a), hex(b))
            continue
        x, y = _exact(width, a), _exact(width, b)
        exact = {"add": x + y, "sub": x - y, "mul": x * y, "div": x / y if y else 0}.get(op)
        if op == "sqrt":
            r = Fraction(result)
            inexact = r * r != x
            tiny = False  # a root of a finite binary32/64 number is never tiny
        else:
            inexact = Fraction(result) != exact
            tiny = _tiny_rne(width, exact)
        expected = (FP_NX if inexact else 0) | (FP_UF if inexact and tiny else 0)
        assert flags == expected, (hex(a), hex(b))


# --- every rounding mode against QEMU's softfloat (through unicorn) ----------------------

_OP_FP = 0b1010011
_R4_OPCODES = {"fmadd": 0b1000011, "fmsub": 0b1000111, "fnmsub": 0b1001011, "fnmadd": 0b1001111}
_ARITH = {"add": 0b00000, "sub": 0b00001, "mul": 0b00010, "div": 0b00011}
_INT_TYPES = ("i32", "u32", "i64", "u64")  # in rs2-selector order


def _op_fp(funct5: int, fmt: int, rs2: int, rm: int, rs1: int = 1) -> int:
    """An OP-FP instruction writing register 3."""
    return funct5 << 27 | fmt << 25 | rs2 << 20 | rs1 << 15 | rm << 12 | 3 << 7 | _OP_FP


def _sext32(v: int) -> int:
    return ((v ^ 0x80000000) - 0x80000000) & (2**64 - 1)


def _unicorn_runner() -> Callable[[int, tuple[int, int, int], int], tuple[int, int, int]]:
    unicorn = pytest.importorskip("unicorn")
    from unicorn import riscv_const as rv

    uc = unicorn.Uc(unicorn.UC_ARCH_RISCV, unicorn.UC_MODE_RISCV64)
    uc.mem_map(0x1000, 0x1000)
    uc.reg_write(rv.UC_RISCV_REG_MSTATUS, uc.reg_read(rv.UC_RISCV_REG_MSTATUS) | 3 << 13)

    def run(word: int, fregs: tuple[int, int, int], x5: int) -> tuple[int, int, int]:
        """Execute ``word`` with f1, f2, f4 = fregs and x5; return (f3, x3, fflags)."""
        uc.mem_write(0x1000, struct.pack("<I", word))
        for reg, value in zip((1, 2, 4), fregs, strict=True):
            uc.reg_write(rv.UC_RISCV_REG_F0 + reg, value)
        uc.reg_write(rv.UC_RISCV_REG_X5, x5)
        uc.reg_write(rv.UC_RISCV_REG_FCSR, 0)
        uc.emu_start(0x1000, 0x1004, count=1)
        return (
            uc.reg_read(rv.UC_RISCV_REG_F3),
            uc.reg_read(rv.UC_RISCV_REG_X3),
            uc.reg_read(rv.UC_RISCV_REG_FFLAGS),
        )

    return run


def test_all_rounding_modes_and_flags_match_qemu() -> None:
    """unicorn is QEMU 5: it NaN-boxes nothing, so only the low 32 bits of a single count;
    and it misses NV for inf * 0 + qNaN, which the RISC-V spec requires, so that is skipped."""
    run = _unicorn_runner()
    rng = random.Random(2024)
    for _ in range(600):
        width = rng.choice((32, 64))
        fmt, box = (0, 0xFFFFFFFF00000000) if width == 32 else (1, 0)
        a, b, c = (_operand(rng, width) for _ in range(3))
        ops = {n[4:]: getattr(sf, n) for n in sf.__all__ if n.startswith(f"f{width}_")}
        if rng.random() < 0.3:  # near-cancellation of a*b and c exercises the fused sum
            c = ops["mul"](a, b, rng.randrange(5))[0] ^ (1 << (width - 1))
        rm = rng.randrange(5)
        x5 = rng.choice((rng.getrandbits(64), rng.getrandbits(rng.randint(1, 64))))
        # (instruction, expected (bits, flags), where the result lands: "f", "x")
        cases = [(_op_fp(f5, fmt, 2, rm), ops[n](a, b, rm), "f") for n, f5 in _ARITH.items()]
        cases.append((_op_fp(0b01011, fmt, 0, rm), ops["sqrt"](a, rm), "f"))
        inf = 0x7F800000 if width == 32 else 0x7FF0000000000000
        if {v & ~(1 << (width - 1)) for v in (a, b)} != {0, inf}:
            for name, opcode in _R4_OPCODES.items():
                word = 4 << 27 | fmt << 25 | 2 << 20 | 1 << 15 | rm << 12 | 3 << 7 | opcode
                cases.append((word, ops[name](a, b, c, rm), "f"))
        for sel, ty in enumerate(_INT_TYPES):
            bits, flags = ops[f"to_{ty}"](a, rm)
            if ty.endswith("32"):
                bits = _sext32(bits)  # RV64 sign-extends every 32-bit result
            cases.append((_op_fp(0b11000, fmt, sel, rm), (bits, flags), "x"))
            cases.append((_op_fp(0b11010, fmt, sel, rm, rs1=5), ops[f"from_{ty}"](x5, rm), "f"))
        if width == 64:
            cases.append((_op_fp(0b01000, 0, 1, rm), sf.f64_to_f32(a, rm), "f32"))
        else:
            cases.append((_op_fp(0b01000, 1, 0, rm), sf.f32_to_f64(a), "f64"))
        for word, expected, where in cases:
            f3, x3, fflags = run(word, (a | box, b | box, c | box), x5)
            got = {"x": x3, "f64": f3, "f32": f3 & 0xFFFFFFFF}.get(where, f3 & (2**width - 1))
            assert (got, fflags) == expected, (hex(word), hex(x5), [hex(v) for v in (a, b, c)])
