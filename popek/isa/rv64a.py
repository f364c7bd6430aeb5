"""RV64A: load-reserved/store-conditional and atomic memory operations.

Harts run one at a time, so each AMO is trivially atomic; the reservation is a
single address per hart, dropped by any SC, xRET or hart switch (SC may fail
spuriously, which the specification allows).
"""

from popek.isa.spec import Insn, insn

# funct5 and how the new memory value is computed from the old one (``o``) and ``v``.
_AMO_OPS = {
    "amoswap": ("00001", "v"),
    "amoadd": ("00000", "o + v"),
    "amoxor": ("00100", "o ^ v"),
    "amoand": ("01100", "o & v"),
    "amoor": ("01000", "o | v"),
    "amomin": ("10000", "o if (o ^ S) < (v ^ S) else v"),
    "amomax": ("10100", "o if (o ^ S) > (v ^ S) else v"),
    "amominu": ("11000", "o if o < v else v"),
    "amomaxu": ("11100", "o if o > v else v"),
}

# Width suffix -> (funct3, size in bytes, mask, sign bit, sign-extend the loaded value).
_WIDTHS = {
    "w": ("010", 4, "M32", "0x80000000", "sext32"),
    "d": ("011", 8, "M64", "SB", ""),
}


def _amo(name: str, funct5: str, new: str, width: str) -> Insn:
    f3, size, mask, sign, ext = _WIDTHS[width]
    sem = (
        f"a = X[rs1]\ncheck_aligned(a, {size}, STORE_MISALIGNED)\n"
        f"o = amo_ld{size * 8}(a)\nv = X[rs2] & {mask}\nS = {sign}\n"
        f"st{size * 8}(a, ({new}) & {mask})\nX[rd] = {ext}(o)"
    )
    return insn(f"{name}.{width}", f"{funct5} .. ..... ..... {f3} ..... 0101111", "AMO", sem,
                "{rd},{rs2},({rs1})", ext="A", flags="load store amo")


def _lr_sc(width: str) -> list[Insn]:
    f3, size, _mask, _sign, ext = _WIDTHS[width]
    lr = (
        f"a = X[rs1]\ncheck_aligned(a, {size}, LOAD_MISALIGNED)\n"
        f"X[rd] = {ext}(ld{size * 8}(a))\nhart.reservation = a"
    )
    sc = (
        f"a = X[rs1]\ncheck_aligned(a, {size}, STORE_MISALIGNED)\n"
        "if hart.reservation == a:\n"
        f"    st{size * 8}(a, X[rs2])\n    X[rd] = 0\n"
        "else:\n    X[rd] = 1\nhart.reservation = None"
    )
    return [
        insn(f"lr.{width}", f"00010 .. 00000 ..... {f3} ..... 0101111", "AMO", lr,
             "{rd},({rs1})", ext="A", flags="load amo"),
        insn(f"sc.{width}", f"00011 .. ..... ..... {f3} ..... 0101111", "AMO", sc,
             "{rd},{rs2},({rs1})", ext="A", flags="store amo"),
    ]


INSNS = [
    *_lr_sc("w"),
    *_lr_sc("d"),
    *(_amo(n, f5, new, w) for w in _WIDTHS for n, (f5, new) in _AMO_OPS.items()),
]
