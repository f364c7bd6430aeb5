"""Native FP (:mod:`popek.engine.hostfp`) against softfloat, bit for bit and flag for flag.

Every FP instruction the native tiers lower runs as native code (tier 2's single-step
function of it, made by the same lowering as stencils and blocks) and through its Python
handler (the interpreter's semantics, softfloat), on special operands (zeros, infinities,
quiet and signalling NaNs, subnormals, the extreme normals, halfway cases, results at the
edge of tininess, integer bounds) and random ones, in every rounding mode, static and
dynamic: the register written, fcsr (flags accrued onto what was there) and any trap must
be the same. In RMM and the reserved modes, which the host has no rounding control for,
native code must decline and leave the instruction to the handler.
"""

from __future__ import annotations

import ctypes
import random
import struct
from collections.abc import Iterator

import pytest

from popek.cpu.causes import Trap
from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.engine import hostfp, jit
from popek.isa.decoder import ALL_INSNS
from popek.isa.softfloat import FP_RMM
from tests.cross_built import build
from tests.test_exec import assert_same_as_qemu, environment

pytestmark = pytest.mark.skipif(not hostfp.HOST, reason="native FP is for x86-64 hosts")

BASE = 0x8000_0000
PC = BASE + 0x100
FCSR = 3
RS1, RS2, RD, RS3 = 1, 2, 3, 4
BOX = 0xFFFFFFFF00000000
STATIC_MODES = (0, 1, 2, 3)  # RNE RTZ RDN RUP, in the instruction's rm field
DYNAMIC = 7
FE_ALL_EXCEPT = 0x3D  # glibc's on x86-64


