"""popek's hart is an equivalent of the reference, instruction by instruction.

Every non-privileged RV64GC instruction runs from the same complete state on popek and on
unicorn (corrected to the specification, see :mod:`.oracle`); every integer and FP
register, fcsr, pc, the memory window the case addresses, and at the end of each chunk
the whole RAM must agree. The default run is 100,000 seeded cases split into one test per
instruction (and per chunk of 2,000 cases), so ``pytest -n`` spreads them; raise the
count with ``POPEK_DIFF_CASES=1000000`` or ``--diff-cases`` and change the cases with
``POPEK_DIFF_SEED`` or ``--diff-seed``.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable

import pytest

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.isa.decoder import ALL_INSNS
from popek.isa.rv64c import CINSNS

from .cases import (
    EXCLUDED_EXTS,
    RAM_BASE,
    RAM_SIZE,
    ROUNDING_MODES,
    TRAP_VECTOR,
    Case,
    generate,
    kinds,
    plan,
)
from .oracle import Outcome, UnicornOracle

DEFAULT_CASES = 100_000
MSTATUS, MTVEC, MCAUSE, FCSR = 0x300, 0x305, 0x342, 3
NO_TRAP = 0xDEAD  # an mcause no trap writes: still there means nothing trapped
SHOWN_FAILURES = 5


def _total(config: pytest.Config) -> int:
    return config.getoption("--diff-cases", None) or int(
        os.environ.get("POPEK_DIFF_CASES", DEFAULT_CASES))


def _seed(config: pytest.Config) -> str:
    return config.getoption("--diff-seed", None) or os.environ.get("POPEK_DIFF_SEED", "1")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "chunk" in metafunc.fixturenames:
        tests = plan(_total(metafunc.config))
        metafunc.parametrize(("kind", "chunk", "count"), tests,
                             ids=[f"{k}#{i}" for k, i, _ in tests])


@pytest.fixture(scope="module")
def oracle() -> UnicornOracle:
    return UnicornOracle()


class PopekMachine:
    """A fresh hart and RAM laid out like the oracle's, running one case at a time."""

    def __init__(self) -> None:
        self.mem = PhysicalMemory(base=RAM_BASE, size=RAM_SIZE)
        self.hart = Hart(self.mem)
        self.hart.csr[MSTATUS] |= 0x6000  # FS = dirty: the FP unit is on
        self.hart.csr[MTVEC] = TRAP_VECTOR

    def run(self, case: Case) -> Outcome:
        hart, mem = self.hart, self.mem
        hart.x[0:32] = array("Q", case.x)
        hart.f[0:32] = array("Q", case.f)
        hart.csr[FCSR] = case.fcsr
        hart.csr[MCAUSE] = NO_TRAP
        mem.write(case.pc, case.code)
        if case.window:
            mem.write(case.window, case.data)
        hart.pc = case.pc
        for _ in range(case.steps):
            hart.step()
            if hart.csr[MCAUSE] != NO_TRAP:
                break
        trap = None if hart.csr[MCAUSE] == NO_TRAP else hart.csr[MCAUSE]
        data = mem.read(case.window, len(case.data)) if case.window else b""
        return Outcome(tuple(hart.x[0:32]), tuple(hart.f), hart.csr[FCSR],
                       hart.pc if trap is None else None, data, trap)

    def ram(self) -> bytes:
        return self.mem.read(RAM_BASE, RAM_SIZE)


def test_hart_matches_unicorn(kind: str, chunk: int, count: int, oracle: UnicornOracle,
                              request: pytest.FixtureRequest) -> None:
    cases = generate(kinds()[kind], count, f"{_seed(request.config)}:{kind}:{chunk}")
    oracle.reset()
    popek = PopekMachine()
    failures = []
    for case in cases:
        want, got = oracle.run(case), popek.run(case)
        if want != got:
            failures.append(report(case, want, got))
    stray = _ram_differences(oracle.ram(), popek.ram())
    assert not failures and not stray, (
        f"{len(failures)} of {count} {kind} cases diverge from unicorn"
        f" (seed {_seed(request.config)!r}, chunk {chunk}); the first ones:\n\n"
        + "\n\n".join(failures[:SHOWN_FAILURES]) + "".join(f"\n{s}" for s in stray)
    )


