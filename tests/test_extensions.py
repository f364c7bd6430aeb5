"""The extensions beyond RV64GC, each instruction against its specification, on every tier.

Expected values are worked out from the specifications' definitions (the ratified Zb*,
Zicond and CMO specifications, privileged spec 1.12 with Sstc), never taken from popek:
edge operands of every instruction, the encodings around them that must stay illegal,
cache-block operations' permissions and faults, and the supervisor timer compare. The
programs loop, with the tier-up thresholds lowered, so translated and native code run them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import bitmanip_program
import pytest
from rvasm import CLOCK, RAM_BASE, WFI, assemble, code, csrr, load, make_hart

from popek.cpu import csr as C
from popek.cpu.causes import (
    ILLEGAL_INSN,
    IRQ_S_TIMER,
    STORE_ACCESS,
    STORE_PAGE_FAULT,
    Trap,
)
from popek.cpu.hart import Hart
from popek.cpu.pagewalk import PTE_A, PTE_D, PTE_R, PTE_V, PTE_W, PTE_X
from popek.cpu.physmem import PhysicalMemory
from popek.cpu.pmp import A_NAPOT, PMP_A_SHIFT, PMP_R, PMP_X, PMPADDR0, PMPCFG0
from popek.cpu.state import PRIV_M, PRIV_S, PRIV_U
from popek.engine import engine as engine_module
from popek.isa import rv64b
from popek.machine.config import MachineConfig
from popek.machine.virt import VirtMachine
from tests.vmm_guests import guest

TIERS = ("interp", "translate", "jit")
M64 = (1 << 64) - 1
MIN, MAX = 1 << 63, (1 << 63) - 1
BASE = RAM_BASE
DATA = RAM_BASE + 0x8000
HANDLER = RAM_BASE + 0x7000
MEPC, MCAUSE, MTVAL, MTVEC, MSTATUS = 0x341, 0x342, 0x343, 0x305, 0x300
ARCH = ".option arch, +zba, +zbb, +zbc, +zbs, +zicbom, +zicboz, +zicbop, +zihintpause\n"


@pytest.fixture(autouse=True)
def eager_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "HOT_AFTER", 2)
    monkeypatch.setattr(engine_module, "NATIVE_AFTER", 2)
    monkeypatch.setattr(engine_module, "PATCHED_NATIVE_AFTER", 4)


def run(tier: str, program: bytes, priv: int = PRIV_M) -> Hart:
    """Run ``program`` at BASE in mode ``priv`` until it ends in the trap handler's WFI."""
    hart = Hart(PhysicalMemory(RAM_BASE, 1 << 20), engine=tier, clock=lambda: CLOCK)
    hart.mem.write(BASE, program)
    load(hart, HANDLER, WFI)
    hart.csr[MTVEC] = HANDLER
    hart.x[8] = DATA  # s0
    hart.priv = priv
    hart.pc = BASE
    for _ in range(100_000):
        hart.run(50)
        hart.engine.finish_compiles()
        if hart.waiting:
            return hart
    raise AssertionError("the program did not reach the trap handler")


