"""A disassembler derived from the instruction declarations, spelled like GNU objdump.

Nothing here knows an encoding: :func:`popek.isa.decoder.decode` finds the instruction and
its operands, and each :class:`~popek.isa.spec.Insn`'s ``asm`` syntax prints them. What
objdump adds on top is data: the pseudo-instructions it prefers for some operand values
(``ALIASES``), the few compressed instructions it spells differently from their expansion
(``COMPRESSED_ALIASES``), register and CSR names. The output is that of binutils 2.40
(Debian 12) ``objdump -d --no-show-raw-insn``, which the tests compare against line by line:
symbol labels, ``<symbol+0xoff>`` targets, and the ``# address`` comments objdump derives by
pairing ``auipc``/``lui`` with the instruction that adds the low part.
"""

from __future__ import annotations

import re
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from popek.cpu.state import X_SINK
from popek.isa.decoder import Decoded, decode

if TYPE_CHECKING:  # pyelftools (~5 MiB of modules) is imported when an ELF file is read:
    # a machine imports this module for register names and never reads one
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import Section

M64 = (1 << 64) - 1
T = TypeVar("T")

XREGS = (
    "zero ra sp gp tp t0 t1 t2 s0 s1 a0 a1 a2 a3 a4 a5 a6 a7 s2 s3 s4 s5 s6 s7 s8 s9 s10 s11 "
    "t3 t4 t5 t6"
).split()
FREGS = (
    "ft0 ft1 ft2 ft3 ft4 ft5 ft6 ft7 fs0 fs1 fa0 fa1 fa2 fa3 fa4 fa5 fa6 fa7 fs2 fs3 fs4 fs5 "
    "fs6 fs7 fs8 fs9 fs10 fs11 ft8 ft9 ft10 ft11"
).split()
# The rm field as an operand; objdump leaves out the dynamic mode and names reserved ones so.
_ROUNDING = ("rne", "rtz", "rdn", "rup", "rmm", "unknown", "unknown", "dyn")
# A fence's predecessor/successor sets, indexed by the 4-bit field (i, o, r, w bits).
_FENCE_SETS = "unknown w r rw o ow or orw i iw ir irw io iow ior iorw".split()
# Atomics carry aq << 1 | rl in their immediate; objdump prints them as a mnemonic suffix.
_ORDERING = ("", ".rl", ".aq", ".aqrl")

# Standard CSR names (privileged spec 1.12, as binutils 2.40 declares them): "number name",
# with "name{a..b}" standing for consecutive numbered CSRs.
_CSR_TABLE = """
001 fflags  002 frm  003 fcsr  008 vstart  009 vxsat  00a vxrm  00f vcsr  015 seed
100 sstatus  104 sie  105 stvec  106 scounteren  10a senvcfg  10c sstateen{0..3}  114 sieh
140 sscratch  141 sepc  142 scause  143 stval  144 sip  14d stimecmp  150 siselect
151 sireg  154 siph  15c stopei  15d stimecmph  180 satp  200 vsstatus  204 vsie
205 vstvec  214 vsieh  240 vsscratch  241 vsepc  242 vscause  243 vstval  244 vsip
24d vstimecmp  250 vsiselect  251 vsireg  254 vsiph  25c vstopei  25d vstimecmph
280 vsatp  300 mstatus  301 misa  302 medeleg  303 mideleg  304 mie  305 mtvec
306 mcounteren  308 mvien  309 mvip  30a menvcfg  30c mstateen{0..3}  310 mstatush
313 midelegh  314 mieh  318 mvienh  319 mviph  31a menvcfgh  31c mstateen{0..3}h
320 mcountinhibit  323 mhpmevent{3..31}  340 mscratch  341 mepc  342 mcause  343 mtval
344 mip  34a mtinst  34b mtval2  350 miselect  351 mireg  354 miph  35c mtopei
3a0 pmpcfg{0..15}  3b0 pmpaddr{0..63}  5a8 scontext  600 hstatus  602 hedeleg  603 hideleg
604 hie  605 htimedelta  606 hcounteren  607 hgeie  608 hvien  609 hvictl  60a henvcfg
60c hstateen{0..3}  613 hidelegh  615 htimedeltah  618 hvienh  61a henvcfgh
61c hstateen{0..3}h  643 htval  644 hip  645 hvip  646 hviprio{1..2}  64a htinst
655 hviph  656 hviprio{1..2}h  680 hgatp  6a8 hcontext  723 mhpmevent{3..31}h  747 mseccfg
757 mseccfgh  7a0 tselect  7a1 tdata{1..3}  7a4 tinfo  7a5 tcontrol  7a8 mcontext
7aa mscontext  7b0 dcsr  7b1 dpc  7b2 dscratch{0..1}  b00 mcycle  b02 minstret
b03 mhpmcounter{3..31}  b80 mcycleh  b82 minstreth  b83 mhpmcounter{3..31}h  c00 cycle
c01 time  c02 instret  c03 hpmcounter{3..31}  c20 vl  c21 vtype  c22 vlenb  c80 cycleh
c81 timeh  c82 instreth  c83 hpmcounter{3..31}h  da0 scountovf  db0 stopi  e12 hgeip
eb0 vstopi  f11 mvendorid  f12 marchid  f13 mimpid  f14 mhartid  f15 mconfigptr  fb0 mtopi
"""


def _parse_csrs(table: str) -> dict[int, str]:
    names: dict[int, str] = {}
    tokens = table.split()
    for num, name in zip(tokens[::2], tokens[1::2], strict=True):
        m = re.fullmatch(r"(\w+)\{(\d+)\.\.(\d+)\}(\w*)", name)
        if m is None:
            names[int(num, 16)] = name
            continue
        first, last = int(m[2]), int(m[3])
        for i in range(first, last + 1):
            names[int(num, 16) + i - first] = f"{m[1]}{i}{m[4]}"
    return names


CSR_NAMES = _parse_csrs(_CSR_TABLE)