# --- coverage of the declarations -----------------------------------------------------------


def _decoder() -> Callable[[int, int], str | None]:
    """What the declarations make of an encoding: the most specific pattern wins."""
    table32 = sorted(((i.mask, i.match, i.name) for i in ALL_INSNS),
                     key=lambda t: -bin(t[0]).count("1"))
    table16 = sorted(((c.mask, c.match, c) for c in CINSNS), key=lambda t: -bin(t[0]).count("1"))

    def decode(word: int, length: int) -> str | None:
        if length == 4:
            return next((n for m, v, n in table32 if word & m == v), None)
        c = next(c for m, v, c in table16 if word & m == v)
        expansion = c.expand(word)
        return expansion[0] if expansion else None

    return decode


def test_every_non_privileged_instruction_has_cases(request: pytest.FixtureRequest) -> None:
    planned = {k for k, _, _ in plan(_total(request.config))}
    executed = {kinds()[k].insn.name for k in planned}
    missing = [i.name for i in ALL_INSNS if i.ext not in EXCLUDED_EXTS and i.name not in executed]
    assert not missing, f"declared but never tested: {missing}"
    compressed = {kinds()[k].cinsn.name for k in planned if kinds()[k].cinsn}
    assert compressed == {c.name for c in CINSNS}


def test_generated_words_decode_to_their_instruction() -> None:
    decode = _decoder()
    for kind in kinds().values():
        for case in generate(kind, 30, f"decode:{kind.name}"):
            for ins, word, length in case.words:
                assert decode(word, length) == ins.name, (kind.name, hex(word))


def test_fp_cases_cross_every_rounding_setting() -> None:
    settings = set()
    for case in generate(kinds()["fadd.d"], 400, "rm"):
        rm = case.operands[3]
        settings.add((rm, case.fcsr >> 5 if rm == 7 else None))
    valid = {(rm, None) for rm in range(5)} | {(7, frm) for frm in range(5)}
    reserved = {(5, None), (6, None)} | {(7, frm) for frm in range(5, 8)}
    assert valid < settings <= valid | reserved and settings & reserved


# --- the oracle itself follows the specification where QEMU 5.0 does not ------------------

ONE_S, TWO_S, CANON_S = 0xFFFF_FFFF_3F80_0000, 0xFFFF_FFFF_4000_0000, 0xFFFF_FFFF_7FC0_0000


def _case(kind: str, *values: int, fcsr: int = 0) -> Case:
    """A generated case of ``kind`` with distinct registers and its FP sources set to
    ``values`` (chosen so that the rounding mode does not matter)."""
    case = next(c for c in generate(kinds()[kind], 50, "oracle")
                if len({r for _, r, _ in c.srcs} | {c.frd}) == len(c.srcs) + 1)
    for (_, reg, _), value in zip(case.srcs, values, strict=True):
        case.f[reg] = value
    case.fcsr = fcsr
    return case


def test_oracle_nan_boxes_single_results(oracle: UnicornOracle) -> None:
    case = _case("fadd.s", ONE_S, ONE_S)
    assert oracle.run(case).f[case.frd] == TWO_S


def test_oracle_reads_an_unboxed_single_as_the_canonical_nan(oracle: UnicornOracle) -> None:
    case = _case("fadd.s", ONE_S & 0xFFFF_FFFF, ONE_S)
    out = oracle.run(case)
    assert out.f[case.frd] == CANON_S
    assert out.f[case.srcs[0][1]] == ONE_S & 0xFFFF_FFFF  # the source register is untouched


def test_oracle_fmin_of_a_signalling_nan_is_the_number(oracle: UnicornOracle) -> None:
    case = _case("fmin.s", 0xFFFF_FFFF_7F80_0001, TWO_S)
    out = oracle.run(case)
    assert (out.f[case.frd], out.fcsr) == (TWO_S, 0x10)