# -- instruction semantics ---------------------------------------------------------------------
# (assembly with a0 = op(a1, a2), a1, a2, the result the specification defines)
CASES = [
    # Zba: shifted adds wrap; .uw forms take the zero-extended low word of rs1.
    ("sh1add a0, a1, a2", 0x8000_0000_0000_0001, 5, 7),
    ("sh2add a0, a1, a2", 1, 1, 5),
    ("sh3add a0, a1, a2", M64, 0, M64 - 7),
    ("add.uw a0, a1, a2", 0xFFFF_FFFF_8000_0000, 1, 0x8000_0001),
    ("sh1add.uw a0, a1, a2", 0xFFFF_FFFF_8000_0000, 0, 0x1_0000_0000),
    ("sh2add.uw a0, a1, a2", 0x1_0000_0003, 4, 16),
    ("sh3add.uw a0, a1, a2", M64, 0, 0x7_FFFF_FFF8),
    ("slli.uw a0, a1, 63", 0xFFFF_FFFF_8000_0001, 0, MIN),
    ("slli.uw a0, a1, 32", M64, 0, 0xFFFF_FFFF_0000_0000),
    ("zext.w a0, a1", 0xDEAD_BEEF_8765_4321, 0, 0x8765_4321),
    # Zbb: logic with negation.
    ("andn a0, a1, a2", 0xFF00, 0x0FF0, 0xF000),
    ("orn a0, a1, a2", 0, 0, M64),
    ("xnor a0, a1, a2", 0x5555_5555_5555_5555, 0xAAAA_AAAA_AAAA_AAAA, 0),
    # Counts: of zero they are the width.
    ("clz a0, a1", 0, 0, 64),
    ("clz a0, a1", 1, 0, 63),
    ("clz a0, a1", M64, 0, 0),
    ("clzw a0, a1", 0xFFFF_FFFF_0000_0000, 0, 32),
    ("clzw a0, a1", 0x1_0000_8000, 0, 16),
    ("ctz a0, a1", 0, 0, 64),
    ("ctz a0, a1", MIN, 0, 63),
    ("ctzw a0, a1", MIN, 0, 32),  # the low word is zero (QEMU 7.2 answers 63)
    ("ctzw a0, a1", 0x0012_3456_0000_0000, 0, 32),
    ("ctzw a0, a1", 0x10, 0, 4),
    ("cpop a0, a1", M64, 0, 64),
    ("cpopw a0, a1", M64, 0, 32),
    ("cpop a0, a1", 0x8000_0000_0000_0101, 0, 3),
    # Signed and unsigned minimum and maximum.
    ("max a0, a1, a2", M64, 1, 1),
    ("maxu a0, a1, a2", M64, 1, M64),
    ("min a0, a1, a2", M64, 1, M64),
    ("minu a0, a1, a2", M64, 1, 1),
    ("max a0, a1, a2", MIN, MAX, MAX),
    ("min a0, a1, a2", MIN, MAX, MIN),
    # Sign and zero extension.
    ("sext.b a0, a1", 0x80, 0, M64 - 0x7F),
    ("sext.b a0, a1", 0x1234_567F, 0, 0x7F),
    ("sext.h a0, a1", 0x1234_8000, 0, M64 - 0x7FFF),
    ("zext.h a0, a1", 0xFFFF_FFFF_FFFF_8001, 0, 0x8001),
    # Rotations: amounts modulo the width; the W forms rotate the low word, sign-extended.
    ("rol a0, a1, a2", 0x8000_0000_0000_0001, 1, 3),
    ("rol a0, a1, a2", 0x0123_4567_89AB_CDEF, 64, 0x0123_4567_89AB_CDEF),
    ("ror a0, a1, a2", 1, 1, MIN),
    ("ror a0, a1, a2", 1, 65, MIN),
    ("rori a0, a1, 4", 0x0123_4567_89AB_CDEF, 0, 0xF012_3456_789A_BCDE),
    ("rori a0, a1, 0", 0x0123_4567_89AB_CDEF, 0, 0x0123_4567_89AB_CDEF),
    ("rolw a0, a1, a2", 0x8000_0001, 1, 3),
    ("rolw a0, a1, a2", 0xFFFF_FFFF_4000_0000, 33, 0xFFFF_FFFF_8000_0000),
    ("rorw a0, a1, a2", 1, 1, 0xFFFF_FFFF_8000_0000),
    ("roriw a0, a1, 4", 0x10, 0, 1),
    ("roriw a0, a1, 1", 0xDEAD_BEEF_0000_0001, 0, 0xFFFF_FFFF_8000_0000),
    ("roriw a0, a1, 0", 0x8000_0000, 0, 0xFFFF_FFFF_8000_0000),
    # Bytes.
    ("orc.b a0, a1", 0x0001_0000_00FF_0100, 0, 0x00FF_0000_00FF_FF00),
    ("orc.b a0, a1", 0, 0, 0),
    ("rev8 a0, a1", 0x0123_4567_89AB_CDEF, 0, 0xEFCD_AB89_6745_2301),
    # Zbc: (x + 1)^2 = x^2 + 1; all ones squared has every even power of x.
    ("clmul a0, a1, a2", 3, 3, 5),
    ("clmul a0, a1, a2", M64, M64, 0x5555_5555_5555_5555),
    ("clmulh a0, a1, a2", M64, M64, 0x5555_5555_5555_5555),
    ("clmulr a0, a1, a2", M64, M64, 0xAAAA_AAAA_AAAA_AAAA),
    ("clmulh a0, a1, a2", MIN, MIN, 1 << 62),
    ("clmulr a0, a1, a2", MIN, MIN, MIN),
    ("clmulh a0, a1, a2", 0x1234, 0x5678, 0),
    # Zbs: bit indexes modulo 64.
    ("bclr a0, a1, a2", M64, 63, MAX),
    ("bclr a0, a1, a2", M64, 67, M64 - 8),
    ("bext a0, a1, a2", MIN, 63, 1),
    ("bext a0, a1, a2", MIN, 127, 1),
    ("bext a0, a1, a2", MIN, 62, 0),
    ("binv a0, a1, a2", 0, 0, 1),
    ("binv a0, a1, a2", M64, 64, M64 - 1),
    ("bset a0, a1, a2", 0, 32, 1 << 32),
    ("bclri a0, a1, 63", M64, 0, MAX),
    ("bexti a0, a1, 63", MIN, 0, 1),
    ("binvi a0, a1, 31", 0, 0, 1 << 31),
    ("bseti a0, a1, 0", 2, 0, 3),
    # Zicond (binutils 2.40 has no mnemonics: czero.eqz/czero.nez by encoding).
    (".insn r 0x33, 5, 7, a0, a1, a2", 0x1234, 0, 0),  # czero.eqz
    (".insn r 0x33, 5, 7, a0, a1, a2", 0x1234, MIN, 0x1234),
    (".insn r 0x33, 7, 7, a0, a1, a2", 0x1234, 0, 0x1234),  # czero.nez
    (".insn r 0x33, 7, 7, a0, a1, a2", 0x1234, 1, 0),
]


