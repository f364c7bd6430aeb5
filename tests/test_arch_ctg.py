"""Architectural tests that riscv-ctg (PyPI) generates, under ``--bios none`` on every
tier, against qemu-system-riscv64 running the same ELFs.

riscv-ctg is the RISC-V architecture test generator: from a coverage description (CGF,
written here: which instructions, which register overlaps, which operand values) it
writes assembly tests with its own test macros (its ``arch_test.h``) and the results
its own model of each instruction computes. popek's ``model_test.h`` (the target's half
of that interface) checks every result against that value as the test runs and prints
the test's signature (every result it stored) on the UART, so each test has two
oracles no one here wrote: riscv-ctg's expected values, and QEMU's signature.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from popek.engine.engine import TIERS
from popek.machine.config import MIN_RAM, MachineConfig
from popek.machine.virt import SLICE, VirtMachine
from tests.vmm_guests import GCC

# Operand values as the CGF states them, from the datasets riscv-ctg's solver draws from
# (extremes, -1, small numbers, walking ones, alternating bits), signed or unsigned as the
# instruction reads its operands. A handful of instructions, those where emulators slip
# (upper halves of products, division corner cases, 32-bit forms): riscv-ctg takes about
# a second of CPU per instruction.
MIN64, MAX64 = -(1 << 63), (1 << 63) - 1
ALL64, TOP64 = (1 << 64) - 1, 1 << 63
FIVES, TENS = 0x5555555555555555, 0xAAAAAAAAAAAAAAAA
SIGNED = [(0, 0), (-1, -1), (MIN64, -1), (MAX64, 1), (-7, 3), (7, -3), (FIVES, -FIVES - 1),
          (-(1 << 31), -1), (8, 0), (MAX64, MAX64)]
UNSIGNED = [(0, 0), (ALL64, ALL64), (TOP64, ALL64), (FIVES, TENS), (1 << 32, 3), (7, 0),
            (ALL64, 2), (5, 1 << 32)]
SIGNED_UNSIGNED = [(-1, ALL64), (MIN64, ALL64), (-7, 3), (MAX64, TOP64), (FIVES, TENS),
                   (0, ALL64), (MIN64, 0)]
SHIFT32 = [(-1, 0), (-1, 1), (-(1 << 31), 31), (FIVES, 16), (MAX64, 8), (-9, 3), (1 << 31, 1)]
IMM12 = [(0, 0), (-1, -1), (MIN64, -2048), (MAX64, 2047), ((1 << 31) - 1, 1), (1 << 31, -1),
         (FIVES, -1366)]
# instruction: (its operands, the values of (rs1, rs2 or imm), the extension)
OPS = {
    "mulh": ("rs2", SIGNED, "M"), "mulhsu": ("rs2", SIGNED_UNSIGNED, "M"),
    "mulhu": ("rs2", UNSIGNED, "M"), "divu": ("rs2", UNSIGNED, "M"),
    "remw": ("rs2", SIGNED, "M"), "sraw": ("rs2", SHIFT32, "I"),
    "srliw": ("imm", SHIFT32, "I"), "addiw": ("imm", IMM12, "I"),
}

MODEL_TEST_H = r"""
/* popek's side of riscv-ctg's test interface, for QEMU virt with -bios none: M-mode from
 * reset, hart 0 runs the test, every result checked against riscv-ctg's value, the
 * signature printed as one 64-bit hex word a line, then the test finisher: 0x5555 when
 * every check held, 0x13333 (exit status 1) at the first that did not. */
#define XLEN 64
#define FLEN 64
#define RVMODEL_BOOT \
  csrr t0, mhartid; \
  beqz t0, 2f; \
1: wfi; \
  j 1b; \
2:
#define RVMODEL_HALT \
  la s0, begin_signature; \
  la s1, end_signature; \
  li s2, 0x10000000; \
1: bgeu s0, s1, 4f; \
  ld s3, 0(s0); \
  li s4, 60; \
2: srl s5, s3, s4; \
  andi s5, s5, 15; \
  addi s5, s5, 48; \
  li s6, 57; \
  ble s5, s6, 3f; \
  addi s5, s5, 39; \
3: sb s5, 0(s2); \
  addi s4, s4, -4; \
  bgez s4, 2b; \
  li s5, 10; \
  sb s5, 0(s2); \
  addi s0, s0, 8; \
  j 1b; \
4: li t0, 0x100000; \
  li t1, 0x5555; \
  sw t1, 0(t0); \
  j 4b;
#define RVMODEL_DATA_BEGIN .align 4; .global begin_signature; begin_signature:
#define RVMODEL_DATA_END .align 4; .global end_signature; end_signature:
#define RVMODEL_IO_INIT
#define RVMODEL_IO_WRITE_STR(_R, _STR)
#define RVMODEL_IO_CHECK()
#define RVMODEL_IO_ASSERT_GPR_EQ(_S, _R, _I) \
  li _S, _I; \
  beq _S, _R, 5f; \
  li _S, 0x100000; \
  li _R, 0x13333; \
  sw _R, 0(_S); \
