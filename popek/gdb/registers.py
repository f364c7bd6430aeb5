"""The hart's registers as gdb numbers them, and the target description that says so.

gdb learns RISC-V registers from a target description (``qXfer:features:read``): the
features ``org.gnu.gdb.riscv.cpu`` (x0-x31, pc), ``.fpu`` (f0-f31, fflags, frm, fcsr),
``.csr`` (every CSR the hart has, by its standard name) and ``.virtual`` (``priv``, the
privilege level, which no CSR holds). The protocol's register numbers are the ones the
description gives: x0-x31 are 0-31, pc 32, f0-f31 33-64, fflags/frm/fcsr 65-67, the
other CSRs follow in CSR-number order and ``priv`` comes last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.cpu.csr import FCSR, FFLAGS, FRM
from popek.isa.disasm import CSR_NAMES, FREGS, XREGS

if TYPE_CHECKING:
    from popek.cpu.hart import Hart

PC = 32
FIRST_F = 33
FP_CSRS = (FFLAGS, FRM, FCSR)
FIRST_FP_CSR = 65
FIRST_CSR = 68
CORE_REGISTERS = 33  # what 'g' and 'G' carry: x0-x31 and pc


@dataclass(frozen=True)
class RegisterMap:
    """Where each of gdb's register numbers lives on a hart."""

    csrs: tuple[int, ...]  # the CSR numbers from FIRST_CSR on, in order

    @classmethod
    def of(cls, hart: Hart) -> RegisterMap:
        return cls(tuple(n for n in hart.csrs.numbers() if n not in FP_CSRS and n in CSR_NAMES))

    @property
    def priv(self) -> int:
        return FIRST_CSR + len(self.csrs)

    def size(self, num: int) -> int:
        return 4 if FIRST_FP_CSR <= num < FIRST_CSR else 8

    def exists(self, num: int) -> bool:
        return 0 <= num <= self.priv

    def read(self, hart: Hart, num: int) -> int:
        if num < PC:
            return hart.x[num]
        if num == PC:
            return hart.pc
        if num < FIRST_FP_CSR:
            return hart.f[num - FIRST_F]
        if num < FIRST_CSR:
            return hart.csrs.debug_read(FP_CSRS[num - FIRST_FP_CSR])
        if num < self.priv:
            return hart.csrs.debug_read(self.csrs[num - FIRST_CSR])
        return hart.priv

    def write(self, hart: Hart, num: int, value: int) -> None:
        if 0 < num < PC:
            hart.x[num] = value
        elif num == PC:
            hart.pc = value
        elif FIRST_F <= num < FIRST_FP_CSR:
            hart.f[num - FIRST_F] = value
        elif FIRST_FP_CSR <= num < FIRST_CSR:
            hart.csrs.debug_write(FP_CSRS[num - FIRST_FP_CSR], value)
        elif FIRST_CSR <= num < self.priv:
            hart.csrs.debug_write(self.csrs[num - FIRST_CSR], value)
        elif num == self.priv and value in (0, 1, 3) and value != hart.priv:
            hart.mmu.switch_priv(hart.priv, value)
            hart.priv = value

    def encode(self, hart: Hart, num: int) -> bytes:
        """Register ``num`` as the protocol sends it: target-order (little-endian) hex."""
        return self.read(hart, num).to_bytes(self.size(num), "little").hex().encode()

    def target_xml(self) -> bytes:
        def reg(name: str, num: int, kind: str = "int", group: str = "") -> str:
            extra = f' group="{group}"' if group else ""
            return (f'<reg name="{name}" bitsize="{8 * self.size(num)}" type="{kind}" '
                    f'regnum="{num}"{extra}/>')

        pointers = {"ra": "code_ptr", "sp": "data_ptr", "gp": "data_ptr", "tp": "data_ptr"}
        cpu = [reg("fp" if name == "s0" else name, i, pointers.get(name, "int"))
               for i, name in enumerate(XREGS)]
        cpu.append(reg("pc", PC, "code_ptr"))
        fpu = [reg(name, FIRST_F + i, "ieee_double", "float") for i, name in enumerate(FREGS)]
        fpu += [reg(CSR_NAMES[n], FIRST_FP_CSR + i, "int", "float")
                for i, n in enumerate(FP_CSRS)]
        csr = [reg(CSR_NAMES[n], FIRST_CSR + i, "int", "csr") for i, n in enumerate(self.csrs)]
        features = (("cpu", cpu), ("fpu", fpu), ("csr", csr),
                    ("virtual", [reg("priv", self.priv, "int", "general")]))
        body = "".join(f'<feature name="org.gnu.gdb.riscv.{name}">{"".join(regs)}</feature>'
                       for name, regs in features)
        return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
                f'<target version="1.0"><architecture>riscv:rv64</architecture>{body}</target>'
                ).encode()
