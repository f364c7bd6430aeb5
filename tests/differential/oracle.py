"""The reference: unicorn (QEMU's RISC-V translator), corrected to the specification.

One ``Uc`` instance per process is reused for every case: the guest RAM is mapped once,
each case writes its code, its memory window and its whole register state, runs, and
reads everything back. Registers move in one batched call each way (the public batch
wrappers build a ctypes object per register per call, which would cost more than the
emulation), so a case costs about as much as one ``emu_start``.

Unicorn 2.1 is built from QEMU 5.0, which predates three points of the RISC-V
specification (unprivileged ISA 20191213, the version popek implements). The oracle
corrects them rather than skipping the cases, each under a ``SPEC:`` comment below:

- NaN-boxing: QEMU 5.0 reads a single from the low 32 bits of an FP register whatever
  the upper bits, and does not box single results (boxing arrived in QEMU 5.2);
- fmin/fmax: QEMU 5.0 implements IEEE 754-2008 minNum/maxNum, where a signalling NaN
  operand gives a NaN; the specification (since 2.2) follows 754-2019 minimumNumber;
- fused multiply-add: QEMU 5.0 does not raise invalid for infinity times zero plus a
  quiet NaN, which the specification requires.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from unicorn import UC_ARCH_RISCV, UC_HOOK_INTR, UC_MODE_RISCV64, Uc, UcError
from unicorn import riscv_const as rv
from unicorn.unicorn_const import UC_ERR_FETCH_UNMAPPED
from unicorn.unicorn_py3.unicorn import uclib

from .cases import RAM_BASE, RAM_SIZE, Case

MSTATUS_FS_DIRTY = 0x6000
FLAG_NV = 0x10
BOX = 0xFFFF_FFFF_0000_0000
CANONICAL_NAN_S = BOX | 0x7FC0_0000

# Register order of the batched transfers: x1..x31, f0..f31, fcsr (and pc, read only).
_REGS = (
    [rv.UC_RISCV_REG_X0 + i for i in range(1, 32)]
    + [rv.UC_RISCV_REG_F0 + i for i in range(32)]
    + [rv.UC_RISCV_REG_FCSR, rv.UC_RISCV_REG_PC]
)
_N_WRITE = len(_REGS) - 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """The architectural state after a case, in the form both machines report it."""

    x: tuple[int, ...]  # x0..x31
    f: tuple[int, ...]  # f0..f31
    fcsr: int
    pc: int | None  # None after a trap: only the cause is compared
    data: bytes  # the case's memory window
    trap: int | None  # mcause, or minus a unicorn error code; None when nothing trapped


def is_nan(bits: int, precision: str) -> bool:
    if precision == "d":
        return bits & 0x7FFF_FFFF_FFFF_FFFF > 0x7FF0_0000_0000_0000
    return bits & 0x7FFF_FFFF > 0x7F80_0000


def is_snan(bits: int, precision: str) -> bool:
    quiet = 1 << 51 if precision == "d" else 1 << 22
    return is_nan(bits, precision) and not bits & quiet


def _is_inf_or_zero(bits: int, precision: str) -> tuple[bool, bool]:
    magnitude = bits & (0x7FFF_FFFF_FFFF_FFFF if precision == "d" else 0x7FFF_FFFF)
    inf = 0x7FF0_0000_0000_0000 if precision == "d" else 0x7F80_0000
    return magnitude == inf, magnitude == 0


class UnicornOracle:
    """Runs cases on one reusable unicorn instance, in M-mode with the FP unit on."""

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_RISCV, UC_MODE_RISCV64)
        self.uc.mem_map(RAM_BASE, RAM_SIZE)
        self.uc.reg_write(rv.UC_RISCV_REG_MSTATUS, MSTATUS_FS_DIRTY)
        self.uc.hook_add(UC_HOOK_INTR, self._on_trap)
        self._trap: int | None = None
        n = len(_REGS)
        self._ids = (ctypes.c_int * n)(*_REGS)
        self._vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self._vals)
        self._ptrs = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))

    def _on_trap(self, uc: Uc, cause: int, _user_data: object) -> None:
        self._trap = cause
        uc.emu_stop()

    def reset(self) -> None:
        """Zero guest RAM, so that a whole-RAM comparison after a chunk means something."""
        self.uc.mem_write(RAM_BASE, bytes(RAM_SIZE))

    def ram(self) -> bytes:
        return bytes(self.uc.mem_read(RAM_BASE, RAM_SIZE))

    def run(self, case: Case) -> Outcome:
        """The specified outcome of ``case``: unicorn's, corrected where QEMU 5.0 errs."""
        uc, vals = self.uc, self._vals
        f_in, unboxed = _nan_box_inputs(case)
        vals[0:31] = case.x[1:]
        vals[31:63] = f_in
        vals[63] = case.fcsr
        uclib.uc_reg_write_batch(uc._uch, self._ids, self._ptrs, _N_WRITE)
        uc.mem_write(case.pc, case.code)
        # A translation made when an earlier case jumped to this address can survive the
        # write above (seen with unicorn 2.1.4 after runs stopped by instruction count).
        uc.ctl_remove_cache(case.pc, case.pc + len(case.code))
        if case.window:
            uc.mem_write(case.window, case.data)
        self._trap = None
        try:
            if case.ends_block:  # the next pc is the result: stop after N instructions
                uc.emu_start(case.pc, 0, count=case.steps)
            else:
                uc.emu_start(case.pc, case.pc + len(case.code))
        except UcError as e:
            # After a jump, unicorn fails to fetch the (unmapped) target once the jump
            # itself has completed: that is the expected end of the case.
            if not (case.ends_block and e.errno == UC_ERR_FETCH_UNMAPPED):
                self._trap = -e.errno
        uclib.uc_reg_read_batch(uc._uch, self._ids, self._ptrs, len(_REGS))
        x = (0, *vals[0:31])
        f = vals[31:63]
        fcsr = vals[63]
        if self._trap is None and (case.fp_dest or case.fp_op):
            fcsr = _correct(case, f_in, f, fcsr)
        for reg in unboxed:  # what unicorn read instead of an unboxed single is no result
            if self._trap is not None or reg != case.frd:
                f[reg] = case.f[reg]
        data = bytes(uc.mem_read(case.window, len(case.data))) if case.window else b""
        pc = vals[64] if self._trap is None else None
        return Outcome(x, tuple(f), fcsr, pc, data, self._trap)