@pytest.mark.parametrize("tier", TIERS)
def test_every_instruction_gives_the_specifications_result(tier: str) -> None:
    lines = ["li s1, 5", "1:"]  # five passes: the later ones run translated, then native
    for k, (op, a, b, _) in enumerate(CASES):
        lines += [f"li a1, {a:#x}", f"li a2, {b:#x}", "li a0, 0x5a5a", op, f"sd a0, {8 * k}(s0)"]
    lines += ["addi s1, s1, -1", "bnez s1, 1b", "ecall"]
    hart = run(tier, assemble(ARCH + "\n".join(lines)))
    assert hart.csr[MCAUSE] == 11  # the final ecall, nothing before it
    if tier == "jit":
        native = {d.insn.name for b in hart.engine.blocks.values() if b.native is not None
                  for d in b.decoded}
        assert {i.name for i in rv64b.INSNS} <= native
    got = [hart.mem.load(DATA + 8 * k, 8) for k in range(len(CASES))]
    wrong = [(op, hex(a), hex(b), hex(want), hex(have))
             for (op, a, b, want), have in zip(CASES, got, strict=True) if want != have]
    assert not wrong


# Encodings in the same opcode spaces that no implemented extension defines.
RESERVED = [
    0x60359513,  # OP-IMM funct7 0110000 rs2=3: between cpop (2) and sext.b (4)
    0x6035951B,  # the same in OP-IMM-32
    0x6985D513,  # rev8 as RV32 encodes it
    0x2885D513,  # orc.b's neighbour
    0x0815C53B,  # packw (Zbkb): zext.h needs rs2 = 0
    0x6405D513,  # funct6 011001 in OP-IMM funct3 101
    0x0C35951B,  # funct6 000011 beside slli.uw
    0x0035200F,  # cbo with funct12 = 3
    0x0015208F,  # cbo.clean with rd != 0
    0x0AC58533,  # funct7 0000101 funct3 000 (the min/max/clmul group)
    0x0EC59533,  # funct7 0000111 funct3 001 (the czero group)
    0x48C58533,  # funct7 0100100 funct3 000 (the bclr/bext group)
    0x0605D51B,  # funct7 0000011 in OP-IMM-32 funct3 101
]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("word", RESERVED, ids=hex)
def test_reserved_encodings_are_illegal_with_their_bits_in_tval(tier: str, word: int) -> None:
    hart = run(tier, code(word))
    assert (hart.csr[MCAUSE], hart.csr[MTVAL], hart.csr[MEPC]) == (ILLEGAL_INSN, word, BASE)