@dataclass(frozen=True)
class Alias:
    """A spelling objdump prefers for an instruction whose operands satisfy ``when``.

    ``when`` holds ``(operand, mask, value)`` tests: an operand (``rd``, ``rs1``, ``rs2``,
    ``imm``, or ``word``, the raw encoding) masked by ``mask`` (None: all bits) equals a value,
    or another operand when the value is its name (``rs1=rs2``). ``syntax`` uses the
    placeholders of :class:`Insn.asm`; the mnemonic ``.insn`` means objdump has no name for
    the encoding. ``needs`` names an ISA extension objdump requires for the alias.
    """

    when: tuple[tuple[str, int | None, int | str], ...]
    mnemonic: str
    syntax: str
    needs: str = ""

    def matches(self, ops: dict[str, int], extensions: frozenset[str]) -> bool:
        if self.needs and self.needs not in extensions:
            return False
        for key, mask, value in self.when:
            actual = ops[key] if mask is None else ops[key] & mask
            if actual != (ops[value] if isinstance(value, str) else value):
                return False
        return True


# In objdump's order of preference: the first rule whose condition holds wins, and an
# instruction no rule matches is printed with its own name and ``asm`` syntax.
_ALIAS_TABLE = """
# insn       when                         mnemonic    syntax            needs
jal          rd=0                         j           {target}
jal          rd=1                         jal         {target}
jalr         rd=0,rs1=1,imm=0             ret
jalr         rd=0,imm=0                   jr          {rs1}
jalr         rd=0                         jr          {imm}({rs1})
jalr         rd=1,imm=0                   jalr        {rs1}
jalr         rd=1                         jalr        {imm}({rs1})
jalr         imm=0                        jalr        {rd},{rs1}
beq          rs2=0                        beqz        {rs1},{target}
bne          rs2=0                        bnez        {rs1},{target}
bge          rs1=0                        blez        {rs2},{target}
bge          rs2=0                        bgez        {rs1},{target}
blt          rs2=0                        bltz        {rs1},{target}
blt          rs1=0                        bgtz        {rs2},{target}
addi         rd=0,rs1=0,imm=0             nop
addi         rs1=0                        li          {rd},{imm}
addi         imm=0                        mv          {rd},{rs1}
addi         *                            add         {rd},{rs1},{imm}
addiw        imm=0                        sext.w      {rd},{rs1}
addiw        *                            addw        {rd},{rs1},{imm}
andi         imm=255                      zext.b      {rd},{rs1}
andi         *                            and         {rd},{rs1},{imm}
ori          rd=0,imm&0x1f=0              prefetch.i  {pimm}({rs1})     zicbop
ori          rd=0,imm&0x1f=1              prefetch.r  {pimm}({rs1})     zicbop
ori          rd=0,imm&0x1f=3              prefetch.w  {pimm}({rs1})     zicbop
ori          *                            or          {rd},{rs1},{imm}
xori         imm=-1                       not         {rd},{rs1}
xori         *                            xor         {rd},{rs1},{imm}
sltiu        imm=1                        seqz        {rd},{rs1}
slli         *                            sll         {rd},{rs1},{shamt}
srli         *                            srl         {rd},{rs1},{shamt}
srai         *                            sra         {rd},{rs1},{shamt}
slliw        *                            sllw        {rd},{rs1},{shamt}
srliw        *                            srlw        {rd},{rs1},{shamt}
sraiw        *                            sraw        {rd},{rs1},{shamt}
sub          rs1=0                        neg         {rd},{rs2}
subw         rs1=0                        negw        {rd},{rs2}
sltu         rs1=0                        snez        {rd},{rs2}
slt          rs2=0                        sltz        {rd},{rs1}
slt          rs1=0                        sgtz        {rd},{rs2}
fence        word=0x0100000f              pause       -                 zihintpause
fence        word&0xf8f80=0,imm=0x0ff     fence
fence        word&0xf8f80=0,imm=0x833     fence.tso
fence        word&0xf00f8f80=0            fence       {fence}
fence        *                            .insn
fence.i      word=0x0000100f              fence.i
add.uw       rs2=0                        zext.w      {rd},{rs1}
rori         *                            ror         {rd},{rs1},{shamt}
roriw        *                            rorw        {rd},{rs1},{shamt}
bclri        *                            bclr        {rd},{rs1},{shamt}
bexti        *                            bext        {rd},{rs1},{shamt}
binvi        *                            binv        {rd},{rs1},{shamt}
bseti        *                            bset        {rd},{rs1},{shamt}
fence.i      *                            .insn
csrrw        rd=0,rs1=0,imm=0xc00         unimp
csrrw        rd=0,imm=3                   fscsr       {rs1}
csrrw        imm=3                        fscsr       {rd},{rs1}
csrrw        rd=0,imm=2                   fsrm        {rs1}
csrrw        imm=2                        fsrm        {rd},{rs1}
csrrw        rd=0,imm=1                   fsflags     {rs1}
csrrw        imm=1                        fsflags     {rd},{rs1}
csrrw        rd=0                         csrw        {csr},{rs1}
csrrs        rs1=0,imm=0xc00              rdcycle     {rd}
csrrs        rs1=0,imm=0xc02              rdinstret   {rd}
csrrs        rs1=0,imm=0xc01              rdtime      {rd}
csrrs        rs1=0,imm=3                  frcsr       {rd}
csrrs        rs1=0,imm=2                  frrm        {rd}
csrrs        rs1=0,imm=1                  frflags     {rd}
csrrs        rs1=0                        csrr        {rd},{csr}
csrrs        rd=0                         csrs        {csr},{rs1}
csrrc        rd=0                         csrc        {csr},{rs1}
csrrwi       imm=2                        fsrmi       {rd},{zimm}
csrrwi       imm=1                        fsflagsi    {rd},{zimm}
csrrwi       rd=0                         csrw        {csr},{zimm}
csrrwi       *                            csrrw       {rd},{csr},{zimm}
csrrsi       rd=0                         csrs        {csr},{zimm}
csrrsi       *                            csrrs       {rd},{csr},{zimm}
csrrci       rd=0                         csrc        {csr},{zimm}
csrrci       *                            csrrc       {rd},{csr},{zimm}
sfence.vma   rs1=0,rs2=0                  sfence.vma
sfence.vma   rs2=0                        sfence.vma  {rs1}
fsgnj.s      rs1=rs2                      fmv.s       {frd},{frs1}
fsgnjn.s     rs1=rs2                      fneg.s      {frd},{frs1}
fsgnjx.s     rs1=rs2                      fabs.s      {frd},{frs1}
fsgnj.d      rs1=rs2                      fmv.d       {frd},{frs1}
fsgnjn.d     rs1=rs2                      fneg.d      {frd},{frs1}
fsgnjx.d     rs1=rs2                      fabs.d      {frd},{frs1}
fcvt.d.w     imm=0                        fcvt.d.w    {frd},{rs1}
fcvt.d.w     *                            .insn
fcvt.d.wu    imm=0                        fcvt.d.wu   {frd},{rs1}
fcvt.d.wu    *                            .insn
fcvt.d.s     imm=0                        fcvt.d.s    {frd},{frs1}
fcvt.d.s     *                            .insn
"""

