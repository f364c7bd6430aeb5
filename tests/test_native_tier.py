"""Tier 2 (native code) leaves exactly the state the reference interpreter leaves.

Each program runs hot loops, so under the jit tier its blocks go native (the tier-up
thresholds are lowered here to reach that in a few iterations), and ends by trapping
into a handler that waits (WFI). Every register, the trap CSRs, instret and the data
memory must then match the interpreter's, including when the trap comes from the
middle of a native block, when code rewrites itself, when native code calls back for a
device or an FP instruction, and when a callback fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rvasm import RAM_BASE, assemble

from popek.cpu.hart import Hart
from popek.cpu.physmem import PhysicalMemory
from popek.engine import engine as engine_module

BASE = RAM_BASE
DATA = BASE + 0x4000
HANDLER = BASE + 0x3000
DEVICE = 0x1000_0000
MEPC, MCAUSE, MTVAL, MTVEC, MSTATUS = 0x341, 0x342, 0x343, 0x305, 0x300

class Counter:
    """A device whose reads count up; writes are recorded; offset 8 fails on read."""

    def __init__(self) -> None:
        self.value = 0
        self.writes: list[int] = []

    def read(self, offset: int, size: int) -> int:
        if offset == 8:
            raise RuntimeError("device fault")
        self.value += 1
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append(value)


def start(tier: str, code: bytes, data: bytes = b"") -> tuple[Hart, PhysicalMemory, Counter]:
    """A hart about to run ``code``, with ``data`` and the Counter device."""
    mem = PhysicalMemory(BASE, 1 << 16)
    device = Counter()
    mem.add_device(DEVICE, 0x100, device)
    mem.write(BASE, code)
    mem.write(HANDLER, bytes.fromhex("73005010"))  # wfi
    mem.write(DATA, data or bytes(256))
    hart = Hart(mem, engine=tier)
    hart.csr[MTVEC] = HANDLER
    hart.csr[MSTATUS] |= 1 << 13  # FP unit on
    hart.x[10] = DATA
    hart.pc = BASE
    return hart, mem, device


def finish(hart: Hart) -> None:
    """Run ``hart`` until its program ends in the handler's WFI."""
    for _ in range(200_000):
        hart.run(50)  # short runs, tier 2 taking over between them as soon as compiled
        hart.engine.finish_compiles()
        if hart.waiting:
            return
    raise AssertionError("the program did not finish")


def run(tier: str, code: bytes, data: bytes = b"") -> tuple[Hart, PhysicalMemory, Counter]:
    hart, mem, device = start(tier, code, data)
    finish(hart)
    return hart, mem, device


@pytest.fixture(autouse=True)
def eager_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "HOT_AFTER", 2)
    monkeypatch.setattr(engine_module, "NATIVE_AFTER", 2)
    monkeypatch.setattr(engine_module, "PATCHED_NATIVE_AFTER", 4)


def same_state(source: str, data: bytes = b"") -> tuple[Hart, PhysicalMemory, Counter]:
    """Run under the interpreter and natively; assert identical outcomes; return native."""
    code = assemble(source)
    ref, ref_mem, ref_dev = run("interp", code, data)
    nat, nat_mem, nat_dev = run("jit", code, data)
    assert any(b.native is not None for b in nat.engine.blocks.values()), "nothing went native"
    assert list(nat.x[:32]) == list(ref.x[:32])
    assert list(nat.f) == list(ref.f)
    for csr in (MEPC, MCAUSE, MTVAL, 3):
        assert nat.csr[csr] == ref.csr[csr], hex(csr)
    assert nat.instret == ref.instret
    assert nat_mem.read(DATA, 256) == ref_mem.read(DATA, 256)
    assert nat_dev.writes == ref_dev.writes
    return nat, nat_mem, nat_dev


def test_integer_loop_matches_the_interpreter() -> None:
    nat, _, _ = same_state("""
        li s0, 300
        li s1, 0x123456789abcdef
        li s2, -7
        li s3, -1
        li s4, 1
        slli s4, s4, 63          # INT64_MIN
    1:  add  t0, s1, s0
        mul  t1, t0, s2
        mulh t2, t0, s1
        mulhu t3, t0, s3
        mulhsu t4, s2, t0
        div  t5, s4, s3          # overflow: INT64_MIN / -1
        rem  t6, s4, s3
        divu a1, t0, zero        # by zero
        remw a2, s2, s0
        divw a3, t0, s2
        sraw a4, s2, s0
        srl  a5, s1, s0
        sltu a6, s2, t0
        slt  a7, s2, t0
        sd   t1, 0(a0)
        sw   t2, 8(a0)
        sh   t3, 12(a0)
        sb   t4, 14(a0)
        lb   s5, 14(a0)
        lhu  s6, 12(a0)
        lw   s7, 8(a0)
        ld   s8, 0(a0)
        add  s9, s9, s5
        xor  s10, s10, s8
        lr.d s11, (a0)
        addi s11, s11, 1
        sc.d t0, s11, (a0)
        addi t3, a0, 16
        amoadd.w t1, s0, (t3)
        addi t3, a0, 24
        amomax.d t2, s2, (t3)
        addi s0, s0, -1
        bnez s0, 1b
        ebreak
    """)
    assert nat.csr[MCAUSE] == 3  # the ebreak