def _nan_box_inputs(case: Case) -> tuple[list[int], list[int]]:
    """FP registers as unicorn must see them for the specified result.

    SPEC: "all other floating-point operations on narrower n-bit operations ... check if
    the input operands are correctly NaN-boxed ... otherwise the input value is treated as
    an n-bit canonical NaN" (F extension, NaN boxing). QEMU 5.0 does not check, so the
    oracle hands it the canonical NaN in place of an improperly boxed single. Returns the
    registers and which of them were replaced.
    """
    f = case.f
    unboxed = [reg for cls, reg, precision in case.srcs
               if cls == "f" and precision == "s" and f[reg] & BOX != BOX]
    if unboxed:
        f = f[:]
        for reg in unboxed:
            f[reg] = CANONICAL_NAN_S
    return f, unboxed


def _correct(case: Case, f_in: list[int], f: list[int], fcsr: int) -> int:
    """Bring unicorn's results (``f`` in place, and the returned fcsr) to the spec."""
    fsrcs = [(f_in[reg], p) for cls, reg, p in case.srcs if cls == "f"]
    if case.fp_op == "minmax":
        # SPEC: "If only one operand is a NaN, the result is the non-NaN operand.
        # Signaling NaN inputs set the invalid operation exception flag, even when the
        # result is not NaN." QEMU 5.0 returns the canonical NaN for a signalling one
        # (its invalid flag is right).
        (a, p), (b, _) = fsrcs
        if is_snan(a, p) != is_snan(b, p) and is_nan(a, p) != is_nan(b, p):
            f[case.frd] = b if is_nan(a, p) else a
    elif case.fp_op == "fma":
        # SPEC: "The fused multiply-add instructions must set the invalid operation
        # exception flag when the multiplicands are infinity and zero, even when the addend
        # is a quiet NaN." QEMU 5.0 raises it only for a signalling addend.
        (a, p), (b, _), (c, _) = fsrcs
        (a_inf, a_zero), (b_inf, b_zero) = _is_inf_or_zero(a, p), _is_inf_or_zero(b, p)
        if (a_inf and b_zero or a_zero and b_inf) and is_nan(c, p):
            fcsr |= FLAG_NV
    # SPEC: a single written to an FP register is NaN-boxed (upper 32 bits all ones).
    # QEMU 5.0 zero-extends results, and its fmv.w.x copies all 64 bits of the source.
    if case.fp_dest == "s":
        f[case.frd] = BOX | f[case.frd] & 0xFFFF_FFFF
    return fcsr
