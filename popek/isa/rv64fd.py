"""RV64F and RV64D: single- and double-precision floating point.

The arithmetic lives in :mod:`popek.isa.softfloat`; these semantics only move bits
between registers and apply the two rules the register file adds. NaN-boxing: a single
written to an FP register has its upper 32 bits set, and a single read from one that is
not so boxed is the canonical NaN (except by fmv.x.w and fsw, which copy bits). Flags:
each operation's exception flags accrue into fflags, the low bits of fcsr (``C[3]``).
A reserved rounding mode traps in ``fp_rm`` before any state is written.
"""

from popek.isa.spec import Insn, insn

_OP_FP = "1010011"

# Register-file flags (see Insn): which instructions dirty FP state and where rd points.
_RD_F = "fp fp_write rd_is_fp"  # writes an FP register (and maybe fflags)
_RD_X_FLAGS = "fp fp_write"  # writes an integer register and fflags
_RD_X = "fp"  # writes an integer register only


class _Prec:
    """How one precision reads and writes FP registers, and names its softfloat functions."""

    def __init__(self, suffix: str, fmt: str, ext: str, lib: str, box: bool) -> None:
        self.suffix = suffix
        self.fmt = fmt  # the 2-bit fmt field
        self.ext = ext
        self.lib = lib
        self.box = box

    def read(self, reg: str) -> str:
        return f"fp_unbox32(F[{reg}])" if self.box else f"F[{reg}]"

    def write(self, value: str) -> str:
        return f"F[rd] = {value} | 0xFFFFFFFF00000000" if self.box else f"F[rd] = {value}"


_S = _Prec("s", "00", "F", "f32", box=True)
_D = _Prec("d", "01", "D", "f64", box=False)

_RM = "fp_rm(imm, C[3])"


def _op_fp(
    name: str,
    funct5: str,
    p: _Prec,
    rs2: str,
    funct3: str,
    fmt: str,
    sem: str,
    asm: str,
    flags: str,
) -> Insn:
    pattern = f"{funct5}{p.fmt} {rs2} ..... {funct3} ..... {_OP_FP}"
    return insn(f"{name}.{p.suffix}", pattern, fmt, sem, asm, ext=p.ext, flags=flags)


def _insns(p: _Prec) -> list[Insn]:
    """Every instruction of one precision, except conversions between the two precisions."""
    a, b, f = p.read("rs1"), p.read("rs2"), p.lib
    accrue = "\nC[3] |= fl"
    out = []
    for name, funct5 in (
        ("fadd", "00000"),
        ("fsub", "00001"),
        ("fmul", "00010"),
        ("fdiv", "00011"),
    ):
        sem = f"r, fl = {f}_{name[1:]}({a}, {b}, {_RM})\n{p.write('r')}{accrue}"
        out.append(
            _op_fp(name, funct5, p, ".....", "...", "RM", sem, "{frd},{frs1},{frs2}{rm}", _RD_F)
        )
    sem = f"r, fl = {f}_sqrt({a}, {_RM})\n{p.write('r')}{accrue}"
    out.append(_op_fp("fsqrt", "01011", p, "00000", "...", "RM", sem, "{frd},{frs1}{rm}", _RD_F))
    for name, funct3 in (("fsgnj", "000"), ("fsgnjn", "001"), ("fsgnjx", "010")):
        sem = p.write(f"{f}_{name[1:]}({a}, {b})")
        out.append(
            _op_fp(name, "00100", p, ".....", funct3, "R", sem, "{frd},{frs1},{frs2}", _RD_F)
        )
    for name, funct3 in (("fmin", "000"), ("fmax", "001")):
        sem = f"r, fl = {f}_{name[1:]}({a}, {b})\n{p.write('r')}{accrue}"
        out.append(
            _op_fp(name, "00101", p, ".....", funct3, "R", sem, "{frd},{frs1},{frs2}", _RD_F)
        )
    for name, funct3 in (("feq", "010"), ("flt", "001"), ("fle", "000")):
        sem = f"r, fl = {f}_{name[1:]}({a}, {b})\nX[rd] = r{accrue}"
        out.append(
            _op_fp(name, "10100", p, ".....", funct3, "R", sem, "{rd},{frs1},{frs2}", _RD_X_FLAGS)
        )
    out.append(
        _op_fp(
            "fclass",
            "11100",
            p,
            "00000",
            "001",
            "R",
            f"X[rd] = {f}_classify({a})",
            "{rd},{frs1}",
            _RD_X,
        )
    )
    # Conversions to and from integers; rs2 selects the integer type. RV64 sign-extends
    # 32-bit results, the unsigned ones included.
    for ty, lib_ty, rs2, ext in (
        ("w", "i32", "00000", "sext32(r)"),
        ("wu", "u32", "00001", "sext32(r)"),
        ("l", "i64", "00010", "r"),
        ("lu", "u64", "00011", "r"),
    ):
        sem = f"r, fl = {f}_to_{lib_ty}({a}, {_RM})\nX[rd] = {ext}{accrue}"
        out.append(
            _op_fp(f"fcvt.{ty}", "11000", p, rs2, "...", "RM", sem, "{rd},{frs1}{rm}", _RD_X_FLAGS)
        )
        sem = f"r, fl = {f}_from_{lib_ty}(X[rs1], {_RM})\n{p.write('r')}{accrue}"
        name = f"fcvt.{p.suffix}.{ty}"
        pattern = f"11010{p.fmt} {rs2} ..... ... ..... {_OP_FP}"
        out.append(insn(name, pattern, "RM", sem, "{frd},{rs1}{rm}", ext=p.ext, flags=_RD_F))
    # Fused multiply-add: imm = rs3 | rm << 5, one rounding of the exact result.
    for name, opcode in (
        ("fmadd", "1000011"),
        ("fmsub", "1000111"),
        ("fnmsub", "1001011"),
        ("fnmadd", "1001111"),
    ):
        sem = (
            f"r, fl = {f}_{name}({a}, {b}, {p.read('imm & 31')}, fp_rm(imm >> 5, C[3]))\n"
            f"{p.write('r')}{accrue}"
        )
        pattern = f"..... {p.fmt} ..... ..... ... ..... {opcode}"
        out.append(
            insn(
                f"{name}.{p.suffix}",
                pattern,
                "R4",
                sem,
                "{frd},{frs1},{frs2},{frs3}{rm}",
                ext=p.ext,
                flags=_RD_F,
            )
        )
    return out