def test_compressed_calls_and_returns_match_the_interpreter() -> None:
    same_state("""# rvc
        li s0, 200
    1:  call f
        c.addi s0, -1
        c.bnez s0, 1b
        ebreak
    f:  c.li a1, 5
        c.slli a1, 3
        c.add a2, a1
        c.sd a2, 0(a0)
        c.ld a3, 0(a0)
        c.jr ra
    """)


def test_fault_inside_a_native_block_is_precise() -> None:
    nat, _, _ = same_state("""
        li s0, 500
        mv s1, a0
    1:  addi a1, a1, 1
        ld   a2, 0(s1)           # faults once s1 leaves RAM
        addi a3, a3, 1
        addi s0, s0, -1
        bnez s0, 1b
        li   s1, 0x100           # nothing answers here
        li   s0, 3
        j    1b
    """)
    assert nat.csr[MCAUSE] == 5 and nat.csr[MTVAL] == 0x100  # load access fault
    assert nat.x[11] == nat.x[13] + 1  # a1 counted the faulting pass; a3 did not


# Counts to 200 + 2 * 200 in a0: halfway it rewrites the instruction that counts.
SELF_PATCHING = """
    li s0, 400
    la s1, 2f
    li s2, 0x00250513        # addi a0, a0, 2
    li s3, 200
    li a0, 0
1:  addi s0, s0, -1
    bne  s0, s3, 2f
    sw   s2, 0(s1)           # patch the next instruction, once
2:  addi a0, a0, 1
    bnez s0, 1b
    ebreak
"""


def test_code_rewritten_under_native_execution_is_seen() -> None:
    nat, _, _ = same_state(SELF_PATCHING)
    assert nat.x[10] == 200 + 2 * 200


def test_devices_and_fp_instructions_called_back_from_native_code() -> None:
    nat, _, dev = same_state("""
        li s0, 300
        li s1, 0x10000000
        fcvt.d.l fs0, s0
    1:  ld   t0, 0(s1)           # a device read
        add  s2, s2, t0
        fcvt.d.l ft0, t0
        fadd.d fs1, fs1, ft0     # FP arithmetic: the host's (see hostfp)
        fsd  fs1, 32(a0)
        sd   s2, 16(s1)          # a device write
        addi s0, s0, -1
        bnez s0, 1b
        fcvt.l.d s3, fs1
        ebreak
    """)
    assert nat.x[18] == nat.x[19] == 300 * 301 // 2
    assert dev.writes[-1] == 300 * 301 // 2


def test_fp_in_every_rounding_mode_from_native_blocks() -> None:
    """frm = s0 mod 5 in turn: RNE..RUP in native code, RMM through the handler (ties
    away: 1 + 2**-53 and 2.5 show it), in a block whose registers live in SSA values."""
    nat, _, _ = same_state("""
        li s0, 60
        li t0, 1
        fcvt.d.l fs0, t0
        li t0, 3
        fcvt.d.l fs1, t0
        li t0, 0x3CA0000000000000
        fmv.d.x fs3, t0
        li t0, 0x4004000000000000
        fmv.d.x fs4, t0
        li t3, 5
    1:  remu t2, s0, t3
        addi s1, s1, 7           # registers written around the FP instructions
        fsrm t2
        fdiv.d fa0, fs0, fs1
        fadd.d fa1, fs0, fs3
        fcvt.l.d a2, fs4
        add s2, s2, a2
        fcvt.s.d fa2, fa0
        fsqrt.s fa3, fa2
        fle.s a3, fa3, fa2
        add s3, s3, a3
        fadd.d fs2, fs2, fa1
        fsub.d fs5, fs5, fa0
        frflags a4
        add s4, s4, a4
        csrwi fflags, 0
        addi s0, s0, -1
        bnez s0, 1b
        fmv.x.d s5, fs2
        ebreak
    """)
    assert nat.x[18] == 12 * (2 + 2 + 2 + 3 + 3)  # 2.5 to an integer in RNE..RMM