def _f64(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def _f32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _specials(bits: int) -> list[int]:
    """Operands where IEEE arithmetic and RISC-V's rules are easy to get wrong."""
    p = 24 if bits == 32 else 53
    sign = 1 << (bits - 1)
    inf = (sign - 1) & ~((1 << (p - 1)) - 1)
    quiet = 1 << (p - 2)
    one = _f32(1.0) if bits == 32 else _f64(1.0)
    min_normal = 1 << (p - 1)
    pack = _f32 if bits == 32 else _f64
    positive = [
        0, inf, inf | quiet, inf | quiet | 0x123, inf | 1, inf | (quiet >> 1),  # NaNs
        1, min_normal - 1, min_normal, min_normal + 1, inf - 1,  # subnormals, extremes
        one, one - 1, one - 2, one + 1, pack(0.5), pack(1.5), pack(2.5), pack(3.0),
        pack(1 / 3), pack(2.0 ** -(p)), pack(3 * 2.0 ** -(p)),  # halfway sums with 1
        pack(2.0 ** 31), pack(2.0 ** 31 - 1) if bits == 64 else pack(2.0 ** 30),
        pack(2.0 ** 32), pack(2.0 ** 32 - 0.5) if bits == 64 else pack(2.0 ** 32 - 256),
        pack(2.0 ** 63), pack(2.0 ** 64), pack(2.0 ** 63) - 1, pack(2.0 ** 64) - 1,
        pack(2.0 ** 53 + 2) if bits == 64 else pack(2.0 ** 24 + 2),
        # tiny before rounding, maybe not after: a narrowed double, products below
        pack(2.0 ** (2 - 2 ** (bits - p)) * (1 - 2.0 ** -p)) if bits == 64 else 0x00FFFFFF,
        pack(1e-300) if bits == 64 else pack(1e-30), pack(1e300) if bits == 64 else pack(1e30),
    ]
    return positive + [v | sign for v in positive]


def _narrowing_edges() -> list[int]:
    """Doubles whose narrowing to single is at the edge of tininess or overflow."""
    edge = 2.0 ** -126
    return [_f64(edge * (1 - 2.0 ** -25)), _f64(edge * (1 - 2.0 ** -24)),
            _f64(edge * (1 - 2.0 ** -26)), _f64(2.0 ** -149 / 2), _f64(2.0 ** -149 * 1.5),
            _f64(3.4028235677973366e38), _f64(3.4028234663852886e38 * (1 + 2.0 ** -25)),
            _f64(-edge * (1 - 2.0 ** -25))]


def _operands(bits: int, rng: random.Random, count: int) -> list[int]:
    """Specials, then random values (as NaN-boxed register contents for singles): half
    anywhere, half of moderate exponent, so sums and products round rather than overflow."""
    values = _specials(bits) + (_narrowing_edges() if bits == 64 else [])
    p = 24 if bits == 32 else 53
    ebits = bits - p
    for _ in range(count):
        if rng.random() < 0.5:
            values.append(rng.getrandbits(bits))
        else:
            bias = (1 << (ebits - 1)) - 1
            e = rng.randrange(bias - 40, bias + 40)
            values.append(rng.getrandbits(1) << (bits - 1) | e << (p - 1) |
                          rng.getrandbits(p - 1))
    if bits == 32:
        values = [v | BOX for v in values] + [_f32(1.0), BOX >> 1 | 5]  # two not boxed
    return values


def _integers(rng: random.Random) -> list[int]:
    edges = [0, 1, -1, 2 ** 24 + 1, 2 ** 24 + 3, 2 ** 31 - 1, 2 ** 31, -2 ** 31, 2 ** 32 - 1,
             2 ** 53 + 1, 2 ** 53 + 3, -(2 ** 53 + 1), 2 ** 63 - 1, 2 ** 63, 2 ** 63 + 1025,
             2 ** 63 + 2 ** 40 + 1, 2 ** 64 - 1, 2 ** 64 - 1025, 0x80000001, -0x80000001]
    edges += [rng.getrandbits(64) for _ in range(30)] + [rng.getrandbits(32) for _ in range(10)]
    return [v & (2 ** 64 - 1) for v in edges]


class Stepper:
    """One hart's tier-2 single steps of FP instructions, and their Python handlers."""

    def __init__(self) -> None:
        self.hart = Hart(PhysicalMemory(BASE, 1 << 16), clock=lambda: 0, engine="jit")
        self.hart.csr[0x300] |= 1 << 13  # FP unit on
        self.native = self.hart.engine.native
        self.handlers = self.hart.engine.handlers
        self.declined = 0

    def _set(self, f1: int, f2: int, f3: int, x1: int, fcsr: int) -> None:
        h = self.hart
        h.f[RS1], h.f[RS2], h.f[RS3], h.x[RS1] = f1, f2, f3, x1
        h.f[RD], h.x[RD] = 0x5A5A, 0x5A5A
        h.csr[FCSR] = fcsr

    def _outcome(self, run) -> tuple[object, ...]:  # noqa: ANN001
        try:
            run()
        except Trap as trap:
            return ("trap", trap.cause, trap.tval)
        h = self.hart
        return (h.f[RD], h.x[RD], h.csr[FCSR])

    def compare(self, ins, mode: int, f1: int, f2: int = 0, f3: int = 0,  # noqa: ANN001
                x1: int = 0, fcsr: int = 0) -> tuple[tuple, tuple]:
        """(native outcome, softfloat outcome) of ``ins`` in rounding ``mode`` (its rm
        field, where it has one) on these operands."""
        imm = {"RM": mode, "R4": RS3 | mode << 5}.get(ins.fmt, 0)
        step = self.native.step_function(ins, 4)
        assert step is not None, ins.name
        handler = self.handlers[(ins.name, 4)]
        addr = self.native.env_addr

        def native() -> None:
            status = step(addr, PC, RD, RS1, RS2, imm)
            if status == jit.DECLINED:
                self.declined += 1
                handler(PC, RD, RS1, RS2, imm)
            elif status:
                raise self.native.take_pending(status)

        self._set(f1, f2, f3, x1, fcsr)
        got = self._outcome(native)
        self._set(f1, f2, f3, x1, fcsr)
        want = self._outcome(lambda: handler(PC, RD, RS1, RS2, imm))
        return got, want


@pytest.fixture(scope="module")
def stepper() -> Stepper:
    return Stepper()


def _insn(name: str):  # noqa: ANN202
    return next(i for i in ALL_INSNS if i.name == name)


def _lowered_fp() -> list[str]:
    return [i.name for i in ALL_INSNS if "fp" in i.flags and jit.lowers(i)]


FUSED = {f"{op}.{p}" for op in ("fmadd", "fmsub", "fnmsub", "fnmadd") for p in "sd"}


def test_every_fp_computation_is_native() -> None:
    """All of RV64FD but fused multiply-add on a host without FMA, which the handler runs."""
    lowered = set(_lowered_fp())
    computing = {i.name for i in ALL_INSNS if i.ext in ("F", "D") and "load" not in i.flags
                 and "store" not in i.flags}
    assert computing - lowered == (set() if hostfp.FMA else FUSED)


def _rounds(name: str) -> bool:
    return "fp_rm" in _insn(name).sem


def _fused_triples(prec: int, rng: random.Random) -> list[tuple[int, int, int, int]]:
    """Every combination of a few specials, products that cancel the addend exactly or
    all but a bit, then random triples."""
    box = BOX if prec == 32 else 0
    pack = _f32 if prec == 32 else _f64
    sign = 1 << (prec - 1)
    few = [0, sign, *_specials(prec)[1:4], 1, (1 << (prec - 1 - (8 if prec == 32 else 11))),
           pack(1.0), pack(1.0) + 1, pack(1.0) - 1, pack(3.0), pack(2.0 ** 60) | sign]
    few = [v | box for v in few]
    triples = [(a, b, c, 0) for a in few for b in few for c in few]
    one_up, one_down = pack(1.0) + 1 | box, pack(1.0) - 1 | box
    for c in (pack(1.0), pack(1.0) | sign, pack(1.0) - 1, pack(1.0) + 1 | sign):
        triples += [(one_up, one_down, c | box, 0), (one_up, one_up, c | box | sign, 0)]
    ops = _operands(prec, rng, 40)
    triples += [(rng.choice(ops), rng.choice(ops), rng.choice(ops), 0) for _ in range(2500)]
    return triples


def _cases(name: str, rng: random.Random) -> Iterator[tuple[int, int, int, int, int]]:
    """(mode, f1, f2, f3, x1) for instruction ``name``."""
    ins = _insn(name)
    prec = 32 if "fp_unbox32(F[rs1])" in ins.sem else 64
    if "X[rs1]" in ins.sem:  # from an integer
        sources: list[tuple[int, int, int, int]] = [(0, 0, 0, x) for x in _integers(rng)]
    elif ins.fmt == "R4":
        sources = _fused_triples(prec, rng)
    elif "F[rs2]" in ins.sem:
        ops = _operands(prec, rng, 14)
        sources = [(a, c, 0, 0) for a in ops for c in ops]
    else:
        sources = [(f, 0, 0, 0) for f in _operands(prec, rng, 60)]
    modes = STATIC_MODES if _rounds(name) else (0,)
    for f1, f2, f3, x1 in sources:
        for mode in modes:
            yield mode, f1, f2, f3, x1


FP_NAMES = _lowered_fp() if hostfp.HOST else []
COMPUTING = [n for n in FP_NAMES if not n.startswith(("flw", "fsw", "fld", "fsd", "fmv"))]


@pytest.mark.parametrize("name", COMPUTING)
def test_native_matches_softfloat_in_every_static_mode(stepper: Stepper, name: str) -> None:
    rng = random.Random(name)
    ins = _insn(name)
    declined = stepper.declined
    count = 0
    for mode, f1, f2, f3, x1 in _cases(name, rng):
        fcsr = rng.choice((0, 0, 0, 0x1F, 0x0A))
        got, want = stepper.compare(ins, mode, f1, f2, f3, x1, fcsr)
        assert got == want, (name, mode, hex(f1), hex(f2), hex(f3), hex(x1), hex(fcsr))
        count += 1
    assert count > 40
    assert stepper.declined == declined  # every one of them native


@pytest.mark.parametrize("name", [n for n in COMPUTING if _rounds(n)])
def test_dynamic_modes_and_those_the_host_lacks(stepper: Stepper, name: str) -> None:
    """rm = 7 takes fcsr.frm; RMM (static or dynamic) declines to the handler, which
    rounds ties away; a reserved mode declines too, and the handler raises the trap."""
    rng = random.Random(f"dynamic {name}")
    ins = _insn(name)
    cases = list(_cases(name, rng))
    cases = [c for c in cases if c[0] == 0]
    rng.shuffle(cases)
    declined = stepper.declined
    expect_declined = 0
    widening = name == "fcvt.d.s"  # exact: only checks its mode, RMM included
    for _, f1, f2, f3, x1 in cases[:150]:
        for rm, frm in [(DYNAMIC, m) for m in range(8)] + [(FP_RMM, 0), (5, 0), (6, 0)]:
            got, want = stepper.compare(ins, rm, f1, f2, f3, x1, frm << 5)
            assert got == want, (name, rm, frm, hex(f1), hex(f2), hex(f3), hex(x1))
            mode = frm if rm == DYNAMIC else rm
            expect_declined += mode > FP_RMM or (mode == FP_RMM and not widening)
    assert stepper.declined - declined == expect_declined
    traps = {stepper.compare(ins, 5, 0)[0], stepper.compare(ins, DYNAMIC, 0, fcsr=6 << 5)[0]}
    assert traps == {("trap", 2, None)}  # illegal instruction, its bits filled in later


def test_rmm_ties_differ_from_rne_so_declining_matters(stepper: Stepper) -> None:
    """fadd.d of 1 and 2**-53 is a tie: RNE keeps 1, RMM rounds away."""
    ins = _insn("fadd.d")
    one, half_ulp = _f64(1.0), _f64(2.0 ** -53)
    rne, _ = stepper.compare(ins, 0, one, half_ulp)
    rmm, want = stepper.compare(ins, FP_RMM, one, half_ulp)
    assert rmm == want
    assert rne[0] == one and rmm[0] == one + 1
    assert rne[2] == rmm[2] == 1  # NX


def test_tininess_is_detected_after_rounding(stepper: Stepper) -> None:
    """A product just below the smallest normal that rounds up to it, with an unbounded
    exponent, is not tiny in RNE (no UF) but is in RTZ: SSE agrees with RISC-V."""
    ins = _insn("fmul.d")
    a, b = 0x3FEFFFFFFFFFFFFE, 0x0010000000000001  # (1 - 2**-52) * min_normal * (1 + 2**-52)
    rne, want_rne = stepper.compare(ins, 0, a, b)
    rtz, want_rtz = stepper.compare(ins, 1, a, b)
    assert (rne, rtz) == (want_rne, want_rtz)
    assert rne[0] == 0x0010000000000000 and rne[2] == 0x01  # NX alone
    assert rtz[0] == 0x000FFFFFFFFFFFFF and rtz[2] == 0x03  # UF and NX


def test_python_floats_never_see_the_native_mxcsr(stepper: Stepper) -> None:
    """Native code in RUP that raises every flag leaves Python's rounding and flags."""
    libm = ctypes.CDLL(None)
    cases = (("fdiv.d", _f64(1.0), _f64(3.0)), ("fdiv.d", _f64(1.0), 0),
             ("fmul.d", _f64(1e300), _f64(1e300)), ("fsqrt.d", 1 << 63 | 5, 0),
             ("fmul.d", 1, _f64(0.5)))
    for name, _, _ in cases:
        stepper.compare(_insn(name), 3, 0, 0)  # compiled now: LLVM raises flags of its own
    third = 1.0 / 3.0
    libm.feclearexcept(FE_ALL_EXCEPT)
    for name, a, b in cases:
        got, want = stepper.compare(_insn(name), 3, a, b)
        assert got == want and got[2]
    assert libm.fetestexcept(FE_ALL_EXCEPT) == 0
    assert 1.0 / 3.0 == third and _f64(1.0 / 3.0) == 0x3FD5555555555555  # rounded to nearest


@pytest.mark.parametrize("engine", ["baseline", "jit"])
def test_compiled_fp_program_matches_qemu(engine: str,
                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """tests/user/fparith.c (GCC's FP code: conversions, fused multiply-adds, min/max,
    comparisons; results and the flags of each operation hashed per rounding mode, RMM
    included) prints what it prints under qemu-riscv64."""
    program = build(tmp_path_factory.mktemp("fparith"), "fparith")
    done = assert_same_as_qemu([str(program)], env=environment(POPEK_ENGINE=engine))
    assert done.stdout.count(b"\n") == 5