# Compressed encodings objdump prints differently from the 32-bit instruction they expand
# to, keyed by "compressed name:expansion": c.mv is ``add rd,zero,rs2``, and objdump keeps
# the c. names of hints (rd=zero, shift by zero) that have no 32-bit spelling. (Bit 12 tells
# the c.add hint from the c.mv one: both expand to ``add zero,zero,rs2``.)
_COMPRESSED_TABLE = """
# c.x:base   when                         mnemonic    syntax
c.cr:add     word&0x1000=0x1000,rd=0      c.add       {rd},{rs2}
c.cr:add     rd=0,rs1=0                   c.mv        {rd},{rs2}
c.cr:add     rs1=0                        mv          {rd},{rs2}
c.addi:addi  rd=0,imm=0                   nop
c.addi:addi  rd=0                         c.nop       {imm}
c.addi:addi  imm=0                        add         {rd},{rs1},{imm}
c.li:addi    rd=0                         c.li        {rd},{imm}
c.lui:lui    rd=0                         c.lui       {rd},{uimm}
c.slli:slli  imm=0                        c.slli64    {rd}
c.slli:slli  rd=0                         c.slli      {rd},{shamt}
c.srli:srli  imm=0                        c.srli64    {rd}
c.srai:srai  imm=0                        c.srai64    {rd}
"""


def _parse_aliases(table: str) -> dict[str, list[Alias]]:
    rules: dict[str, list[Alias]] = {}
    for line in table.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, cond, mnemonic, *rest = line.split()
        syntax = rest[0] if rest and rest[0] != "-" else ""
        when = []
        for term in cond.split(",") if cond != "*" else ():
            key, value = term.split("=")
            key, _, mask = key.partition("&")
            when.append((key, int(mask, 0) if mask else None,
                         value if value in ("rd", "rs1", "rs2") else int(value, 0)))
        rules.setdefault(name, []).append(Alias(tuple(when), mnemonic, syntax, "".join(rest[1:])))
    return rules


ALIASES = _parse_aliases(_ALIAS_TABLE)
COMPRESSED_ALIASES = _parse_aliases(_COMPRESSED_TABLE)

# Reserved encodings the decoder rejects but objdump names: the all-zero parcel (c.unimp),
# and c.addi16sp with a zero immediate, which binutils 2.40 does not check.
_ILLEGAL_NAMES = {0x0000: ("unimp", ""), 0x6101: ("add", "sp,sp,0")}

# Compressed instructions whose immediate objdump adds to rd for a "# address" comment
# (value: the sum is sign-extended from 32 bits).
_COMPRESSED_ADDRESS_IMM = {"c.addi": False, "c.addiw": True}

# The extensions objdump knows without being told (its default rv64gc); instructions of
# others (Zba, Zbb, ...) it prints only where the file's ISA string names their extension.
DEFAULT_EXTENSIONS = frozenset({"I", "M", "A", "F", "D", "Zicsr", "Zifencei", "priv"})

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class _Fields:
    """The operand values one instruction is printed from (rd with x0 restored)."""

    d: Decoded
    rd: int

    @property
    def rm(self) -> int:
        return self.d.imm >> 5 if self.d.insn.fmt == "R4" else self.d.imm


_RENDER: dict[str, Callable[[_Fields], str]] = {
    "rd": lambda f: XREGS[f.rd],
    "rs1": lambda f: XREGS[f.d.rs1],
    "rs2": lambda f: XREGS[f.d.rs2],
    "frd": lambda f: FREGS[f.rd],
    "frs1": lambda f: FREGS[f.d.rs1],
    "frs2": lambda f: FREGS[f.d.rs2],
    "frs3": lambda f: FREGS[f.d.imm & 31],
    "imm": lambda f: str(f.d.imm),
    "uimm": lambda f: hex((f.d.imm >> 12) & 0xFFFFF),
    "shamt": lambda f: hex(f.d.imm),
    "pimm": lambda f: str(f.d.imm & ~31),  # a prefetch's offset: its low bits name the kind
    "csr": lambda f: CSR_NAMES.get(f.d.imm, hex(f.d.imm)),
    "zimm": lambda f: str(f.d.rs1),
    "rm": lambda f: "" if f.rm == 7 else "," + _ROUNDING[f.rm],
    "fence": lambda f: f"{_FENCE_SETS[(f.d.imm >> 4) & 15]},{_FENCE_SETS[f.d.imm & 15]}",
    "aqrl": lambda f: "",  # the ordering goes on the mnemonic (see _ORDERING)
}