def test_failing_callback_raises_in_the_host_not_a_crash() -> None:
    code = assemble("""
        li s0, 100
        li s1, 0x10000000
    1:  ld   t0, 0(s1)
        addi s0, s0, -1
        bnez s0, 1b
        ld   t0, 8(s1)           # the device raises
        ebreak
    """)
    with pytest.raises(RuntimeError, match="device fault"):
        run("jit", code)


def test_full_code_cache_starts_over_and_keeps_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.engine import jit

    monkeypatch.setattr(jit, "MAX_NATIVE_BLOCKS", 2)
    nat, _, _ = same_state("""
        li s0, 300
    1:  addi a1, a1, 3
        j 2f
    2:  addi a2, a2, 5
        addi s0, s0, -1
        bnez s0, 1b
        li s0, 300               # a second hot loop, compiled once the first filled the cache
    3:  addi a3, a3, 7
        j 4f
    4:  addi a4, a4, 9
        addi s0, s0, -1
        bnez s0, 3b
        ebreak
    """)
    assert nat.engine.native.restarts >= 1
    assert (nat.x[11], nat.x[12], nat.x[13], nat.x[14]) == (900, 1500, 2100, 2700)


def test_fork_while_compiling_leaves_both_processes_compiling() -> None:
    """popek exec forks the whole emulator for the guest's fork(), whatever the compiler
    thread is doing: the child must get a working compiler (no lock held by a thread it
    does not have, no batch it waits for forever) and the parent must carry on."""
    code = assemble("""
        li s0, 400
    1:  addi a1, a1, 3
        j 2f
    2:  xor a2, a2, a1
        addi s0, s0, -1
        bnez s0, 1b
        ebreak
    """)
    ref, _, _ = run("interp", code)
    hart, _, _ = start("jit", code)
    while not hart.engine.native.compiling:
        hart.run(50)
    pid = os.fork()
    if pid == 0:  # the child reports through its exit status only
        status = 1
        try:
            finish(hart)
            native = any(b.native is not None for b in hart.engine.blocks.values())
            status = 0 if native and list(hart.x[:32]) == list(ref.x[:32]) else 3
        finally:
            os._exit(status)
    deadline = time.monotonic() + 60  # not a speed limit: a hung child never ends
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(waited[1]) == 0
    finish(hart)
    assert any(b.native is not None for b in hart.engine.blocks.values())
    assert list(hart.x[:32]) == list(ref.x[:32])


@pytest.mark.parametrize("tier", ["interp", "translate"])
def test_tiers_below_native_never_load_llvm(tier: str) -> None:
    """Loading LLVM maps about 100 MiB of its library: only the native tier may pay that."""
    probe = ("import sys; from popek.cpu.hart import Hart; "
             "from popek.cpu.physmem import PhysicalMemory; "
             f"Hart(PhysicalMemory(0x8000_0000, 1 << 20), engine={tier!r}).run(100); "
             "print('llvmlite.binding' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def test_watching_a_page_drops_only_its_writable_entries_from_the_native_tlb() -> None:
    from popek.cpu.causes import ACCESS_WRITE
    hart, _, _ = start("baseline", assemble("ebreak"))
    native = hart.engine.native
    native.fill(ACCESS_WRITE, 0x10, 0x1000)
    native.fill(ACCESS_WRITE, 0x11, 0x2000)
    native.fill(ACCESS_WRITE, 0x12, 0x1000)  # another alias of the same page
    hart.mmu.drop_writable(0x1000)  # as guest memory does when it starts watching it
    tags = set(native.tlb_w[::2])
    assert 0x10 + 1 not in tags and 0x12 + 1 not in tags
    assert 0x11 + 1 in tags
    hart.mmu.drop_writable(None)
    assert not any(native.tlb_w)


def test_a_change_of_address_space_keeps_the_native_tlbs_global_entries() -> None:
    from popek.cpu.causes import ACCESS_EXEC, ACCESS_READ
    hart, _, _ = start("baseline", assemble("ebreak"))
    native = hart.engine.native
    native.fill(ACCESS_READ, 0x10, 0x1000, local=False)
    native.fill(ACCESS_READ, 0x11, 0x2000)
    native.fill(ACCESS_EXEC, 0x12, 0x3000, local=False)
    native.fill(ACCESS_EXEC, 0x13, 0x4000)
    native.remember_jump(0x13000, 0, 0x1234)
    native.flush_local()
    assert set(native.tlb_r[::2]) == {0, 0x10 + 1}
    assert set(native.tlb_x[::2]) == {0, 0x12 + 1}
    assert not any(native.jumps)