def test_hints_of_zihintpause_and_zicbop_do_nothing() -> None:
    source = ARCH + "pause\nprefetch.i 64(s0)\nprefetch.r -32(a1)\nprefetch.w 0(zero)\necall\n"
    hart = run("interp", assemble(source))  # a1 = 0: a prefetch never faults
    assert (hart.csr[MCAUSE], hart.csr[MEPC]) == (11, BASE + 16)


# -- cache-block operations ---------------------------------------------------------------------
CBO = {"clean": 0x0010200F, "flush": 0x0020200F, "inval": 0x0000200F, "zero": 0x0040200F}


def cbo(name: str, rs1: int) -> int:
    return CBO[name] | rs1 << 15


@pytest.mark.parametrize("tier", TIERS)
def test_cbo_zero_zeroes_the_64_byte_block_holding_the_address(tier: str) -> None:
    program = assemble(ARCH + "li t0, 3\n1: addi a0, s0, 0x47\ncbo.zero (a0)\n"
                              "addi t0, t0, -1\nbnez t0, 1b\necall")
    hart = Hart(PhysicalMemory(RAM_BASE, 1 << 20), engine=tier)
    hart.mem.write(DATA, bytes(range(1, 193)))
    hart.mem.write(BASE, program)
    load(hart, HANDLER, WFI)
    hart.csr[MTVEC] = HANDLER
    hart.x[8] = DATA
    hart.pc = BASE
    for _ in range(1000):
        hart.run(50)
        hart.engine.finish_compiles()
        if hart.waiting:
            break
    assert hart.csr[MCAUSE] == 11
    assert hart.mem.read(DATA, 192) == bytes(range(1, 65)) + bytes(64) + bytes(range(129, 193))


def test_cbo_zero_over_code_drops_the_code_translated_from_it() -> None:
    hart = make_hart()
    block = RAM_BASE + 0x1000
    load(hart, block, *[0x00150513] * 15, 0x00008067)  # a0 += 1, fifteen times; ret
    load(hart, HANDLER, WFI)
    hart.csr[MTVEC] = HANDLER
    # auipc t0, 1; jalr t0 (the block); cbo.zero (t0); jalr t0 again
    load(hart, RAM_BASE, 0x00001297, 0x000280E7, cbo("zero", 5), 0x000280E7)
    hart.pc = RAM_BASE
    for _ in range(100):
        hart.run(50)
        if hart.waiting:
            break
    # The block ran once (a0 = 15), was zeroed, and its first word is now illegal.
    assert (hart.x[10], hart.csr[MCAUSE], hart.csr[MEPC]) == (15, ILLEGAL_INSN, block)


def step(hart: Hart, word: int, priv: int) -> Trap | None:
    """Execute one instruction at RAM_BASE in mode ``priv``; the trap it raised, if any."""
    load(hart, RAM_BASE, word)
    hart.priv = priv
    hart.pc = RAM_BASE
    seen: list[Trap] = []
    hart.on_trap = lambda cause, tval, pc: seen.append(Trap(cause, tval)) or pc + 4
    hart.step()
    return seen[0] if seen else None


