"""Bit manipulation (Zba, Zbb, Zbc, Zbs) and integer conditional operations (Zicond).

These are the extensions RVA22 profiles and distributions compile for: address generation
(``sh1add``...), basic bit manipulation (counts, rotates, min/max, byte reversal),
carry-less multiplication and single-bit operations, and branchless select (``czero``).
Semantics that need more than plain arithmetic (counting bits, reversing bytes, carry-less
products) call the helpers in :mod:`popek.isa.helpers`.
"""

from popek.isa.spec import Insn, insn

_RRR = "{rd},{rs1},{rs2}"
_RR = "{rd},{rs1}"
_RRI = "{rd},{rs1},{shamt}"


def _r(name: str, funct7: str, funct3: str, sem: str, ext: str, op: str = "0110011") -> Insn:
    return insn(name, f"{funct7} ..... ..... {funct3} ..... {op}", "R", sem, _RRR, ext=ext)


def _unary(name: str, rs2: str, sem: str, op: str = "0010011", funct3: str = "001",
           funct7: str = "0110000") -> Insn:
    """Zbb's one-operand instructions: rs2 is part of the opcode."""
    return insn(name, f"{funct7} {rs2} ..... {funct3} ..... {op}", "R", sem, _RR, ext="Zbb")


def _shift_imm(name: str, funct6: str, funct3: str, sem: str, ext: str,
               op: str = "0010011") -> Insn:
    return insn(name, f"{funct6} ...... ..... {funct3} ..... {op}", "SH6", sem, _RRI, ext=ext)


# Rotations: shift amounts are taken modulo the width, and a zero rotation is the identity.
_ROL = "((v << s) | (v >> ((W - s) & (W - 1))))"
_ROR = "((v >> s) | (v << ((W - s) & (W - 1))))"


def _rotate(form: str, width: int, amount: str) -> str:
    body = form.replace("W", str(width))
    if width == 64:
        return f"v = X[rs1]\ns = {amount}\nX[rd] = {body} & M64"
    return f"v = X[rs1] & M32\ns = {amount}\nX[rd] = sext32({body})"


ZBA = [
    *(_r(f"sh{n}add", "0010000", f3, f"X[rd] = ((X[rs1] << {n}) + X[rs2]) & M64", "Zba")
      for n, f3 in ((1, "010"), (2, "100"), (3, "110"))),
    *(_r(f"sh{n}add.uw", "0010000", f3, f"X[rd] = (((X[rs1] & M32) << {n}) + X[rs2]) & M64",
         "Zba", op="0111011") for n, f3 in ((1, "010"), (2, "100"), (3, "110"))),
    _r("add.uw", "0000100", "000", "X[rd] = ((X[rs1] & M32) + X[rs2]) & M64", "Zba",
       op="0111011"),
    _shift_imm("slli.uw", "000010", "001", "X[rd] = ((X[rs1] & M32) << imm) & M64", "Zba",
               op="0011011"),
]

