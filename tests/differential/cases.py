"""Seeded test cases for every declared non-privileged instruction.

Cases are generated from the declarations themselves (``ALL_INSNS`` and the compressed
table), so a newly declared instruction gets cases without anyone writing them, and a
declared instruction this module cannot generate makes the coverage test fail.

A case is one instruction (or an ``lr``/``sc`` pair) placed at its own address, and the
complete register state it starts from: every integer and FP register, fcsr, and a
64-byte window of random memory that memory instructions address. Source operands are
drawn from edge values (integer and shift boundaries, NaNs, signalling NaNs, infinities,
subnormals, -0.0, extreme finite values, singles that are not NaN-boxed) and random
values; FP instructions run under every static rounding mode and under the dynamic mode
with each valid ``frm`` (and a few under a reserved one, which must trap).

Not generated, because the specification leaves them to the implementation or the
execution environment: misaligned loads and stores, and reserved compressed encodings.
An ``sc`` right after its ``lr`` is expected to succeed, as on QEMU (the specification
would allow it to fail).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import product

from popek.isa.decoder import ALL_INSNS
from popek.isa.rv64c import CINSNS, CInsn
from popek.isa.spec import Insn

M64 = (1 << 64) - 1

# Guest memory layout shared by both machines: RAM as on QEMU's virt board.
RAM_BASE = 0x8000_0000
RAM_SIZE = 1 << 20
CODE_BASE = RAM_BASE  # case k sits at CODE_BASE + SLOT * k (+2 for some)
SLOT = 16
DATA_BASE = RAM_BASE + 0x8_0000  # memory windows live in [DATA_BASE, DATA_BASE + DATA_SIZE)
DATA_SIZE = 0x4_0000
WINDOW = 64
TRAP_VECTOR = RAM_BASE + 0xF_F000
MAX_CHUNK = (DATA_BASE - CODE_BASE) // SLOT

# CSRs a user-level differential test may touch: fflags, frm, fcsr.
FP_CSRS = (1, 2, 3)

ROUNDING_MODES = ("rne", "rtz", "rdn", "rup", "rmm", "?5", "?6", "dyn")

# Instructions whose whole effect is privileged state or a trap. Unicorn does not emulate
# trap entry (it hands the exception to the host, and reports ecall with the U-mode cause
# whatever the privilege), so directed trap tests cover these instead. Nor does unicorn
# (QEMU 5.0) know the extensions ratified since: tests/test_exec.py compares the bit
# manipulation ones with qemu-riscv64 7.2, tests/test_extensions.py all of them with the
# specification.
EXCLUDED_EXTS = frozenset({"priv", "Zba", "Zbb", "Zbc", "Zbs", "Zicond", "Zicbom", "Zicboz"})

_BY_NAME = {i.name: i for i in ALL_INSNS}


@dataclass(frozen=True)
class Kind:
    """One thing to generate cases for: a declared instruction or a compressed form."""

    name: str
    insn: Insn  # the instruction that executes (a compressed form's expansion)
    cinsn: CInsn | None = None
    halfwords: tuple[int, ...] = ()  # every valid encoding of a compressed kind
    overlaps: tuple[Insn, ...] = ()  # more specific declarations that share encodings


@dataclass(slots=True)
class Case:
    """A complete starting state and the code to run from it."""

    kind: str
    words: tuple[tuple[Insn, int, int], ...]  # (instruction, encoding, length) as executed
    pc: int
    code: bytes
    ends_block: bool  # control may leave pc + len(code): run by instruction count
    x: list[int]  # x0..x31
    f: list[int]  # f0..f31, raw bits
    fcsr: int
    window: int  # address of the 64-byte memory window, 0 when none is used
    data: bytes
    operands: tuple[int, int, int, int]  # (rd, rs1, rs2, imm) of the first instruction
    srcs: tuple[tuple[str, int, str], ...]  # ("x" or "f", register, precision)
    frd: int  # FP register written, -1 for none
    fp_dest: str  # precision of that FP result: "s", "d" or ""
    fp_op: str  # "minmax", "fma" or "": the families with oracle corrections

    @property
    def steps(self) -> int:
        return len(self.words)


# --- operand roles, from the declarations ---------------------------------------------------


def fp_precisions(name: str) -> tuple[str, str]:
    """(source, destination) precision of an FP instruction's FP operands.

    ``s`` is a single read through NaN-boxing, ``d`` a double, ``w`` 32 raw bits (the
    transfer instructions fmv.x.w and fsw ignore NaN-boxing); ``""`` means integer.
    """
    parts = name.split(".")
    if parts[0] == "fcvt":
        return (parts[2] if parts[2] in "sd" else "", parts[1] if parts[1] in "sd" else "")
    transfers = {
        "fmv.x.w": ("w", ""), "fmv.w.x": ("", "s"), "fmv.x.d": ("d", ""),
        "fmv.d.x": ("", "d"), "flw": ("", "s"), "fsw": ("w", ""), "fld": ("", "d"),
        "fsd": ("d", ""),
    }
    if name in transfers:
        return transfers[name]
    if len(parts) == 2 and parts[1] in ("s", "d"):
        return parts[1], parts[1]
    raise ValueError(f"{name}: cannot tell the precision of its FP operands")


@dataclass(frozen=True)
class Roles:
    """Which fields of an instruction are register sources, and of which kind."""

    srcs: tuple[tuple[str, str, str], ...]  # (field, "x"/"f", precision)
    fp_rd: bool
    int_rd: bool
    fp_dest: str
    width: int  # memory access size in bytes, 0 for none
    fp_op: str


def roles(ins: Insn) -> Roles:
    """Operand roles as the declaration's assembly syntax names them."""
    asm = ins.asm
    is_fp = "{frs1}" in asm or "{frs2}" in asm or "{frd}" in asm
    src_p, dst_p = fp_precisions(ins.name) if is_fp else ("", "")
    srcs = []
    for field in ("rs1", "rs2", "rs3"):
        if "{f" + field + "}" in asm:
            srcs.append((field, "f", src_p))
        elif "{" + field + "}" in asm:
            srcs.append((field, "x", ""))
    memory = {"load", "store", "amo"} & ins.flags
    width = 0
    if memory:
        width = {"b": 1, "h": 2, "w": 4, "d": 8}[ins.name.split(".")[-1].rstrip("u")[-1]]
    family = ins.name.split(".")[0]
    fp_op = "fma" if ins.fmt == "R4" else "minmax" if family in ("fmin", "fmax") else ""
    return Roles(tuple(srcs), "{frd}" in asm, "{rd}" in asm, dst_p if "{frd}" in asm else "",
                 width, fp_op)