@pytest.mark.parametrize("name, field", [
    ("zero", C.ENVCFG_CBZE), ("clean", C.ENVCFG_CBCFE), ("flush", C.ENVCFG_CBCFE),
    ("inval", C.ENVCFG_CBIE)])
def test_cbo_below_m_mode_needs_menvcfg_and_in_u_mode_senvcfg(name: str, field: int) -> None:
    hart = make_hart()
    hart.x[11] = DATA
    word = cbo(name, 11)
    assert step(hart, word, PRIV_M) is None  # M-mode may always
    for priv, menvcfg, senvcfg, allowed in [
            (PRIV_S, 0, field, False), (PRIV_S, field, 0, True), (PRIV_U, field, 0, False),
            (PRIV_U, 0, field, False), (PRIV_U, field, field, True)]:
        hart.csr[C.MENVCFG], hart.csr[C.SENVCFG] = menvcfg, senvcfg
        trap = step(hart, word, priv)
        if allowed:
            assert trap is None, (priv, menvcfg, senvcfg)
        else:
            assert (trap.cause, trap.tval) == (ILLEGAL_INSN, word), (priv, menvcfg, senvcfg)


def test_cbie_holds_no_reserved_value_and_01_lets_inval_flush() -> None:
    hart = make_hart()
    hart.csrs.op(C.MENVCFG, 0, 1 << 4, False, True)  # CBIE = 01: inval performs a flush
    hart.csrs.op(C.MENVCFG, 0, 2 << 4, False, True)  # 10 is reserved: WARL keeps 01
    assert hart.csr[C.MENVCFG] & C.ENVCFG_CBIE == 1 << 4
    hart.x[11] = DATA
    assert step(hart, cbo("inval", 11), PRIV_S) is None


def translated_hart(flags: int) -> Hart:
    """A hart whose S-mode runs its code from an identity-mapped gigapage, with the page
    at 0x4000_0000 mapping DATA with ``flags`` (Sv39)."""
    hart = make_hart()
    tables = RAM_BASE + 0x20_0000
    hart.mem.store(tables + 2 * 8, 8, (RAM_BASE >> 12) << 10 | PTE_V | PTE_R | PTE_X | PTE_A)
    hart.mem.store(tables + 1 * 8, 8, ((tables + 0x1000) >> 12) << 10 | PTE_V)
    hart.mem.store(tables + 0x1000, 8, ((tables + 0x2000) >> 12) << 10 | PTE_V)
    hart.mem.store(tables + 0x2000, 8, (DATA >> 12) << 10 | flags)
    hart.csr[C.SATP] = C.SATP_SV39 << 60 | tables >> 12
    hart.csr[C.MENVCFG] = C.ENVCFG_CBZE | C.ENVCFG_CBCFE | C.ENVCFG_CBIE
    hart.x[11] = 0x4000_0000 + 0x88  # inside the page's third block
    return hart


@pytest.mark.parametrize("name", ["zero", "clean", "flush", "inval"])
def test_cbo_without_a_mapping_is_a_store_page_fault_at_the_address_in_rs1(name: str) -> None:
    trap = step(translated_hart(PTE_V), cbo(name, 11), PRIV_S)  # V only: reserved leaf
    assert (trap.cause, trap.tval) == (STORE_PAGE_FAULT, 0x4000_0088)


def test_cbo_zero_needs_write_permission_but_clean_a_read_is_enough() -> None:
    hart = translated_hart(PTE_V | PTE_R | PTE_A)
    trap = step(hart, cbo("zero", 11), PRIV_S)
    assert (trap.cause, trap.tval) == (STORE_PAGE_FAULT, 0x4000_0088)
    assert step(hart, cbo("clean", 11), PRIV_S) is None
    hart = translated_hart(PTE_V | PTE_X | PTE_A)  # execute-only: no load, no store
    assert step(hart, cbo("flush", 11), PRIV_S).cause == STORE_PAGE_FAULT
    hart = translated_hart(PTE_V | PTE_R | PTE_W | PTE_A | PTE_D)
    hart.mem.write(DATA + 0x80, b"\xff" * 64)
    assert step(hart, cbo("zero", 11), PRIV_S) is None
    assert hart.mem.read(DATA + 0x80, 64) == bytes(64)


