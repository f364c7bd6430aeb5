"""RV64M: integer multiply and divide (division by zero and overflow do not trap)."""

from popek.isa.spec import insn

_RRR = "{rd},{rs1},{rs2}"

INSNS = [
    insn("mul", "0000001 ..... ..... 000 ..... 0110011", "R",
         "X[rd] = (X[rs1] * X[rs2]) & M64", _RRR, ext="M"),
    insn("mulh", "0000001 ..... ..... 001 ..... 0110011", "R",
         "X[rd] = ((signed(X[rs1]) * signed(X[rs2])) >> 64) & M64", _RRR, ext="M"),
    insn("mulhsu", "0000001 ..... ..... 010 ..... 0110011", "R",
         "X[rd] = ((signed(X[rs1]) * X[rs2]) >> 64) & M64", _RRR, ext="M"),
    insn("mulhu", "0000001 ..... ..... 011 ..... 0110011", "R",
         "X[rd] = (X[rs1] * X[rs2]) >> 64", _RRR, ext="M"),
    insn("div", "0000001 ..... ..... 100 ..... 0110011", "R",
         "b = X[rs2]\nX[rd] = div_trunc(signed(X[rs1]), signed(b)) & M64 if b else M64",
         _RRR, ext="M"),
    insn("divu", "0000001 ..... ..... 101 ..... 0110011", "R",
         "b = X[rs2]\nX[rd] = X[rs1] // b if b else M64", _RRR, ext="M"),
    insn("rem", "0000001 ..... ..... 110 ..... 0110011", "R",
         "b = X[rs2]\nX[rd] = rem_trunc(signed(X[rs1]), signed(b)) & M64 if b else X[rs1]",
         _RRR, ext="M"),
    insn("remu", "0000001 ..... ..... 111 ..... 0110011", "R",
         "b = X[rs2]\nX[rd] = X[rs1] % b if b else X[rs1]", _RRR, ext="M"),
    insn("mulw", "0000001 ..... ..... 000 ..... 0111011", "R",
         "X[rd] = sext32(X[rs1] * X[rs2])", _RRR, ext="M"),
    insn("divw", "0000001 ..... ..... 100 ..... 0111011", "R",
         "b = signed32(X[rs2])\n"
         "X[rd] = sext32(div_trunc(signed32(X[rs1]), b)) if b else M64",
         _RRR, ext="M"),
    insn("divuw", "0000001 ..... ..... 101 ..... 0111011", "R",
         "b = X[rs2] & M32\nX[rd] = sext32((X[rs1] & M32) // b) if b else M64", _RRR, ext="M"),
    insn("remw", "0000001 ..... ..... 110 ..... 0111011", "R",
         "b = signed32(X[rs2])\n"
         "X[rd] = sext32(rem_trunc(signed32(X[rs1]), b)) if b else sext32(X[rs1])",
         _RRR, ext="M"),
    insn("remuw", "0000001 ..... ..... 111 ..... 0111011", "R",
         "b = X[rs2] & M32\nX[rd] = sext32((X[rs1] & M32) % b) if b else sext32(X[rs1])",
         _RRR, ext="M"),
]
