"""Softfloat's helpers as the host's IEEE arithmetic, for the native tiers (x86-64 SSE).

RISC-V's F and D results are IEEE 754's, which SSE computes too, but for three rules:
any NaN result is the canonical NaN, fflags accrue what softfloat reports, and the
rounding mode is the instruction's. So each operation is one piece of inline assembly
that saves MXCSR, loads one with every exception masked, no flush-to-zero and the
mode's rounding control, runs the SSE instruction, reads the flags it raised and puts
the saved MXCSR back: Python's own floats never see another MXCSR (inline assembly
with side effects is neither moved nor merged by LLVM). SSE detects tininess after
rounding and, with underflow masked, raises UE only for an inexact tiny result, as
RISC-V does, so its flags map one to one onto fflags (DE, a subnormal operand, aside).
Values stay integers outside the assembly, which moves them to and from XMM registers
itself: LLVM sees no floating point to rearrange. Around the instruction: NaN results
become the canonical NaN, and float-to-integer conversions saturate as RISC-V says (SSE
returns the "integer indefinite").
Comparisons, min/max, classify and sign injection are integer operations on the bits,
as softfloat's are, and need no MXCSR.

Fused multiply-add is the FMA3 instruction, where the host has it (:data:`FEATURES`
names what the native code assumes, for the caches' versions).

RMM (round to nearest, ties away) has no SSE rounding control: :data:`HELPERS` take a
mode in RNE..RUP, and the lowering hands an instruction in RMM to its Python handler.
Only x86-64 hosts (:data:`HOST`) have these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from popek.engine import irtext as ir
from popek.isa.softfloat import F32_QNAN, F64_QNAN, FP_NV

HOST = os.uname().machine in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    """The first CPU's feature flags, as Linux lists them (none known elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FMA = HOST and "fma" in _cpu_flags()
FEATURES = "fma" if FMA else ""  # what native FP code needs beyond x86-64's SSE2
I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
MXCSR_MASKED = 0x1F80  # every exception masked, round to nearest, no FTZ or DAZ
RC_SHIFT = 13
RC_OF_RM = 0x9C  # SSE's rounding control for RNE, RTZ, RDN, RUP: 0, 3, 1, 2 (2 bits each)
# Where the inline assembly keeps MXCSR: below the 128-byte red zone, whatever the
# surrounding code keeps there, and above the stack pointer, so a signal cannot clobber it.
SCRATCH = 144


def _k(value: int, width: int = 64) -> ir.Constant:
    """An integer constant, spelled as LLVM reads it (signed)."""
    value &= (1 << width) - 1
    return ir.Constant(ir.IntType(width), value - (1 << width) if value >> (width - 1) else value)