def test_cbo_zero_where_pmp_forbids_writes_is_a_store_access_fault() -> None:
    hart = make_hart()
    hart.csrs.op(PMPADDR0, 0, (DATA | 0x7FF) >> 2, False, True)  # 4 KiB at DATA: read-only
    hart.csrs.op(PMPADDR0 + 1, 0, M64 >> 10, False, True)  # everything else: RX (code)
    na = A_NAPOT << PMP_A_SHIFT
    hart.csrs.op(PMPCFG0, 0, (PMP_R | na) | (PMP_R | PMP_X | na) << 8, False, True)
    hart.csr[C.MENVCFG] = C.ENVCFG_CBZE
    hart.x[11] = DATA + 0x44
    trap = step(hart, cbo("zero", 11), PRIV_S)
    assert (trap.cause, trap.tval) == (STORE_ACCESS, DATA + 0x44)


USER_CBO = r"""
#include <stdio.h>
static char buf[256] __attribute__((aligned(64)));
int main(void) {
    for (int i = 0; i < 256; i++) buf[i] = i | 1;
    __asm__ volatile(".option arch, +zicboz\ncbo.zero (%0)" : : "r"(buf + 70) : "memory");
    __asm__ volatile(".option arch, +zicbop\nprefetch.w 0(%0)" : : "r"(buf + 300));
    int zeros = 0;
    for (int i = 0; i < 256; i++) zeros += buf[i] == 0;
    printf("%d zero bytes, then %d and %d\n", zeros, buf[63], buf[128]);
    return 0;
}
"""


def test_user_programs_may_zero_cache_blocks(tmp_path: Path) -> None:
    # qemu-riscv64 7.2 has no Zicboz to compare with; Linux lets user space use cbo.zero.
    done = run_c(tmp_path, USER_CBO)
    assert (done.returncode, done.stdout) == (0, "64 zero bytes, then 63 and 129\n"), done.stderr


HWPROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
struct pair { long key; unsigned long value; };
int main(void) {
    struct pair pairs[] = {{3, 7}, {4, 7}, {6, 7}, {99, 7}, {0, 7}};
    long rc = syscall(258, pairs, 5, 0, NULL, 0);  /* riscv_hwprobe */
    printf("%ld", rc);
    for (int i = 0; i < 5; i++) printf(" %ld:%#lx", pairs[i].key, pairs[i].value);
    rc = syscall(258, pairs, 1, 0, NULL, 1);  /* no flags are defined */
    printf(" %ld %d\n", rc, errno);
    return 0;
}
"""


def run_c(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Build ``source`` for riscv64 Linux and run it under ``popek exec``."""
    gcc = shutil.which(bitmanip_program.GCC)
    if gcc is None:
        pytest.fail(f"{bitmanip_program.GCC} not found: apt-get install gcc-riscv64-linux-gnu")
    (tmp_path / "prog.c").write_text(source)
    subprocess.run([gcc, "-O2", "-static", "-o", str(tmp_path / "prog"),
                    str(tmp_path / "prog.c")], check=True)
    return subprocess.run([sys.executable, "-m", "popek", "exec", str(tmp_path / "prog")],
                          capture_output=True, text=True, timeout=120)


def test_riscv_hwprobe_reports_the_extensions_user_programs_may_use(tmp_path: Path) -> None:
    # Linux's asm/hwprobe.h: base behaviour IMA; IMA_EXT_0 bits FD 0, C 1, Zba 3, Zbb 4,
    # Zbs 5, Zicboz 6, Zbc 7, Zicond 35, Zihintpause 36, Zicntr 50; Zicboz block size.
    ext = sum(1 << b for b in (0, 1, 3, 4, 5, 6, 7, 35, 36, 50))
    done = run_c(tmp_path, HWPROBE)
    assert done.stdout == f"0 3:0x1 4:{ext:#x} 6:0x40 -1:0 0:0 -1 22\n", done.stderr


