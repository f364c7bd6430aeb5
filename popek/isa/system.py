"""Zicsr and the privileged instructions: CSR access, environment calls, xRET, WFI, and
the cache-block operations, whose permissions are privileged state.

All of these end a block and are ``system``: the engine re-checks interrupts,
privilege and FP state after them. Their behaviour lives in the hart's CSR file
and trap unit; these semantics only route to it.
"""

from popek.isa.spec import insn

_SYS = "ends_block system"

# csr_op(csr, kind, value, do_read, do_write): kind 0 writes, 1 sets bits, 2 clears bits.
INSNS = [
    insn("csrrw", "............ ..... 001 ..... 1110011", "CSR",
         "X[rd] = csr_op(imm, 0, X[rs1], rd != 32, True)", "{rd},{csr},{rs1}",
         ext="Zicsr", flags=_SYS),
    insn("csrrs", "............ ..... 010 ..... 1110011", "CSR",
         "X[rd] = csr_op(imm, 1, X[rs1], True, rs1 != 0)", "{rd},{csr},{rs1}",
         ext="Zicsr", flags=_SYS),
    insn("csrrc", "............ ..... 011 ..... 1110011", "CSR",
         "X[rd] = csr_op(imm, 2, X[rs1], True, rs1 != 0)", "{rd},{csr},{rs1}",
         ext="Zicsr", flags=_SYS),
    insn("csrrwi", "............ ..... 101 ..... 1110011", "CSR",
         "X[rd] = csr_op(imm, 0, rs1, rd != 32, True)", "{rd},{csr},{zimm}",
         ext="Zicsr", flags=_SYS),
    insn("csrrsi", "............ ..... 110 ..... 1110011", "CSR",
         "X[rd] = csr_op(imm, 1, rs1, True, rs1 != 0)", "{rd},{csr},{zimm}",
         ext="Zicsr", flags=_SYS),
    insn("csrrci", "............ ..... 111 ..... 1110011", "CSR",
         "X[rd] = csr_op(imm, 2, rs1, True, rs1 != 0)", "{rd},{csr},{zimm}",
         ext="Zicsr", flags=_SYS),
    insn("ecall", "000000000000 00000 000 00000 1110011", "NONE",
         "raise Trap(ECALL_U + hart.priv, 0)", "", ext="priv", flags=_SYS),
    insn("ebreak", "000000000001 00000 000 00000 1110011", "NONE",
         "raise Trap(BREAKPOINT, pc)", "", ext="priv", flags=_SYS),
    insn("sret", "0001000 00010 00000 000 00000 1110011", "NONE",
         "return hart.sret()", "", ext="priv", flags=_SYS),
    insn("mret", "0011000 00010 00000 000 00000 1110011", "NONE",
         "return hart.mret()", "", ext="priv", flags=_SYS),
    insn("wfi", "0001000 00101 00000 000 00000 1110011", "NONE",
         "hart.wfi()", "", ext="priv", flags=_SYS),
    # Cache-block operations (Zicbom, Zicboz); kinds as popek.cpu.cmo numbers them.
    *(insn(name, f"{funct12} ..... 010 00000 0001111", "R", f"hart.cbo({kind}, X[rs1])",
           "({rs1})", ext=ext, flags="store")
      for name, funct12, kind, ext in (
          ("cbo.clean", "000000000001", 0, "Zicbom"), ("cbo.flush", "000000000010", 1, "Zicbom"),
          ("cbo.inval", "000000000000", 2, "Zicbom"), ("cbo.zero", "000000000100", 3, "Zicboz"))),
    insn("sfence.vma", "0001001 ..... ..... 000 00000 1110011", "R",
         "hart.sfence_vma(X[rs1] if rs1 else None, X[rs2] if rs2 else None)", "{rs1},{rs2}",
         ext="priv", flags=_SYS),
]