def test_oracle_fma_of_infinity_times_zero_is_invalid_even_plus_a_quiet_nan(
        oracle: UnicornOracle) -> None:
    case = _case("fmadd.d", 0x7FF0_0000_0000_0000, 0, 0x7FF8_0000_0000_0000)
    out = oracle.run(case)
    assert (out.f[case.frd], out.fcsr) == (0x7FF8_0000_0000_0000, 0x10)


# --- failure reports ------------------------------------------------------------------------

FLAG_NAMES = ("NX", "UF", "OF", "DZ", "NV")


def _fcsr(v: int) -> str:
    flags = " ".join(n for i, n in enumerate(FLAG_NAMES) if v >> i & 1) or "-"
    return f"0x{v:02x} (frm={ROUNDING_MODES[v >> 5 & 7]} flags={flags})"


def _x(v: int) -> str:
    return f"0x{v:016x} ({v - (1 << 64) if v >> 63 else v})"


def _f(v: int, precision: str = "") -> str:
    """Raw bits and the value they hold for the precision that reads them."""
    boxed = v >> 32 == 0xFFFF_FFFF
    if precision == "d" or not precision and not boxed:
        return f"0x{v:016x} (double {struct.unpack('<d', struct.pack('<Q', v))[0]!r})"
    if not boxed:
        return f"0x{v:016x} (a single not NaN-boxed)"
    return f"0x{v:016x} (single {struct.unpack('<f', struct.pack('<I', v & 0xFFFF_FFFF))[0]!r})"


def _trap(t: int | None) -> str:
    if t is None:
        return "none"
    return f"mcause {t}" if t >= 0 else f"unicorn error {-t}"


def report(case: Case, want: Outcome, got: Outcome) -> str:
    """The instruction, its operands, and every difference, reference first."""
    lines = [f"{case.kind} at pc 0x{case.pc:x}:"]
    for i, (ins, word, length) in enumerate(case.words):
        rd, rs1, rs2, imm = ins.operands(word) if i else case.operands
        text = (f"  {ins.name} (0x{word:0{2 * length}x}): rd={rd} rs1={rs1} rs2={rs2}"
                f" imm={imm}")
        if ins.fmt in ("RM", "R4"):
            text += f" rm={ROUNDING_MODES[imm >> 5 if ins.fmt == 'R4' else imm]}"
        lines.append(text)
    for cls, reg, precision in case.srcs:
        v = case.x[reg] if cls == "x" else case.f[reg]
        lines.append(f"  {cls}{reg} = {_x(v) if cls == 'x' else _f(v, precision)}")
    lines.append(f"  fcsr = {_fcsr(case.fcsr)}")
    if case.window:
        lines.append(f"  memory 0x{case.window:x}: {case.data.hex()}")
    lines.append("  differences (unicorn | popek):")
    if want.trap != got.trap:
        lines.append(f"    trap: {_trap(want.trap)} | {_trap(got.trap)}")
    if want.pc != got.pc:
        lines.append(f"    pc: {want.pc and hex(want.pc)} | {got.pc and hex(got.pc)}")
    for i, (a, b) in enumerate(zip(want.x, got.x, strict=True)):
        if a != b:
            lines.append(f"    x{i}: {_x(a)} | {_x(b)}")
    for i, (a, b) in enumerate(zip(want.f, got.f, strict=True)):
        if a != b:
            p = case.fp_dest if i == case.frd else ""
            lines.append(f"    f{i}: {_f(a, p)} | {_f(b, p)}")
    if want.fcsr != got.fcsr:
        lines.append(f"    fcsr: {_fcsr(want.fcsr)} | {_fcsr(got.fcsr)}")
    if want.data != got.data:
        lines.append(f"    memory: {want.data.hex()} | {got.data.hex()}")
    return "\n".join(lines)


def _ram_differences(want: bytes, got: bytes) -> list[str]:
    """Writes outside the cases' windows (at most a few, by 8-byte word)."""
    if want == got:
        return []
    words = [a for a in range(0, RAM_SIZE, 8) if want[a:a + 8] != got[a:a + 8]]
    return [f"RAM 0x{RAM_BASE + a:x}: {want[a:a + 8].hex()} | {got[a:a + 8].hex()}"
            for a in words[:SHOWN_FAILURES]] + [f"({len(words)} RAM words differ)"]