6: j 6b; \
5:
#define RVMODEL_IO_ASSERT_SFPR_EQ(_F, _R, _I)
#define RVMODEL_IO_ASSERT_DFPR_EQ(_D, _R, _I)
#define RVMODEL_SET_MSW_INT
#define RVMODEL_CLEAR_MSW_INT
#define RVMODEL_CLEAR_MTIMER_INT
#define RVMODEL_CLEAR_MEXT_INT
"""

LINK_LD = """
OUTPUT_ARCH("riscv")
ENTRY(rvtest_entry_point)
SECTIONS {
  . = 0x80000000;
  .text.init : { *(.text.init) }
  .text : { *(.text) }
  . = ALIGN(0x1000);
  .data : { *(.data) }
  .bss : { *(.bss) }
}
"""


def _cgf() -> str:
    """The coverage description: for each instruction, its operand values and a register
    overlap (rd the same as rs1), with x0 among the destinations."""
    lines = []
    for op, (second, values, extension) in OPS.items():
        lines += [f"{op}:", "  config:", f"    - check ISA:=regex(.*{extension}.*)",
                  "  mnemonics:", f"    {op}: 0"]
        regs = {"rs1": ("x5", "x10"), "rs2": ("x6", "x11"), "rd": ("x0", "x10", "x12")}
        for name in ("rs1", "rs2", "rd") if second == "rs2" else ("rs1", "rd"):
            lines += [f"  {name}:", *(f"    {r}: 0" for r in regs[name])]
        same = "rs1 == rd != rs2" if second == "rs2" else "rs1 == rd"
        lines += ["  op_comb:", f"    '{same}': 0", "  val_comb:",
                  *(f"    'rs1_val == {a} and {second}_val == {b}': 0" for a, b in values)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tests(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """riscv-ctg's tests, built: one ELF per instruction."""
    ctg = Path(sys.prefix) / "tools" / "riscv-ctg" / "bin" / "riscv_ctg"
    if not ctg.exists():
        pytest.fail(f"{ctg} is missing: ./quickstart test installs it (riscv-ctg, PyPI)")
    if shutil.which(GCC) is None:
        pytest.fail(f"{GCC} is missing: apt-get install gcc-riscv64-linux-gnu (./quickstart)")
    work = tmp_path_factory.mktemp("ctg")
    (work / "popek.cgf").write_text(_cgf())
    (work / "model_test.h").write_text(MODEL_TEST_H)
    (work / "link.ld").write_text(LINK_LD)
    subprocess.run([str(ctg), "-cf", str(work / "popek.cgf"), "-d", str(work / "out"),
                    "-bi", "rv64i", "-p", "1"], check=True, capture_output=True, timeout=600)
    elves = []
    for source in sorted((work / "out").glob("*.S")):
        elf = work / source.stem
        subprocess.run([GCC, "-march=rv64im_zicsr", "-mabi=lp64", "-static", "-mcmodel=medany",
                        "-nostdlib", "-nostartfiles", "-fno-pic", "-no-pie",
                        "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-DXLEN=64",
                        *(f"-DTEST_CASE_{n}=True" for n in range(1, 4)),
                        f"-I{work}", f"-I{work / 'out' / 'env'}", f"-T{work / 'link.ld'}",
                        str(source), "-o", str(elf)], check=True, capture_output=True)
        elves.append(elf)
    return elves


@pytest.fixture(scope="module")
def qemu_signatures(tests: list[Path]) -> dict[str, str]:
    signatures = {}
    for elf in tests:
        done = subprocess.run(["qemu-system-riscv64", "-M", "virt", "-bios", "none",
                               "-kernel", str(elf), "-display", "none", "-serial", "stdio",
                               "-monitor", "none"], capture_output=True, timeout=60)
        assert done.returncode == 0, f"{elf.name} fails on QEMU: {done.stdout[-200:]!r}"
        signatures[elf.name] = done.stdout.decode()
    return signatures


def test_every_instruction_has_its_cases(tests: list[Path]) -> None:
    """riscv-ctg leaves out a coverpoint it cannot satisfy: every operand pair above must
    be in its datasets, or the test below would quietly check less."""
    assert sorted(elf.name.rsplit("-", 1)[0] for elf in tests) == sorted(OPS)
    for elf in tests:
        cases = (elf.parent / "out" / f"{elf.name}.S").read_text().count("\ninst_")
        assert cases >= len(OPS[elf.name.rsplit("-", 1)[0]][1]), elf.name


@pytest.mark.parametrize("tier", TIERS)
def test_riscv_ctg_tests_pass_and_sign_as_on_qemu(tests: list[Path],
                                                  qemu_signatures: dict[str, str],
                                                  tier: str) -> None:
    for elf in tests:
        out = bytearray()
        machine = VirtMachine(MachineConfig(kernel=elf, bios="none", mem=MIN_RAM, rng=False,
                                            agent=False, engine=tier), out.extend)
        for _ in range(10_000_000 // SLICE):
            if machine.exit is not None:
                break
            machine.run_slice()
        machine.close()
        assert machine.exit == ("poweroff", 0), f"{elf.name}: {machine.exit}"
        assert out.decode() == qemu_signatures[elf.name], elf.name