ZBB = [
    _r("andn", "0100000", "111", "X[rd] = X[rs1] & (X[rs2] ^ M64)", "Zbb"),
    _r("orn", "0100000", "110", "X[rd] = X[rs1] | (X[rs2] ^ M64)", "Zbb"),
    _r("xnor", "0100000", "100", "X[rd] = X[rs1] ^ X[rs2] ^ M64", "Zbb"),
    _unary("clz", "00000", "X[rd] = clz(X[rs1], 64)"),
    _unary("ctz", "00001", "X[rd] = ctz(X[rs1], 64)"),
    _unary("cpop", "00010", "X[rd] = cpop(X[rs1])"),
    _unary("clzw", "00000", "X[rd] = clz(X[rs1] & M32, 32)", op="0011011"),
    _unary("ctzw", "00001", "X[rd] = ctz(X[rs1] & M32, 32)", op="0011011"),
    _unary("cpopw", "00010", "X[rd] = cpop(X[rs1] & M32)", op="0011011"),
    _r("max", "0000101", "110",
       "X[rd] = X[rs1] if (X[rs1] ^ SB) > (X[rs2] ^ SB) else X[rs2]", "Zbb"),
    _r("maxu", "0000101", "111", "X[rd] = X[rs1] if X[rs1] > X[rs2] else X[rs2]", "Zbb"),
    _r("min", "0000101", "100",
       "X[rd] = X[rs1] if (X[rs1] ^ SB) < (X[rs2] ^ SB) else X[rs2]", "Zbb"),
    _r("minu", "0000101", "101", "X[rd] = X[rs1] if X[rs1] < X[rs2] else X[rs2]", "Zbb"),
    _unary("sext.b", "00100", "X[rd] = sext8(X[rs1])"),
    _unary("sext.h", "00101", "X[rd] = sext16(X[rs1])"),
    _unary("zext.h", "00000", "X[rd] = X[rs1] & 0xFFFF", op="0111011", funct3="100",
           funct7="0000100"),
    _r("rol", "0110000", "001", _rotate(_ROL, 64, "X[rs2] & 63"), "Zbb"),
    _r("ror", "0110000", "101", _rotate(_ROR, 64, "X[rs2] & 63"), "Zbb"),
    _shift_imm("rori", "011000", "101", _rotate(_ROR, 64, "imm"), "Zbb"),
    _r("rolw", "0110000", "001", _rotate(_ROL, 32, "X[rs2] & 31"), "Zbb", op="0111011"),
    _r("rorw", "0110000", "101", _rotate(_ROR, 32, "X[rs2] & 31"), "Zbb", op="0111011"),
    insn("roriw", "0110000 ..... ..... 101 ..... 0011011", "SH5", _rotate(_ROR, 32, "imm"),
         _RRI, ext="Zbb"),
    # A byte is non-zero exactly when adding 0x7f to its low seven bits carries into its
    # top bit, or that bit is set already; no carry crosses into the next byte.
    insn("orc.b", "001010000111 ..... 101 ..... 0010011", "R",
         "t = ((X[rs1] & 0x7F7F7F7F7F7F7F7F) + 0x7F7F7F7F7F7F7F7F) | X[rs1]\n"
         "X[rd] = ((t & 0x8080808080808080) >> 7) * 0xFF", _RR, ext="Zbb"),
    insn("rev8", "011010111000 ..... 101 ..... 0010011", "R", "X[rd] = rev8(X[rs1])", _RR,
         ext="Zbb"),
]

ZBC = [
    _r("clmul", "0000101", "001", "X[rd] = clmul(X[rs1], X[rs2]) & M64", "Zbc"),
    _r("clmulh", "0000101", "011", "X[rd] = clmul(X[rs1], X[rs2]) >> 64", "Zbc"),
    _r("clmulr", "0000101", "010", "X[rd] = (clmul(X[rs1], X[rs2]) >> 63) & M64", "Zbc"),
]

# Single-bit operations: the bit index is taken modulo 64.
_ZBS_OPS = {
    "bclr": ("0100100", "001", "X[rs1] & ((1 << {i}) ^ M64)"),
    "bext": ("0100100", "101", "(X[rs1] >> {i}) & 1"),
    "binv": ("0110100", "001", "X[rs1] ^ (1 << {i})"),
    "bset": ("0010100", "001", "X[rs1] | (1 << {i})"),
}
ZBS = [
    *(_r(name, f7, f3, "X[rd] = " + expr.format(i="(X[rs2] & 63)"), "Zbs")
      for name, (f7, f3, expr) in _ZBS_OPS.items()),
    *(_shift_imm(name + "i", f7[:6], f3, "X[rd] = " + expr.format(i="imm"), "Zbs")
      for name, (f7, f3, expr) in _ZBS_OPS.items()),
]

ZICOND = [
    _r("czero.eqz", "0000111", "101", "X[rd] = 0 if X[rs2] == 0 else X[rs1]", "Zicond"),
    _r("czero.nez", "0000111", "111", "X[rd] = X[rs1] if X[rs2] == 0 else 0", "Zicond"),
]

INSNS = [*ZBA, *ZBB, *ZBC, *ZBS, *ZICOND]