# --- the kinds to cover ---------------------------------------------------------------------


def _overlapping(ins: Insn) -> tuple[Insn, ...]:
    """Declarations that win over ``ins`` on some of its encodings (the decoder prefers
    the most specific pattern)."""
    mask, match = ins.mask, ins.match
    bits = bin(mask).count("1")
    return tuple(
        o for o in ALL_INSNS
        if o is not ins and bin(o.mask).count("1") > bits
        and not (o.match ^ match) & o.mask & mask
    )


def _expansions(c: CInsn) -> Iterator[tuple[int, str]]:
    """Every valid encoding of a compressed pattern and the base instruction it stands for."""
    mask, match = c.mask, c.match
    free = [b for b in range(16) if not mask >> b & 1]
    rivals = [(o.mask, o.match) for o in CINSNS
              if o is not c and bin(o.mask).count("1") > bin(mask).count("1")]
    for bits in product((0, 1), repeat=len(free)):
        half = match | sum(v << b for v, b in zip(bits, free, strict=True))
        if any(half & m == v for m, v in rivals):
            continue
        exp = c.expand(half)
        if exp is not None:
            yield half, exp[0]


@cache
def kinds() -> dict[str, Kind]:
    """Every non-privileged declared instruction and compressed form, by name."""
    out = {i.name: Kind(i.name, i, overlaps=_overlapping(i))
           for i in ALL_INSNS if i.ext not in EXCLUDED_EXTS}
    for c in CINSNS:
        groups: dict[str, list[int]] = {}
        for half, base in _expansions(c):
            groups.setdefault(base, []).append(half)
        for base, halves in groups.items():
            ins = _BY_NAME[base]
            if ins.ext in EXCLUDED_EXTS:
                continue
            name = c.name if len(groups) == 1 else f"{c.name}:{base}"
            out[name] = Kind(name, ins, c, tuple(halves))
    return out