INSNS: list[Insn] = [
    # Loads and stores move raw bits: no NaN-boxing check on fsw, boxing on flw.
    insn(
        "flw",
        "............ ..... 010 ..... 0000111",
        "I",
        "F[rd] = ld32((X[rs1] + imm) & M64) | 0xFFFFFFFF00000000",
        "{frd},{imm}({rs1})",
        ext="F",
        flags="fp fp_write rd_is_fp load",
    ),
    insn(
        "fsw",
        "....... ..... ..... 010 ..... 0100111",
        "S",
        "st32((X[rs1] + imm) & M64, F[rs2] & M32)",
        "{frs2},{imm}({rs1})",
        ext="F",
        flags="fp store",
    ),
    insn(
        "fld",
        "............ ..... 011 ..... 0000111",
        "I",
        "F[rd] = ld64((X[rs1] + imm) & M64)",
        "{frd},{imm}({rs1})",
        ext="D",
        flags="fp fp_write rd_is_fp load",
    ),
    insn(
        "fsd",
        "....... ..... ..... 011 ..... 0100111",
        "S",
        "st64((X[rs1] + imm) & M64, F[rs2])",
        "{frs2},{imm}({rs1})",
        ext="D",
        flags="fp store",
    ),
    *_insns(_S),
    *_insns(_D),
    # Moves between register files copy bits: fmv.x.w ignores NaN-boxing.
    insn(
        "fmv.x.w",
        "1110000 00000 ..... 000 ..... 1010011",
        "R",
        "X[rd] = sext32(F[rs1])",
        "{rd},{frs1}",
        ext="F",
        flags=_RD_X,
    ),
    insn(
        "fmv.w.x",
        "1111000 00000 ..... 000 ..... 1010011",
        "R",
        "F[rd] = (X[rs1] & M32) | 0xFFFFFFFF00000000",
        "{frd},{rs1}",
        ext="F",
        flags=_RD_F,
    ),
    insn(
        "fmv.x.d",
        "1110001 00000 ..... 000 ..... 1010011",
        "R",
        "X[rd] = F[rs1]",
        "{rd},{frs1}",
        ext="D",
        flags=_RD_X,
    ),
    insn(
        "fmv.d.x",
        "1111001 00000 ..... 000 ..... 1010011",
        "R",
        "F[rd] = X[rs1]",
        "{frd},{rs1}",
        ext="D",
        flags=_RD_F,
    ),
    # Between precisions. Widening is exact but its rm field must still be a valid mode.
    insn(
        "fcvt.s.d",
        "0100000 00001 ..... ... ..... 1010011",
        "RM",
        "r, fl = f64_to_f32(F[rs1], fp_rm(imm, C[3]))\nF[rd] = r | 0xFFFFFFFF00000000\nC[3] |= fl",
        "{frd},{frs1}{rm}",
        ext="D",
        flags=_RD_F,
    ),
    insn(
        "fcvt.d.s",
        "0100001 00000 ..... ... ..... 1010011",
        "RM",
        "fp_rm(imm, C[3])\nr, fl = f32_to_f64(fp_unbox32(F[rs1]))\nF[rd] = r\nC[3] |= fl",
        "{frd},{frs1}{rm}",
        ext="D",
        flags=_RD_F,
    ),
]