# -- Sstc: the supervisor timer compare -------------------------------------------------------
STIMECMP = 0x14D


def test_stimecmp_below_m_mode_needs_menvcfg_stce_and_mcounteren_tm() -> None:
    hart = make_hart()
    word = csrr(10, STIMECMP)
    assert step(hart, word, PRIV_M) is None
    for menvcfg, mcounteren, allowed in [(0, 2, False), (C.ENVCFG_STCE, 0, False),
                                         (C.ENVCFG_STCE, 2, True)]:
        hart.csr[C.MENVCFG], hart.csr[C.MCOUNTEREN] = menvcfg, mcounteren
        trap = step(hart, word, PRIV_S)
        assert (trap is None) == allowed
        if trap:
            assert (trap.cause, trap.tval) == (ILLEGAL_INSN, word)
    hart.csr[C.SCOUNTEREN] = 2
    assert step(hart, word, PRIV_U).cause == ILLEGAL_INSN  # an S-level CSR


def test_stip_follows_time_against_stimecmp_and_software_cannot_write_it() -> None:
    now = [1000]
    hart = Hart(PhysicalMemory(RAM_BASE, 1 << 16), clock=lambda: now[0])
    stip = 1 << IRQ_S_TIMER

    def write(num: int, value: int) -> None:
        hart.csrs.op(num, 0, value, False, True)

    write(C.MIP, stip)  # without Sstc M-mode software may raise STIP ...
    assert hart.csr[C.MIP] & stip
    write(C.MIP, 0)
    write(STIMECMP, 1500)
    write(C.MENVCFG, C.ENVCFG_STCE)  # ... with it STIP is time >= stimecmp alone
    assert not hart.csr[C.MIP] & stip
    write(C.MIP, stip)
    assert not hart.csr[C.MIP] & stip
    assert hart.csrs.stimecmp_deadline() == 1500
    now[0] = 1500
    hart.csrs.update_stimecmp()  # what the machine does at each device update
    assert hart.csr[C.MIP] & stip and hart.csrs.stimecmp_deadline() is None
    write(C.MIP, 0)
    assert hart.csr[C.MIP] & stip
    write(STIMECMP, M64)  # a write re-evaluates at once
    assert not hart.csr[C.MIP] & stip


def test_bare_metal_guest_programs_its_timer_through_stimecmp() -> None:
    out = bytearray()
    machine = VirtMachine(MachineConfig(kernel=guest("sstc"), mem=32 << 20, rng=False),
                          out.extend)
    for _ in range(10_000):
        if machine.exit is not None:
            break
        machine.run_slice()
        if machine.idle_seconds():  # every hart waits: sleep until the guest's deadline
            time.sleep(machine.idle_seconds())
    assert machine.exit == ("poweroff", 0), bytes(out)
    assert out == b"pending at the deadline\ncleared by a write\ninterrupt taken\nsbi timer\n"


def test_a_stopped_stimecmp_is_no_deadline_for_an_idle_host() -> None:
    # Linux stops an idle hart's timer by writing all ones to stimecmp: the host must wait
    # for events alone, not ask its poll for a 58,000-year timeout (which it refuses).
    machine = VirtMachine(MachineConfig(kernel=guest("idle"), mem=32 << 20, rng=False),
                          lambda data: None)
    hart = machine.harts[0]
    for _ in range(100):
        machine.run_slice()
        if hart.waiting:
            break
    assert hart.waiting and hart.csr[C.MENVCFG] & C.ENVCFG_STCE  # popek's SBI enabled Sstc
    hart.csrs.op(STIMECMP, 0, M64, False, True)
    assert hart.csrs.stimecmp_deadline() == M64
    assert machine.idle_seconds() is None
    hart.csrs.op(STIMECMP, 0, machine.clint.mtime() + 10_000_000, False, True)
    assert 0.5 < machine.idle_seconds() <= 1.0