Probe = tuple[int, int, bool]
"""(base register, offset, sign-extend from 32 bits): a candidate for a "# address" comment."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to print one encoding; only the target and comment depend on where it sits."""

    mnemonic: str
    head: str  # operands before the branch target (all of them if there is none)
    tail: str  # operands after the branch target
    target: int | None = None  # offset of the branch target from pc
    upper: tuple[int, int, bool] | None = None  # lui/auipc: (rd, value, relative to pc)
    probes: tuple[Probe, ...] = ()
    text: str | None = field(init=False)  # the whole line, when it does not depend on pc

    def __post_init__(self) -> None:
        fixed = self.target is None and self.upper is None and not self.probes
        line = f"{self.mnemonic}\t{self.head}" if self.head else self.mnemonic
        object.__setattr__(self, "text", line if fixed else None)


def _unknown(word: int, length: int) -> tuple[str, str]:
    """How binutils 2.40 prints an encoding it has no name for (``.insn`` in the tables)."""
    if length in (2, 4, 8):
        return f".{length}byte", f"0x{word:x}"
    return ".byte", ", ".join(f"0x{(word >> (8 * i)) & 0xFF:02x}" for i in range(length))


def _address_probes(d: Decoded, fields: _Fields, syntax: str) -> tuple[Probe, ...]:
    """The base+offset sums objdump tries, operand by operand, for a "# address" comment.

    binutils attaches them to operand kinds: a memory offset (``{imm}({rs1})``), an addi/addiw
    or jalr immediate, and a jalr base register; compressed encodings only to c.addi(w).
    """
    if d.compressed is not None:
        wide = _COMPRESSED_ADDRESS_IMM.get(d.compressed.name)
        if wide is None or fields.rd == 0 or "{imm}" not in syntax:
            return ()
        return ((fields.rd, d.imm, wide),)
    name, rs1, imm = d.insn.name, d.rs1, d.imm
    probes: list[Probe] = []
    for m in _PLACEHOLDER.finditer(syntax):
        if m[1] == "imm":
            if syntax.startswith("(", m.end()):  # a memory offset
                probes.append((rs1, imm, False))
            if name == "jalr" or (name == "addi" and rs1 != 0):
                probes.append((rs1, imm, False))
            elif name == "addiw" and rs1 != 0:
                probes.append((rs1, imm, True))
        elif m[1] == "rs1" and name == "jalr":
            probes.append((rs1, imm, False))
    return tuple(probes)


@cache
def _rules(compressed: str | None, name: str) -> tuple[Alias, ...]:
    """The alias rules for an instruction, those of its compressed form first."""
    own = COMPRESSED_ALIASES.get(f"{compressed}:{name}", []) if compressed else []
    return (*own, *ALIASES.get(name, []))


def _spell(d: Decoded, extensions: frozenset[str]) -> _Plan:
    """Choose objdump's spelling of a decoded instruction and pre-render its operands."""
    if d.insn.ext not in DEFAULT_EXTENSIONS and d.insn.ext.lower() not in extensions:
        return _Plan(*_unknown(d.word, d.length), "")
    fields = _Fields(d, 0 if d.rd == X_SINK else d.rd)
    ops = {"rd": fields.rd, "rs1": d.rs1, "rs2": d.rs2, "imm": d.imm, "word": d.word}
    rules = _rules(d.compressed.name if d.compressed else None, d.insn.name)
    rule = next((r for r in rules if r.matches(ops, extensions)), None)
    mnemonic, syntax = (rule.mnemonic, rule.syntax) if rule else (d.insn.name, d.insn.asm)
    if mnemonic == ".insn":
        return _Plan(*_unknown(d.word, d.length), "")
    if d.insn.fmt == "AMO":
        mnemonic += _ORDERING[d.imm & 3]
    head, _, tail = syntax.partition("{target}")
    upper = None
    if d.insn.name in ("lui", "auipc"):
        upper = (fields.rd, d.imm, d.insn.name == "auipc")
    return _Plan(
        mnemonic, _render(head, fields), _render(tail, fields),
        d.imm if "{target}" in syntax else None, upper, _address_probes(d, fields, syntax),
    )


@cache
def _pieces(syntax: str) -> tuple[tuple[str, Callable[[_Fields], str] | None], ...]:
    """A syntax string split into (literal text, placeholder renderer) pairs."""
    parts = _PLACEHOLDER.split(syntax)
    return tuple((parts[i], _RENDER[parts[i + 1]] if i + 1 < len(parts) else None)
                 for i in range(0, len(parts), 2))


def _render(syntax: str, fields: _Fields) -> str:
    return "".join(text + (fn(fields) if fn else "") for text, fn in _pieces(syntax))


@cache
def _word_plan(word: int, length: int, extensions: frozenset[str]) -> _Plan:
    """The plan for an encoding (``length`` bytes), including those the decoder rejects."""
    d = decode(word) if length <= 4 else None
    if d is not None:
        return _spell(d, extensions)
    mnemonic, ops = _ILLEGAL_NAMES.get(word) or _unknown(word, length)
    return _Plan(mnemonic, ops, "")


def parcel_length(low_half: int) -> int:
    """Bytes objdump takes for the encoding starting with ``low_half`` (2 for unknown lengths)."""
    if low_half & 3 != 3:
        return 2
    if low_half & 0x1F != 0x1F:
        return 4
    if low_half & 0x3F == 0x1F:
        return 6
    if low_half & 0x7F == 0x3F:
        return 8
    if low_half & 0x7F == 0x7F and low_half & 0x7000 != 0x7000:
        return 10 + ((low_half >> 11) & 0xE)
    return 2