@dataclass(frozen=True)
class Format:
    """A binary format as SSE and its bits see it."""

    bits: int
    suffix: str  # SSE's: ss or sd
    p: int  # significand bits, with the hidden one

    @property
    def sign(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def abs_mask(self) -> int:
        return self.sign - 1

    @property
    def inf(self) -> int:
        return self.abs_mask & ~((1 << (self.p - 1)) - 1)

    @property
    def quiet(self) -> int:
        return 1 << (self.p - 2)

    @property
    def qnan(self) -> int:
        return F32_QNAN if self.bits == 32 else F64_QNAN

    @property
    def hidden(self) -> int:
        return 1 << (self.p - 1)

    def power(self, n: int) -> int:
        """The bits of 2**n (a normal number)."""
        return (n + (1 << (self.bits - self.p - 1)) - 1) << (self.p - 1)


F32 = Format(32, "ss", 24)
F64 = Format(64, "sd", 53)


# -- bits ---------------------------------------------------------------------------------

def _and(b: ir.IRBuilder, v: ir.Value, mask: int) -> ir.Value:
    return b.and_(v, _k(mask))


def _is_nan(b: ir.IRBuilder, f: Format, v: ir.Value) -> ir.Value:
    return b.icmp_unsigned(">", _and(b, v, f.abs_mask), _k(f.inf))


def _is_snan(b: ir.IRBuilder, f: Format, v: ir.Value) -> ir.Value:
    return b.and_(_is_nan(b, f, v), b.icmp_unsigned("==", _and(b, v, f.quiet), _k(0)))


def _negative(b: ir.IRBuilder, f: Format, v: ir.Value) -> ir.Value:
    return b.icmp_unsigned("!=", _and(b, v, f.sign), _k(0))


def _canonical(b: ir.IRBuilder, f: Format, v: ir.Value) -> ir.Value:
    return b.select(_is_nan(b, f, v), _k(f.qnan), v)


def _nan_flags(b: ir.IRBuilder, f: Format, *ops: ir.Value) -> ir.Value:
    """NV if any operand is a signalling NaN."""
    snan = _is_snan(b, f, ops[0])
    for v in ops[1:]:
        snan = b.or_(snan, _is_snan(b, f, v))
    return b.select(snan, _k(FP_NV), _k(0))


def _narrow(b: ir.IRBuilder, f: Format, v: ir.Value) -> ir.Value:
    """An operand's bits as wide as the format (what the assembly moves to an XMM)."""
    return v if f.bits == 64 else b.trunc(v, I32)


def _wide(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return v if v.type.width == 64 else b.zext(v, I64)


# -- one SSE instruction under a rounding mode --------------------------------------------

def _mxcsr(b: ir.IRBuilder, rm: ir.Value | None) -> ir.Value:
    """The MXCSR an operation runs under: masked, with rounding mode ``rm`` (RNE..RUP;
    None: an exact operation, RNE)."""
    if rm is None:
        return ir.Constant(I32, MXCSR_MASKED)
    rc = _and(b, b.lshr(_k(RC_OF_RM), b.shl(rm, _k(1))), 3)
    return b.trunc(b.or_(b.shl(rc, _k(RC_SHIFT)), _k(MXCSR_MASKED)), I32)


def _fflags(b: ir.IRBuilder, raised: ir.Value) -> ir.Value:
    """fflags from MXCSR's flags: IE ZE OE UE PE (bits 0, 2-5) are NV DZ OF UF NX (4-0)."""
    m = b.zext(raised, I64)
    parts = (b.shl(_and(b, m, 1), _k(4)), b.shl(_and(b, m, 4), _k(1)),
             b.lshr(_and(b, m, 8), _k(1)), b.lshr(_and(b, m, 16), _k(3)),
             b.lshr(_and(b, m, 32), _k(5)))
    flags = parts[0]
    for part in parts[1:]:
        flags = b.or_(flags, part)
    return flags


def _under_mode(b: ir.IRBuilder, body: tuple[str, ...], out: ir.IntType,
                inputs: list[ir.Value], rm: ir.Value | None) -> tuple[ir.Value, ir.Value]:
    """Run ``body`` (SSE code on %xmm0-%xmm2; operands ``$0`` the result, of type
    ``out``, and ``$2``... the integer ``inputs``, all in general registers) under
    rounding mode ``rm``, MXCSR saved and restored around it: its result, and the
    fflags it raised."""
    ctl = f"${2 + len(inputs)}"
    template = "\n".join((
        f"lea -{SCRATCH}(%rsp), %rsp", "stmxcsr 8(%rsp)", f"movl {ctl}, (%rsp)",
        "ldmxcsr (%rsp)", *body, "stmxcsr (%rsp)", "ldmxcsr 8(%rsp)", "movl (%rsp), $1",
        f"lea {SCRATCH}(%rsp), %rsp"))
    constraints = ",".join(("=r", "=r", *("r" for _ in inputs), "r", "~{xmm0}", "~{xmm1}",
                            "~{xmm2}", "~{dirflag}", "~{fpsr}", "~{flags}"))
    pair = ir.Type(f"{{ {out}, i32 }}")
    result = b.asm(pair, template, constraints, [*inputs, _mxcsr(b, rm)])
    raised = b.extract_value(result, 1, I32)
    return b.extract_value(result, 0, out), _fflags(b, raised)


def _move(f: Format) -> str:
    """SSE's move between a general register and an XMM for the format's bits."""
    return "movd" if f.bits == 32 else "movq"


def _float_type(f: Format) -> ir.IntType:
    return I32 if f.bits == 32 else I64


# -- the helpers --------------------------------------------------------------------------

Emit = Callable[[ir.IRBuilder, list[ir.Value], ir.Value | None], list[ir.Value]]


@dataclass(frozen=True)
class Helper:
    """A softfloat helper's native form: ``emit(b, operands, rm)``, operands as i64
    values, ``rm`` the rounding mode (RNE..RUP) if the helper takes one (its last
    argument); it returns i64 values in the intervals ``results``."""

    emit: Emit
    operands: int
    rounds: bool
    results: tuple[tuple[int, int], ...]


def _arithmetic(f: Format, op: str) -> Emit:
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        mov = _move(f)
        body = (f"{mov} $2, %xmm0", f"{mov} $3, %xmm1", f"{op}{f.suffix} %xmm1, %xmm0",
                f"{mov} %xmm0, $0")
        r, flags = _under_mode(b, body, _float_type(f), [_narrow(b, f, v) for v in ops], rm)
        return [_canonical(b, f, _wide(b, r)), flags]
    return emit


def _sqrt(f: Format) -> Emit:
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        mov = _move(f)
        body = (f"{mov} $2, %xmm0", f"sqrt{f.suffix} %xmm0, %xmm0", f"{mov} %xmm0, $0")
        r, flags = _under_mode(b, body, _float_type(f), [_narrow(b, f, ops[0])], rm)
        return [_canonical(b, f, _wide(b, r)), flags]
    return emit


def _fused(f: Format, negate_product: bool, negate_addend: bool) -> Emit:
    """(-1)**negate_product * a * b + (-1)**negate_addend * c, rounded once (negating an
    operand's sign bit negates exactly, NaNs included)."""
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        x, y, z = ops
        if negate_product:
            x = b.xor(x, _k(f.sign))
        if negate_addend:
            z = b.xor(z, _k(f.sign))
        mov = _move(f)
        body = (f"{mov} $2, %xmm0", f"{mov} $3, %xmm1", f"{mov} $4, %xmm2",
                f"vfmadd231{f.suffix} %xmm1, %xmm0, %xmm2", f"{mov} %xmm2, $0")
        r, flags = _under_mode(b, body, _float_type(f), [_narrow(b, f, v) for v in (x, y, z)],
                               rm)
        # RISC-V: infinity times zero is invalid even when the addend is a quiet NaN.
        mag_x, mag_y = _and(b, x, f.abs_mask), _and(b, y, f.abs_mask)
        inf_zero = b.or_(
            b.and_(b.icmp_unsigned("==", mag_x, _k(f.inf)), b.icmp_unsigned("==", mag_y, _k(0))),
            b.and_(b.icmp_unsigned("==", mag_y, _k(f.inf)), b.icmp_unsigned("==", mag_x, _k(0))))
        result = b.select(inf_zero, _k(f.qnan), _canonical(b, f, _wide(b, r)))
        return [result, b.select(inf_zero, _k(FP_NV), flags)]
    return emit


def _to_int(f: Format, bits: int, signed: bool) -> Emit:
    """Round to an integer of ``bits`` bits: SSE's 64-bit conversion, then RISC-V's
    saturation (NaN to the largest value, out of range to the nearer bound, NV alone)."""
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    mask = (1 << bits) - 1

    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        a = ops[0]
        body = (f"{_move(f)} $2, %xmm0", f"cvt{f.suffix}2si %xmm0, $0")
        r, flags = _under_mode(b, body, I64, [_narrow(b, f, a)], rm)
        bad = b.icmp_unsigned("!=", _and(b, flags, FP_NV), _k(0))  # NaN or beyond 64 bits
        bad = b.or_(bad, b.icmp_signed("<", r, _k(lo)))
        if hi < 1 << 63:
            bad = b.or_(bad, b.icmp_signed(">", r, _k(hi)))
        bound = b.select(b.and_(_negative(b, f, a), b.xor(_is_nan(b, f, a), ir.Constant(I1, 1))),
                         _k(lo & mask), _k(hi & mask))
        result = b.select(bad, bound, _and(b, r, mask))
        flags = b.select(bad, _k(FP_NV), flags)
        if bits == 64 and not signed:
            # [2**63, 2**64) is beyond SSE's signed conversion; all of it is integers, exact.
            big = b.and_(b.icmp_unsigned(">=", a, _k(f.power(63))),
                         b.icmp_unsigned("<", a, _k(f.power(64))))
            exact = b.shl(b.or_(_and(b, a, f.hidden - 1), _k(f.hidden)), _k(63 - (f.p - 1)))
            result = b.select(big, exact, result)
            flags = b.select(big, _k(0), flags)
        return [result, flags]
    return emit


def _from_int(f: Format, bits: int, signed: bool) -> Emit:
    """Convert the low ``bits`` bits of an integer register, rounded in the mode."""
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        v = ops[0]
        if bits == 32:
            v = (b.sext if signed else b.zext)(b.trunc(v, I32), I64)
        top = None
        if bits == 64 and not signed:
            # Above 2**63: half of it, the dropped bit kept as a sticky bit (the rounding
            # point lies far above it, so the rounding and its flags are the same), doubled.
            top = b.icmp_signed("<", v, _k(0))
            v = b.select(top, b.or_(b.lshr(v, _k(1)), _and(b, v, 1)), v)
        body = (f"cvtsi2{f.suffix}q $2, %xmm0", f"{_move(f)} %xmm0, $0")
        r, flags = _under_mode(b, body, _float_type(f), [v], rm)
        out = _wide(b, r)
        if top is not None:
            out = b.select(top, b.add(out, _k(f.hidden)), out)
        return [out, flags]
    return emit


def _convert(src: Format, dst: Format) -> Emit:
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        body = (f"{_move(src)} $2, %xmm0", f"cvt{src.suffix}2{dst.suffix} %xmm0, %xmm0",
                f"{_move(dst)} %xmm0, $0")
        r, flags = _under_mode(b, body, _float_type(dst), [_narrow(b, src, ops[0])], rm)
        return [_canonical(b, dst, _wide(b, r)), flags]
    return emit


def _sign_injection(f: Format, kind: str) -> Emit:
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        a, c = ops
        if kind == "x":
            return [b.xor(a, _and(b, c, f.sign))]
        sign = _and(b, c if kind == "" else b.not_(c), f.sign)
        return [b.or_(_and(b, a, f.abs_mask), sign)]
    return emit


def _key(b: ir.IRBuilder, f: Format, v: ir.Value, total: bool) -> ir.Value:
    """A signed integer ordered as the non-NaN value ``v``: with -0 below +0 if ``total``,
    equal to it otherwise."""
    mag = _and(b, v, f.abs_mask)
    neg = b.sub(_k(-1 if total else 0), mag)
    return b.select(_negative(b, f, v), neg, mag)


def _compare(f: Format, op: str) -> Emit:
    """eq (quiet: NV only for a signalling NaN), lt and le (NV for any NaN)."""
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        a, c = ops
        nan = b.or_(_is_nan(b, f, a), _is_nan(b, f, c))
        if op == "eq":
            zeros = b.icmp_unsigned("==", _and(b, b.or_(a, c), f.abs_mask), _k(0))
            holds = b.or_(b.icmp_unsigned("==", a, c), zeros)
            flags = _nan_flags(b, f, a, c)
        else:
            holds = b.icmp_signed("<" if op == "lt" else "<=", _key(b, f, a, False),
                                  _key(b, f, c, False))
            flags = _k(FP_NV)
        return [b.select(nan, _k(0), b.zext(holds, I64)), b.select(nan, flags, _k(0))]
    return emit


def _min_max(f: Format, want_max: bool) -> Emit:
    """-0 below +0; a lone NaN gives the other operand, two give the canonical NaN."""
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        a, c = ops
        a_nan, c_nan = _is_nan(b, f, a), _is_nan(b, f, c)
        a_less = b.icmp_signed("<", _key(b, f, a, True), _key(b, f, c, True))
        ordered = b.select(a_less, c, a) if want_max else b.select(a_less, a, c)
        one_nan = b.select(a_nan, c, a)
        result = b.select(b.or_(a_nan, c_nan),
                          b.select(b.and_(a_nan, c_nan), _k(f.qnan), one_nan), ordered)
        return [result, _nan_flags(b, f, a, c)]
    return emit


def _classify(f: Format) -> Emit:
    def emit(b: ir.IRBuilder, ops: list[ir.Value], rm: ir.Value | None) -> list[ir.Value]:
        a = ops[0]
        neg = _negative(b, f, a)
        mag = _and(b, a, f.abs_mask)

        def by_sign(negative: int, positive: int) -> ir.Value:
            return b.select(neg, _k(1 << negative), _k(1 << positive))

        quiet = b.icmp_unsigned("!=", _and(b, a, f.quiet), _k(0))
        out = by_sign(1, 6)  # normal
        for test, value in (
                (b.icmp_unsigned("<", mag, _k(f.hidden)), by_sign(2, 5)),  # subnormal
                (b.icmp_unsigned("==", mag, _k(0)), by_sign(3, 4)),
                (b.icmp_unsigned("==", mag, _k(f.inf)), by_sign(0, 7)),
                (b.icmp_unsigned(">", mag, _k(f.inf)),
                 b.select(quiet, _k(1 << 9), _k(1 << 8)))):
            out = b.select(test, value, out)
        return [out]
    return emit


def _helpers() -> dict[str, Helper]:
    table: dict[str, Helper] = {}
    flags = (0, 31)
    for f in (F32, F64):
        pre = f"f{f.bits}_"
        value = (0, (1 << f.bits) - 1)
        for op in ("add", "sub", "mul", "div"):
            table[pre + op] = Helper(_arithmetic(f, op), 2, True, (value, flags))
        table[pre + "sqrt"] = Helper(_sqrt(f), 1, True, (value, flags))
        if FMA:
            for name, negate_product, negate_addend in (
                    ("fmadd", False, False), ("fmsub", False, True),
                    ("fnmsub", True, False), ("fnmadd", True, True)):
                table[pre + name] = Helper(_fused(f, negate_product, negate_addend), 3, True,
                                           (value, flags))
        for kind in ("", "n", "x"):
            table[f"{pre}sgnj{kind}"] = Helper(_sign_injection(f, kind), 2, False, (value,))
        for op in ("eq", "lt", "le"):
            table[pre + op] = Helper(_compare(f, op), 2, False, ((0, 1), flags))
        table[pre + "min"] = Helper(_min_max(f, False), 2, False, (value, flags))
        table[pre + "max"] = Helper(_min_max(f, True), 2, False, (value, flags))
        table[pre + "classify"] = Helper(_classify(f), 1, False, ((0, (1 << 10) - 1),))
        for bits in (32, 64):
            for signed, ty in ((True, f"i{bits}"), (False, f"u{bits}")):
                integer = (0, (1 << bits) - 1)
                table[f"{pre}to_{ty}"] = Helper(_to_int(f, bits, signed), 1, True,
                                                (integer, flags))
                table[f"{pre}from_{ty}"] = Helper(_from_int(f, bits, signed), 1, True,
                                                  (value, flags))
    table["f32_to_f64"] = Helper(_convert(F32, F64), 1, False, ((0, (1 << 64) - 1), flags))
    table["f64_to_f32"] = Helper(_convert(F64, F32), 1, True, ((0, (1 << 32) - 1), flags))
    return table


HELPERS: dict[str, Helper] = _helpers() if HOST else {}