def plan(total: int, chunk: int = 2000) -> list[tuple[str, int, int]]:
    """Split ``total`` cases into (kind, chunk index, count) tests.

    FP instructions get twice the share of the others: they have more operand classes
    and ten rounding-mode settings to cross. Every kind gets at least 50 cases.
    """
    chunk = min(chunk, MAX_CHUNK)
    ks = kinds().values()
    weight = {k.name: 2 if k.insn.ext in ("F", "D") else 1 for k in ks}
    unit = total / sum(weight.values())
    out = []
    for name, w in weight.items():
        n = max(50, round(unit * w))
        for i, start in enumerate(range(0, n, chunk)):
            out.append((name, i, min(chunk, n - start)))
    return out


# --- operand values -------------------------------------------------------------------------


def _s(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _d(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


INT_EDGES = (
    0, 1, 2, 3, M64, M64 - 1, 1 << 63, (1 << 63) - 1, (1 << 63) + 1,
    0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, 0x1_0000_0001,
    0xFFFF_FFFF_8000_0000, 0xFFFF_FFFF_7FFF_FFFF, 0xFFFF_FFFF_0000_0000, 0x8000_0001,
    31, 32, 33, 63, 64, 65, 0x7FF, 0x800, M64 - 0x7FF, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000,
    0xFFFF, 0x100_0001, 0x20_0000_0000_0001, 0x5555_5555_5555_5555, 0xAAAA_AAAA_AAAA_AAAA,
    M64 - 31, M64 - 32, M64 - 63,
)

S_EDGES = (
    0x0000_0000, 0x8000_0000, _s(1.0), _s(-1.0), _s(0.5), _s(-0.5), _s(1.5), _s(2.5),
    _s(-2.5), _s(3.5), 0x3EFF_FFFF, 0x3F00_0001, _s(2.0), _s(3.0), _s(10.0), _s(1 / 3),
    0x7F80_0000, 0xFF80_0000,  # infinities
    0x7FC0_0000, 0xFFC0_0000, 0x7FC0_0001, 0x7FFF_FFFF,  # quiet NaNs
    0x7F80_0001, 0x7FA0_0000, 0x7FBF_FFFF, 0xFF80_0001,  # signalling NaNs
    0x0000_0001, 0x8000_0001, 0x007F_FFFF, 0x807F_FFFF, 0x0040_0000,  # subnormals
    0x0080_0000, 0x8080_0000, 0x0080_0001,  # smallest normals
    0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F7F_FFFE,  # largest finite
    _s(2.0**31), _s(-(2.0**31)), 0x4EFF_FFFF, 0xCF00_0001, _s(2.0**32), 0x4F7F_FFFF,
    _s(2.0**63), _s(-(2.0**63)), 0x5EFF_FFFF, 0xDF00_0001, _s(2.0**64), 0x5F7F_FFFF,
    _s(2.0**24), _s(2.0**24 + 2), _s(2.0**-23), _s(2.0**-24), 0x3F7F_FFFF, 0x3F80_0001,
)

D_EDGES = (
    0, 1 << 63, _d(1.0), _d(-1.0), _d(0.5), _d(-0.5), _d(1.5), _d(2.5), _d(-2.5), _d(3.5),
    0x3FDF_FFFF_FFFF_FFFF, 0x3FE0_0000_0000_0001, _d(2.0), _d(3.0), _d(10.0), _d(1 / 3),
    0x7FF0_0000_0000_0000, 0xFFF0_0000_0000_0000,  # infinities
    0x7FF8_0000_0000_0000, 0xFFF8_0000_0000_0000, 0x7FF8_0000_0000_0001,
    0x7FFF_FFFF_FFFF_FFFF,  # quiet NaNs
    0x7FF0_0000_0000_0001, 0x7FF4_0000_0000_0000, 0x7FF7_FFFF_FFFF_FFFF,
    0xFFF0_0000_0000_0001,  # signalling NaNs
    1, (1 << 63) | 1, 0x000F_FFFF_FFFF_FFFF, 0x800F_FFFF_FFFF_FFFF,
    0x0008_0000_0000_0000,  # subnormals
    0x0010_0000_0000_0000, 0x8010_0000_0000_0000,  # smallest normals
    0x7FEF_FFFF_FFFF_FFFF, 0xFFEF_FFFF_FFFF_FFFF,  # largest finite
    _d(2.0**31), _d(-(2.0**31)), _d(2.0**31 - 1), _d(2.0**31 - 0.5), _d(-(2.0**31) - 1),
    _d(-(2.0**31) - 0.5), _d(2.0**32), _d(2.0**32 - 1), _d(2.0**32 - 0.5), _d(-0.75),
    _d(2.0**63), _d(-(2.0**63)), 0x43DF_FFFF_FFFF_FFFF, 0xC3E0_0000_0000_0001,
    _d(2.0**64), 0x43EF_FFFF_FFFF_FFFF, _d(2.0**53), _d(2.0**53 + 2), _d(2.0**-52),
    # Where doubles stop fitting a single: overflow, rounding to the largest finite,
    # and the subnormal/underflow boundaries.
    0x47EF_FFFF_E000_0000, 0x47EF_FFFF_F000_0000, 0x47EF_FFFF_EFFF_FFFF, _d(2.0**128),
    _d(2.0**-126), _d(2.0**-149), _d(2.0**-150), _d(1.5 * 2.0**-150), _d(2.0**-127),
    0x380F_FFFF_F000_0000, 0x380F_FFFF_E000_0000,
)


def _random_float(rng: random.Random, ebits: int, mbits: int, edges: tuple[int, ...]) -> int:
    """Raw bits of a float drawn from edges, near-edges and several random classes."""
    sign = rng.getrandbits(1) << (ebits + mbits)
    emax = (1 << ebits) - 1
    bias = emax >> 1
    r = rng.random()
    if r < 0.35:
        return rng.choice(edges)
    if r < 0.45:  # one ulp around an edge
        return (rng.choice(edges) + rng.choice((-1, 1))) & ((1 << (ebits + mbits + 1)) - 1)
    if r < 0.65:  # magnitudes where conversions to integers are interesting
        return sign | (bias + rng.randint(-4, 66)) << mbits | rng.getrandbits(mbits)
    if r < 0.72:  # few mantissa bits: sums and products are often exact
        return sign | (bias + rng.randint(-8, 8)) << mbits | rng.getrandbits(4) << (mbits - 4)
    if r < 0.78:
        return sign | rng.getrandbits(mbits)  # subnormal (or zero)
    if r < 0.84:  # NaN with a random payload, quiet or signalling
        return sign | emax << mbits | (rng.getrandbits(mbits) or 1)
    if r < 0.90:  # anywhere in the exponent range
        return sign | rng.randrange(emax) << mbits | rng.getrandbits(mbits)
    return rng.getrandbits(ebits + mbits + 1)


def random_single(rng: random.Random) -> int:
    return _random_float(rng, 8, 23, S_EDGES)


def random_double(rng: random.Random) -> int:
    return _random_float(rng, 11, 52, D_EDGES)


def _unboxed(rng: random.Random, single: int) -> int:
    """A single whose upper 32 bits are not all ones: it must read as the canonical NaN."""
    upper = rng.choice((0, 0xFFFF_FFFE, 0x7FFF_FFFF, 0xFFFF_7FFF, rng.getrandbits(32)))
    if upper == 0xFFFF_FFFF:
        upper = 0
    return upper << 32 | single


def random_int(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.4:
        return rng.choice(INT_EDGES)
    if r < 0.5:
        return rng.randint(-64, 64) & M64
    if r < 0.65:  # a sign-extended 32-bit value
        v = rng.getrandbits(32)
        return v | (0xFFFF_FFFF_0000_0000 if v >> 31 else 0)
    if r < 0.75:  # one bit set or clear
        b = 1 << rng.randrange(64)
        return b if rng.getrandbits(1) else M64 ^ b
    if r < 0.85:  # an integer a float can (just) not hold exactly
        return (1 << rng.choice((24, 25, 53, 54)) | rng.getrandbits(3)) * rng.choice((1, -1)) & M64
    return rng.getrandbits(64)


def random_fp_reg(rng: random.Random, precision: str) -> int:
    """An FP register value for an operand of the given precision."""
    if precision == "d":
        if rng.random() < 0.05:  # a boxed single, seen as a double (a NaN)
            return 0xFFFF_FFFF_0000_0000 | random_single(rng)
        return random_double(rng)
    single = random_single(rng)
    r = rng.random()
    if precision == "s" and r < 0.08 or precision == "w" and r < 0.2:
        return _unboxed(rng, single)
    if precision == "w" and r < 0.35:
        return rng.getrandbits(64)
    return 0xFFFF_FFFF_0000_0000 | single


def _as_float(bits: int, precision: str) -> float:
    if precision == "d":
        return struct.unpack("<d", struct.pack("<Q", bits))[0]
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFF_FFFF))[0]


def _from_float(x: float, precision: str) -> int:
    if precision == "d":
        return _d(x)
    return 0xFFFF_FFFF_0000_0000 | _s(x)


def _fp_scenario(rng: random.Random, values: list[int], precision: str, fma: bool) -> None:
    """Relate source operands the way interesting FP cases need (in place)."""
    r = rng.random()
    if r < 0.1:  # equal operands, or opposite: x - x, min(-0, +0), feq(x, x)...
        sign = (1 << 63 if precision == "d" else 1 << 31) * rng.getrandbits(1)
        values[1] = values[0] ^ sign
    elif fma and r < 0.2:  # infinity times zero, plus a NaN or a number
        inf, zero = _from_float(math.inf, precision), _from_float(0.0, precision)
        values[0], values[1] = rng.sample((inf, zero), 2)
        values[0] ^= (1 << 63 if precision == "d" else 1 << 31) * rng.getrandbits(1)
    elif fma and r < 0.35:  # c = -(a * b) rounded: the fused result is the rounding error
        a, b = (_as_float(v, precision) for v in values[:2])
        prod = a * b
        if math.isfinite(prod) and prod != 0:
            try:
                values[2] = _from_float(-prod, precision)
            except OverflowError:
                pass


# --- building cases -------------------------------------------------------------------------


def _field(word: int, free: int, lo: int, width: int, value: int) -> int:
    """Set a field of ``word`` if the declaration leaves all of it free."""
    mask = ((1 << width) - 1) << lo
    if free & mask != mask:
        return word
    return word & ~mask | (value << lo) & mask


def _rm_and_frm(rng: random.Random) -> tuple[int, int]:
    """One of the ten rounding settings: static rm 0-4 (any frm), or dynamic with frm 0-4;
    now and then a reserved one (rm 5 or 6, or dynamic with frm 5-7), which must trap."""
    if rng.random() < 0.04:
        rm = rng.choice((5, 6, 7))
        return rm, rng.randrange(5, 8) if rm == 7 else rng.randrange(8)
    i = rng.randrange(10)
    return (i, rng.randrange(8)) if i < 5 else (7, i - 5)


def _word32(rng: random.Random, kind: Kind, match: int, free: int, memory: bool
            ) -> tuple[int, int]:
    """A random encoding of a 32-bit instruction, and the frm to run it with."""
    fmt = kind.insn.fmt
    while True:
        w = match | rng.getrandbits(32) & free
        frm = rng.randrange(8)
        if fmt == "I" and not memory and rng.random() < 0.3:
            w = _field(w, free, 20, 12, rng.choice((0, 1, -1, 2047, -2048)))
        elif fmt == "SH6" and rng.random() < 0.5:
            w = _field(w, free, 20, 6, rng.choice((0, 1, 31, 32, 63)))
        elif fmt == "SH5" and rng.random() < 0.5:
            w = _field(w, free, 20, 5, rng.choice((0, 1, 31)))
        elif fmt == "U" and rng.random() < 0.2:
            w = _field(w, free, 12, 20, rng.choice((0, 0x80000, 0xFFFFF, 0x7FFFF)))
        elif fmt == "CSR":
            w = _field(w, free, 20, 12, rng.choice(FP_CSRS))
            if rng.random() < 0.15:
                w = _field(w, free, 15, 5, 0)  # csrrs/csrrc x0: a read without a write
        elif fmt in ("RM", "R4") and free >> 12 & 7 == 7:
            rm, frm = _rm_and_frm(rng)
            w = _field(w, free, 12, 3, rm)
        if rng.random() < 0.1:  # rd == rs1
            w = _field(w, free, 15, 5, w >> 7 & 31)
        if memory and not w >> 15 & 31:
            w = _field(w, free, 15, 5, rng.randint(1, 31))  # x0 as a base is unmapped
        if not any(w & o.mask == o.match for o in kind.overlaps):
            return w, frm


def _sources(rng: random.Random, rl: Roles, regs: dict[str, int], x: list[int],
             f: list[int]) -> tuple[tuple[str, int, str], ...]:
    """Draw source operand values into the register files; return the sources."""
    srcs = tuple((cls, regs[field], p) for field, cls, p in rl.srcs)
    fvals = [random_fp_reg(rng, p) for cls, _, p in srcs if cls == "f"]
    if len(fvals) >= 2:
        _fp_scenario(rng, fvals, srcs[0][2], rl.fp_op == "fma")
    xvals = [random_int(rng) for cls, _, _ in srcs if cls == "x"]
    if len(xvals) == 2 and rng.random() < 0.1:
        xvals[1] = xvals[0]
    for cls, reg, _ in srcs:
        if cls == "f":
            f[reg] = fvals.pop(0)
        elif reg:
            x[reg] = xvals.pop(0)
    return srcs


def _baseline(rng: random.Random) -> tuple[list[int], list[int]]:
    """Register values a case does not draw fresh: fixed per chunk."""
    x = [0] + [random_int(rng) for _ in range(31)]
    f = [random_fp_reg(rng, rng.choice("sd")) for _ in range(32)]
    return x, f


def generate(kind: Kind, count: int, seed: str) -> list[Case]:
    """``count`` cases of one kind; the same seed always gives the same cases."""
    if count > MAX_CHUNK:
        raise ValueError(f"at most {MAX_CHUNK} cases fit in one chunk")
    rng = random.Random(seed)
    base_x, base_f = _baseline(rng)
    ins = kind.insn
    rl = roles(ins)
    match, free = ins.match, ~ins.mask & 0xFFFF_FFFF
    cases = []
    for k in range(count):
        pc = CODE_BASE + SLOT * k + 2 * rng.getrandbits(1)
        x, f = base_x[:], base_f[:]
        fcsr = rng.getrandbits(5) if rng.getrandbits(1) else 0
        if kind.cinsn is not None:
            half = rng.choice(kind.halfwords)
            _, rd, rs1, rs2, imm = kind.cinsn.expand(half)
            words: tuple[tuple[Insn, int, int], ...] = ((ins, half, 2),)
            fcsr |= rng.randrange(8) << 5
        else:
            word, frm = _word32(rng, kind, match, free, rl.width > 0)
            rd, rs1, rs2, imm = ins.operands(word)
            words = ((ins, word, 4),)
            fcsr |= frm << 5
        regs = {"rs1": rs1, "rs2": rs2, "rs3": imm & 31}
        srcs = _sources(rng, rl, regs, x, f)
        window, data = 0, b""
        if rl.width:
            window = DATA_BASE + WINDOW * rng.randrange(DATA_SIZE // WINDOW)
            data = rng.randbytes(WINDOW)
            addr = window + rl.width * rng.randrange(WINDOW // rl.width)
            offset = 0 if ins.fmt == "AMO" else imm
            x[rs1] = (addr - offset) & M64
            if ins.name.startswith("lr.") or ins.name.startswith("sc.") and rng.random() < 0.5:
                # lr then sc on the same address: the sc must succeed. A lone sc has no
                # reservation (every lr is followed by its sc) and must fail.
                lr, sc = (_BY_NAME[p + ins.name[2:]] for p in ("lr", "sc"))
                lr_rd = rng.choice([r for r in range(32) if r != rs1])
                lr_word = lr.match | lr_rd << 7 | rs1 << 15 | rng.getrandbits(2) << 25
                sc_word = (sc.match | rng.getrandbits(5) << 7 | rs1 << 15
                           | rng.getrandbits(5) << 20 | rng.getrandbits(2) << 25)
                x[sc_word >> 20 & 31] = random_int(rng)
                x[rs1] = addr
                words = ((lr, lr_word, 4), (sc, sc_word, 4))
                rd, rs1, rs2, imm = lr.operands(lr_word)
                srcs = (("x", rs1, ""), ("x", sc_word >> 20 & 31, ""))
        x[0] = 0
        code = b"".join(w.to_bytes(n, "little") for _, w, n in words)
        frd = rd if rl.fp_rd else -1
        cases.append(Case(
            kind.name, words, pc, code, "ends_block" in ins.flags, x, f, fcsr, window, data,
            (rd, rs1, rs2, imm), srcs, frd, rl.fp_dest, rl.fp_op,
        ))
    return cases