class Disassembler:
    """Prints instructions one after another, carrying objdump's cross-instruction state.

    ``symbolize`` prints an address (a branch target or a comment's address). The state is
    the value each register got from its last ``lui``/``auipc`` until an instruction uses it
    as a base, which is how objdump comments ``auipc a0,0x12`` at 0 and the ``add a0,a0,8``
    after it with ``# 0x12008``.
    """

    def __init__(
        self,
        symbolize: Callable[[int], str] = lambda addr: f"0x{addr:x}",
        gp: int | None = None,
        extensions: frozenset[str] = frozenset(),
    ) -> None:
        self.symbolize = symbolize
        self.gp = gp
        self._upper: list[int | None] = [None] * 32
        self._plan_caches: dict[frozenset[str], dict[int, _Plan]] = {}
        self.extensions = extensions

    @property
    def extensions(self) -> frozenset[str]:
        """The ISA extensions in force; objdump's spelling of some encodings depends on them."""
        return self._extensions

    @extensions.setter
    def extensions(self, value: frozenset[str]) -> None:
        self._extensions = value
        self._plans = self._plan_caches.setdefault(value, {})

    def _plan(self, word: int, length: int) -> _Plan:
        # The low bits of an encoding fix its length, so the word alone is a unique key.
        p = self._plans[word] = _word_plan(word, length, self._extensions)
        return p

    def format(self, pc: int, word: int, length: int) -> str:
        """``mnemonic<TAB>operands`` of the instruction ``word`` (``length`` bytes) at ``pc``."""
        p = self._plans.get(word) or self._plan(word, length)
        if p.text is not None:
            return p.text
        ops = p.head
        if p.target is not None:
            ops += self.symbolize((pc + p.target) & M64) + p.tail
        if p.upper is not None:
            rd, value, relative = p.upper
            self._upper[rd] = (value + pc if relative else value) & M64
        comment = None
        for base, offset, wide in p.probes:  # binutils' maybe_print_address
            upper = self._upper[base]
            if upper is not None:
                addr = (upper if base else 0) + offset
                self._upper[base] = None
            elif base == 3 and self.gp is not None:
                addr = self.gp + offset
            elif base == 0 or base == 4:  # zero and tp
                addr = offset
            else:
                continue
            comment = ((addr & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000 if wide else addr
        if comment is not None:
            ops += " # " + self.symbolize(comment & M64)
        return f"{p.mnemonic}\t{ops}" if ops else p.mnemonic


# --- ELF files, read the way objdump's BFD layer reads them. -----------------------------------


class DisasmError(Exception):
    """The file cannot be disassembled (missing, not an ELF, not 64-bit RISC-V)."""


def _printable(name: str) -> str:
    """binutils' sanitize_string: control characters as ``^`` and the character + 0x40."""
    if name.isprintable():
        return name
    return "".join(f"^{chr((ord(c) + 0x40) & 0xFF)}" if ord(c) < 0x20 or ord(c) == 0x7F else c
                   for c in name)


def _mapping_kind(name: str) -> bool | None:
    """For a RISC-V mapping symbol, whether data follows it; None for other symbols."""
    if name == "$d":
        return True
    if name == "$x" or name.startswith("$xrv"):
        return False
    return None


_SPECIAL_SECTIONS = {"SHN_ABS": "*ABS*", "SHN_UNDEF": "*UND*", "SHN_COMMON": "*COM*"}


@dataclass(slots=True)
class Symbol:
    """An ELF symbol as objdump uses it to label code and annotate addresses."""

    name: str
    label: str  # as printed: with @version or @@version for dynamic symbols
    value: int  # absolute address
    shndx: int | str  # section index, or SHN_ABS / SHN_UNDEF / SHN_COMMON
    section: str  # section name (*ABS*, *UND*, *COM* for the special indices)
    section_vma: int
    kind: str  # STT_*
    bind: str  # STB_*
    size: int
    synthetic: bool = False  # a name@plt symbol objdump makes up
    rank: tuple[object, ...] = field(init=False, repr=False)
    valid: bool = field(init=False, repr=False)  # may name an address (not a mapping symbol)

    def __post_init__(self) -> None:
        self.rank = _rank(self)
        self.valid = self.name != ".L0 " and _mapping_kind(self.name) is None

    @property
    def undefined(self) -> bool:
        return self.shndx == "SHN_UNDEF"

    @property
    def local(self) -> bool:
        return self.bind == "STB_LOCAL"

    @property
    def debugging(self) -> bool:
        return self.kind in ("STT_FILE", "STT_SECTION")


def _rank(s: Symbol) -> tuple[object, ...]:
    """objdump's order among symbols at one address (compare_symbols, after the section)."""
    name = s.name
    compiled = "gnu_compiled" in name or "gcc2_compiled" in name
    is_file = s.kind == "STT_FILE" or (len(name) > 2 and name[-2] == "." and name[-1] in "oa")
    if s.synthetic:  # BFD marks a made-up symbol global unless it copies a local one
        is_global = not s.local
    else:
        is_global = s.bind == "STB_GLOBAL" and s.shndx not in ("SHN_UNDEF", "SHN_COMMON")
    sized = 0 if s.kind == "STT_SECTION" or s.synthetic else s.size
    return (
        compiled, is_file, s.debugging, s.kind == "STT_SECTION", s.kind != "STT_FUNC",
        s.kind not in ("STT_OBJECT", "STT_COMMON"), s.local, not is_global, -sized,
        name.startswith("."), name.encode(),
    )


def _useful(s: Symbol) -> bool:
    """objdump's remove_useless_symbols: drop nameless, undefined, common, debugging symbols."""
    if not s.name or s.shndx in ("SHN_UNDEF", "SHN_COMMON"):
        return False
    return not s.debugging or s.name.startswith((".plt", ".got"))


class _Versions:
    """The GNU symbol-versioning tables: how objdump names a dynamic symbol's version."""

    def __init__(self, elf: ELFFile) -> None:
        self.versym: list[int] = []
        self.verdef: dict[int, tuple[int, str]] = {}  # index -> (flags, name)
        self.verneed: dict[int, str] = {}
        for sec in elf.iter_sections():
            if sec["sh_type"] == "SHT_GNU_versym":
                data = sec.data()
                self.versym = [int.from_bytes(data[i:i + 2], "little")
                               for i in range(0, len(data), 2)]
            elif sec["sh_type"] == "SHT_GNU_verdef":
                for vd, aux in _entries(sec, sec.iter_versions()):
                    self.verdef[vd["vd_ndx"]] = (vd["vd_flags"], next(aux).name)
            elif sec["sh_type"] == "SHT_GNU_verneed":
                for _vn, auxes in _entries(sec, sec.iter_versions()):
                    for aux in _entries(sec, auxes):
                        self.verneed[aux["vna_other"]] = aux.name
        self.enabled = bool(self.versym) and bool(self.verdef or self.verneed)

    def label(self, index: int, name: str, undefined: bool) -> str:
        """``name@version`` (hidden or undefined) or ``name@@version`` (the default)."""
        if not self.enabled or index >= len(self.versym):
            return name
        vernum = self.versym[index]
        hidden = bool(vernum & 0x8000) or undefined
        vernum &= 0x7FFF
        count = max(self.verdef, default=0)
        if vernum == 0:
            version = ""
        elif vernum == 1 and (count < 1 or self.verdef.get(1, (0, ""))[0] == 1):  # VER_FLG_BASE
            version = "Base"
        elif vernum <= count:
            version = self.verdef.get(vernum, (0, ""))[1]
        else:
            version, hidden = self.verneed.get(vernum, "<corrupt>"), True
        if not version:
            return name
        return f"{name}{'@' if hidden else '@@'}{version}"


def _entries(sec: Section, entries: Iterator[T]) -> Iterator[T]:
    """A version section's entries, each at least 16 bytes: a count in the file that says
    more (entries chained to themselves, say) is corrupt, not a reason to loop 2^32 times."""
    for n, entry in enumerate(entries):
        if n >= sec["sh_size"] // 16:
            raise ValueError(f"section {sec.name} holds more versions than fit in it")
        yield entry


def _arch_extensions(arch: str) -> frozenset[str]:
    """The multi-letter extensions of an ISA string such as ``rv64i2p1_m2p0_zicsr2p0``."""
    return frozenset(re.sub(r"\d+(p\d+)?$", "", part) for part in arch.lower().split("_")[1:])


def _extensions(elf: ELFFile) -> frozenset[str]:
    """The extensions of the file's Tag_RISCV_arch (objdump gates some aliases on them)."""
    sec = elf.get_section_by_name(".riscv.attributes")
    if sec is None or not hasattr(sec, "iter_subsections"):
        return frozenset()
    try:
        for sub in sec.iter_subsections():
            for subsub in sub.iter_subsubsections():
                for attr in subsub.iter_attributes():
                    if attr.tag == "TAG_ARCH":
                        return _arch_extensions(str(attr.value))
    except TypeError:  # pyelftools on a corrupt tag: a malformed file, as its other errors
        raise ValueError("corrupt .riscv.attributes section") from None
    return frozenset()


class ElfImage:
    """The code sections and symbols of one RISC-V ELF file, for :meth:`disassemble`."""

    def __init__(self, path: str | Path) -> None:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        self.path = str(path)
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"\x7fELF":
                    raise DisasmError(f"{path}: not an ELF file")
                f.seek(0)
                elf = ELFFile(f)
                if elf["e_machine"] != "EM_RISCV" or elf.elfclass != 64:
                    raise DisasmError(f"{path}: not a 64-bit RISC-V ELF file")
                self._load(elf)
        except OSError as e:
            raise DisasmError(f"{path}: {e.strerror or e}") from None
        # A corrupt file (zlib.error: a compressed section that does not decompress).
        except (ELFError, ValueError, LookupError, MemoryError, OverflowError, zlib.error) as e:
            raise DisasmError(f"{path}: malformed ELF file ({e})") from None

    def _load(self, elf: ELFFile) -> None:
        from elftools.elf.sections import SymbolTableSection

        sections = list(elf.iter_sections())
        self.code = [
            (i, s.name, s["sh_addr"], s.data())
            for i, s in enumerate(sections)
            if s["sh_flags"] & 0x4 and s["sh_type"] != "SHT_NOBITS" and s["sh_size"]  # EXECINSTR
        ]
        self.relocatable = elf["e_type"] == "ET_REL"
        self.extensions = _extensions(elf)
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):  # a section merely named so
            symtab = None
        dynsym = next((s for s in sections if s["sh_type"] == "SHT_DYNSYM"), None)
        dynamic = self._symbols(dynsym, sections, _Versions(elf)) if dynsym else []
        own = self._symbols(symtab, sections, None) if symtab else []
        dynsym_index = sections.index(dynsym) if dynsym else -1
        # objdump's sorted_syms: the file's own symbols (else the dynamic ones) and the PLT's.
        self.symbols = [s for s in (own or dynamic) if _useful(s)]
        self.symbols += self._plt_symbols(sections, dynamic, dynsym_index)
        self.gp = next((s.value for s in self.symbols if s.name == "__global_pointer$"), None)
        # Dynamic relocations by address: objdump names an address a relocation applies to
        # after the relocation's symbol (a GOT slot after the function it will hold).
        relocs: list[tuple[int, Symbol | None]] = []
        for sec in sections:
            if sec["sh_type"] in ("SHT_RELA", "SHT_REL") and sec["sh_link"] == dynsym_index:
                for r in sec.iter_relocations():
                    idx = r["r_info_sym"]
                    relocs.append((r["r_offset"], dynamic[idx - 1] if 0 < idx <= len(dynamic)
                                   else None))
        relocs.sort(key=lambda r: r[0])
        self.relocs = relocs

    @staticmethod
    def _symbols(table: Section, sections: list[Section], versions: _Versions | None
                 ) -> list[Symbol]:
        out = []
        for index, sym in enumerate(table.iter_symbols()):
            if index == 0:
                continue
            shndx = sym["st_shndx"]
            kind, bind = sym["st_info"]["type"], sym["st_info"]["bind"]
            if isinstance(shndx, int) and shndx < len(sections):
                section, section_vma = sections[shndx].name, sections[shndx]["sh_addr"]
            else:
                shndx = shndx if shndx in _SPECIAL_SECTIONS else "SHN_ABS"
                section, section_vma = _SPECIAL_SECTIONS[shndx], 0
            name = sym.name
            if not name and kind == "STT_SECTION" and isinstance(shndx, int):
                name = section
            value = sym["st_size"] if shndx == "SHN_COMMON" else sym["st_value"]
            label = _printable(name)
            if versions:
                label = versions.label(index, label, shndx == "SHN_UNDEF")
            out.append(Symbol(name, label, value, shndx, section, section_vma, kind, bind,
                              sym["st_size"]))
        return out

    @staticmethod
    def _plt_symbols(sections: list[Section], dynamic: list[Symbol], dynsym_index: int
                     ) -> list[Symbol]:
        """objdump's synthetic ``name@plt`` symbols, one per .rela.plt entry."""
        from elftools.elf.relocation import RelocationSection

        by_name = {s.name: (i, s) for i, s in enumerate(sections)}
        relplt, plt = by_name.get(".rela.plt"), by_name.get(".plt")
        if not dynamic or relplt is None or plt is None or relplt[1]["sh_link"] != dynsym_index \
                or not isinstance(relplt[1], RelocationSection):
            return []
        plt_index, plt_sec = plt
        out = []
        for i, r in enumerate(relplt[1].iter_relocations()):
            idx = r["r_info_sym"]
            target = dynamic[idx - 1] if 0 < idx <= len(dynamic) else None
            addend = r["r_addend"] if r.is_RELA() else 0
            name = (target.name if target else "*ABS*") + (
                f"+0x{addend & M64:x}" if addend else "") + "@plt"
            kind, bind = (target.kind, target.bind) if target else ("STT_NOTYPE", "STB_GLOBAL")
            value = plt_sec["sh_addr"] + 32 + 16 * i  # a 32-byte header, then 16-byte entries
            out.append(Symbol(name, _printable(name), value, plt_index, ".plt",
                              plt_sec["sh_addr"], kind, bind, 0, synthetic=True))
        return out

    def disassemble(self, raw: bool = False) -> Iterator[str]:
        """The lines of ``objdump -d`` (with ``--no-show-raw-insn`` unless ``raw``)."""
        yield ""
        yield f"{self.path}:     file format elf64-littleriscv"
        yield ""
        dis = Disassembler(gp=self.gp, extensions=self.extensions)
        for index, name, vma, data in self.code:
            yield ""
            yield f"Disassembly of section {_printable(name)}:"
            view = _SectionView(self, dis, index, name, vma, len(data))
            dis.symbolize = view.print_address
            yield from _section_lines(dis, view, data, raw)


class _SectionView:
    """One section being disassembled: objdump's symbol order and lookups, the mapping state."""

    def __init__(self, image: ElfImage, dis: Disassembler, index: int, name: str, vma: int,
                 size: int) -> None:
        self.image, self.dis = image, dis
        self.index, self.name, self.vma, self.size = index, name, vma, size
        # objdump re-sorts the symbols for each section, preferring that section's own.
        self.syms = sorted(image.symbols, key=lambda s: (s.value, s.section != name, s.rank))
        self.values = [s.value for s in self.syms]
        self.reloc_addrs = [a for a, _ in image.relocs]
        self.has_mapping = any(s.shndx == index and not s.valid for s in self.syms)
        self._last_map, self._last_stop = -1, -1
        self._cache: dict[int, Symbol | None] = {}

    def find(self, vma: int, require_sec: bool = False) -> tuple[Symbol | None, int]:
        """objdump's find_symbol_for_address: the symbol ``vma`` is named after, and its place."""
        syms, values, n = self.syms, self.values, len(self.syms)
        if n < 1:
            return None, 0
        lo, hi = 0, n
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if values[mid] > vma:
                hi = mid
            elif values[mid] < vma:
                lo = mid
            else:
                lo = mid
                break
        place = lo
        while place > 0 and values[place] == values[place - 1]:
            place -= 1
        i = place
        while i < hi and values[i] == values[place]:  # prefer this section's at one address
            if syms[i].valid and syms[i].shndx == self.index:
                return syms[i], i
            i += 1
        want_section = require_sec or (
            self.image.relocatable and self.vma <= vma < self.vma + self.size)

        def ok(s: Symbol) -> bool:
            return s.valid and (not want_section or s.shndx == self.index)

        if not ok(syms[place]):
            newplace = n
            for j in range(i - 1, -1, -1):
                if ok(syms[j]):
                    if newplace == n:
                        newplace = j
                    if values[j] != values[newplace]:
                        break
                    newplace = j
            if newplace != n:
                place = newplace
            else:
                place = next((j for j in range(place + 1, n) if ok(syms[j])), place)
            if not ok(syms[place]):
                return None, place
        sym = syms[place]
        relocs = self.image.relocs
        if (not want_section and relocs and not sym.synthetic
                and sym.value - sym.section_vma != vma and relocs[0][0] <= vma):
            j = bisect_left(self.reloc_addrs, vma)
            while j < len(relocs) and relocs[j][0] == vma:
                target = relocs[j][1]
                if target is not None and target.shndx != "SHN_ABS":
                    return target, place
                j += 1
        return sym, place

    def label(self, sym: Symbol | None, vma: int) -> str:
        """``<symbol+0xoff>``, or ``<section+0xoff>`` when no symbol names the address."""
        if sym is None:
            base, name = self.vma, _printable(self.name)
        else:
            base, name = sym.value, sym.label
            if sym.undefined:
                return f"<{name}>"
        if vma > base:
            return f"<{name}+0x{vma - base:x}>"
        if vma < base:
            return f"<{name}-0x{base - vma:x}>"
        return f"<{name}>"

    def print_address(self, vma: int) -> str:
        """An operand address: bare hex in a file without symbols, else ``hex <symbol+off>``."""
        if not self.syms:
            return f"0x{vma:x}"
        if vma not in self._cache:
            self._cache[vma] = self.find(vma)[0]
        return f"{vma:x} {self.label(self._cache[vma], vma)}"

    def _map(self, n: int) -> bool | None:
        """binutils' riscv_get_map_state: a ``$xrv...`` symbol also switches the ISA."""
        s = self.syms[n]
        if s.shndx != self.index:
            return None
        if s.name.startswith("$xrv"):
            self.dis.extensions = _arch_extensions(s.name[2:])
        return _mapping_kind(s.name)

    def is_data(self, memaddr: int, symtab_pos: int, stop: int) -> bool:
        """Whether ``$d`` governs ``memaddr`` (binutils' riscv_search_mapping_symbol)."""
        resume = self._last_map >= 0 and stop == self._last_stop
        state, found = False, -1
        n = symtab_pos + 1
        if resume and n >= self._last_map:
            n = self._last_map
        while n < len(self.syms) and self.values[n] <= memaddr:
            kind = self._map(n)
            if kind is not None:
                state, found = kind, n
            n += 1
        if found < 0:
            n = symtab_pos
            if resume and n >= self._last_map:
                n = self._last_map
            while n >= 0 and self.values[n] >= self.vma:
                kind = self._map(n)
                if kind is not None:
                    state, found = kind, n
                    break
                n -= 1
        self._last_map, self._last_stop = found, stop
        return state

    def data_length(self, memaddr: int) -> int:
        """Bytes of data printed at once: up to a word, cut at the next mapping symbol."""
        length = 4
        ahead = (n for n in range(self._last_map + 1, len(self.syms))
                 if self.values[n] > memaddr and self._map(n) is not None)
        nxt = next(ahead, None) if self._last_map >= 0 else None
        if nxt is not None:
            length = min(length, self.values[nxt] - memaddr)
        else:
            length = min(length, self.vma + self.size - memaddr)
        return 2 if length == 3 else length


_NONZERO = re.compile(rb"[^\0]")
_DATA = {1: ".byte\t0x{:02x}", 2: ".short\t0x{:04x}", 4: ".word\t0x{:08x}"}


def _section_lines(dis: Disassembler, view: _SectionView, data: bytes, raw: bool
                   ) -> Iterator[str]:
    """One section: a label at each symbol, then what follows up to the next one."""
    vma, size, syms = view.vma, len(data), view.syms
    # objdump drops the leading zero digits all addresses of the section share, in fours.
    zeros = 16 - len(f"{vma + size:x}")
    width = 16 - ((zeros - 1) & -4 if zeros else 0)
    sym, place = view.find(vma, require_sec=True)
    offset = 0
    while offset < size:
        addr = vma + offset
        symtab_pos = place if sym is not None and sym.value <= addr else -1
        yield ""
        yield f"{addr:016x} {view.label(sym, addr)}:"
        if sym is not None and sym.value > addr:
            nextsym: Symbol | None = sym
        elif sym is None:
            nextsym = None
        else:
            while place < len(syms) and not (
                syms[place].section == view.name and syms[place].value > sym.value
                and syms[place].valid
            ):
                place += 1
            nextsym = syms[place] if place < len(syms) else None
        stop = size if nextsym is None else nextsym.value - vma
        if stop > size or stop <= offset:
            stop = size
        yield from _span_lines(dis, view, data, offset, stop, symtab_pos, width, raw)
        offset, sym = stop, nextsym


def _span_lines(dis: Disassembler, view: _SectionView, data: bytes, offset: int, stop: int,
                symtab_pos: int, width: int, raw: bool) -> Iterator[str]:
    """From ``offset`` to ``stop``: instructions, data, and ``...`` for runs of zeros."""
    vma, mapped = view.vma, view.has_mapping
    address = f"{{:>{width}x}}:\t".format
    while offset < stop:
        low = data[offset]
        if low == 0:
            m = _NONZERO.search(data, offset, stop)
            zeros = (m.start() if m else stop) - offset
            if zeros >= 8 or (offset + zeros == stop and zeros < 3):
                offset += zeros if offset + zeros == stop else zeros & ~3
                yield "\t..."
                continue
        pc = vma + offset
        is_data = mapped and view.is_data(pc, symtab_pos, stop)
        if is_data:
            length = view.data_length(pc)
        elif low & 3 != 3:
            length = 2
        else:
            length = parcel_length(low | (data[offset + 1] << 8)) if stop - offset > 1 else 2
        if offset + length > stop:
            # binutils 2.40 takes the read error's status (EIO) as the instruction's length.
            yield f"{address(pc)}Address 0x{pc:016x} is out of bounds.\n"
            offset += 5
            continue
        word = int.from_bytes(data[offset:offset + length], "little")
        if is_data:
            text, chunk = _DATA[length].format(word), length
        else:
            text, chunk = dis.format(pc, word, length), 4 - 2 * (length % 4 != 0)
        if raw:
            yield from _raw_lines(address(pc), vma, data, offset, length, chunk, width, text)
        else:
            yield address(pc) + text
        offset += length


def _raw_lines(prefix: str, vma: int, data: bytes, offset: int, length: int, chunk: int,
               width: int, text: str) -> Iterator[str]:
    """objdump's default layout: the bytes as little-endian chunks, then the instruction."""
    per_line = 6 if chunk == 1 else 8

    def dump(start: int, end: int) -> str:
        return "".join(f"{int.from_bytes(data[j:j + chunk], 'little'):0{2 * chunk}x} "
                       for j in range(start, end, chunk))

    shown = min(length, per_line)
    pad = " " * (-(-(per_line - shown) // chunk) * (2 * chunk + 1))
    yield f"{prefix}{dump(offset, offset + shown)}{pad}\t{text}"
    for start in range(offset + per_line, offset + length, per_line):
        yield f"{vma + start:>{width}x}:\t{dump(start, min(start + per_line, offset + length))}"


def disassemble_elf(path: str | Path, raw: bool = False) -> Iterator[str]:
    """Disassemble an ELF file's code sections as ``objdump -d`` prints them, line by line."""
    return ElfImage(path).disassemble(raw)
