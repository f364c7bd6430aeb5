"""Tier 1: translate a hot block into one Python function, derived from the semantics.

The block's instructions are specialized from the same semantics the interpreter
runs: operand fields become literals, integer registers become locals loaded once
at entry and written back once at exit, reads of x0 become 0 and writes to it are
dropped. A trap inside the function writes the registers back (they then hold the
precise state before the faulting instruction) and tells the engine which
instruction faulted, so traps stay exactly as precise as in the interpreter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache, lru_cache
from types import CodeType

from popek.cpu.state import X_SINK
from popek.isa.decoder import Decoded
from popek.isa.spec import Insn

BlockFn = Callable[[int], int]

_X_OPERAND = re.compile(r"\bX\[(rd|rs1|rs2)\]")
_X_ASSIGN = re.compile(r"\bX\[rd\]\s*(?:[-+|&^]?=)(?!=)")
_RETURN = re.compile(r"\breturn\b")
_MAY_TRAP = ("load", "store", "amo", "system", "fp")
_MARK = "\x00"  # brackets operand markers in instruction templates
_M64 = (1 << 64) - 1
_WHOLE_REGISTER = re.compile(rf"{_MARK}X(rs2){_MARK}|F\[{_MARK}rs2{_MARK}\]")  # < 2**64
_INLINE_HELPERS = {"sext32": "((({}) & 0xFFFFFFFF ^ 0x80000000) - 0x80000000 & M64)"}
_TRAP_WORDS = ("raise", "Trap", "check_aligned", "hart.")


_LOAD_CALL = re.compile(r"\b(?<!amo_)ld(8|16|32|64)\(")
_STORE_STMT = re.compile(r"^(\s*)st(8|16|32|64)\((.*)\)$")


def _call_args(text: str, open_paren: int) -> tuple[str, int]:
    """The text between the parenthesis at ``open_paren`` and its match, and the end."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren + 1:i], i + 1
    raise ValueError(f"unbalanced call in {text!r}")


def _split_top_level(args: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(args[start:i])
            start = i + 1
    return [*parts, args[start:]]


def _inline_memory(sem: str) -> str:
    """Put the software-TLB hit path of loads and stores inline; misses call the slow path.

    The hit path is the same as the accessors' in :mod:`popek.cpu.mmu`: a dict lookup by
    virtual page and an unpack/pack at the host offset, for accesses within one page.
    """
    out = []
    for line in sem.splitlines():
        store = _STORE_STMT.match(line)
        if store:
            indent, bits, args = store.groups()
            addr, value = _split_top_level(args)
            size = int(bits) // 8
            if size < 8 or not _WHOLE_REGISTER.fullmatch(value.strip()):
                value = f"({value}) & {(1 << (8 * size)) - 1}"
            out += [
                f"{indent}_a = {addr}",
                f"{indent}_b = tlb_w.get(_a >> 12)",
                f"{indent}if _b is not None{_within_page(size)}:",
                f"{indent}    pack{bits}(ram, _b | (_a & 4095), {value})",
                f"{indent}else:",
                f"{indent}    st{bits}(_a, {value})",
            ]
            continue
        pos = 0
        while (m := _LOAD_CALL.search(line, pos)) is not None:
            bits = m.group(1)
            addr, end = _call_args(line, m.end() - 1)
            size = int(bits) // 8
            inline = (f"(unpack{bits}(ram, _b | (_a & 4095))[0] "
                      f"if (_b := tlb_r.get((_a := {addr}) >> 12)) is not None"
                      f"{_within_page(size)} else ld{bits}(_a))")
            line = line[:m.start()] + inline + line[end:]
            pos = m.start() + len(inline)
        out.append(line)
    return "\n".join(out)


def _within_page(size: int) -> str:
    """The test that an access at ``_a`` of ``size`` bytes stays within its page."""
    return "" if size == 1 else f" and (_a & 4095) <= {4096 - size}"


def _inline_helpers(sem: str) -> str:
    """Replace calls of the hottest helpers by their arithmetic (a call costs more)."""
    for name, form in _INLINE_HELPERS.items():
        while (call := re.search(rf"\b{name}\(", sem)) is not None:
            arg, end = _call_args(sem, call.end() - 1)
            sem = sem[:call.start()] + form.format(arg) + sem[end:]
    return sem


def _reg_local(n: int) -> str:
    if n == 0:
        return "0"
    if n == X_SINK:
        return "_x0"
    return f"x{n}"


@cache
def _template(insn: Insn, last: bool) -> tuple[list[str], frozenset[str], bool]:
    """The instruction's code with its operands as markers, memory access inlined: the
    regular-expression work done once per instruction kind, so that specializing one
    instruction is string joining. Returns the code split at the markers (odd items are
    marker names), the register operands it names and whether it assigns X[rd]."""
    sem = insn.sem
    operands = frozenset(_X_OPERAND.findall(sem))
    assigns = bool(_X_ASSIGN.search(sem))
    # Addresses and jump targets, folded with the operands they add when specialized.
    sem = sem.replace("(X[rs1] + imm) & M64", f"{_MARK}ea{_MARK}")
    sem = sem.replace("(pc + imm) & M64", f"{_MARK}target{_MARK}")
    sem = _inline_helpers(sem)
    sem = _X_OPERAND.sub(lambda m: f"{_MARK}X{m.group(1)}{_MARK}", sem)
    for name in ("NEXT", "pc", "imm", "rd", "rs1", "rs2"):
        sem = re.sub(rf"\b{name}\b", f"{_MARK}{name}{_MARK}", sem)
    if "load" in insn.flags or "store" in insn.flags:
        sem = _inline_memory(sem)
    if last:
        sem = _RETURN.sub("_next =", sem)
    return sem.split(_MARK), operands, assigns


def _specialize(d: Decoded, offset: int, last: bool) -> tuple[list[str], set[int], set[int]]:
    """Source lines of one instruction, and the x registers it reads and writes."""
    parts, operands, assigns = _template(d.insn, last)
    regs = {"rd": d.rd, "rs1": d.rs1, "rs2": d.rs2}
    written = {d.rd} if assigns and d.rd not in (0, X_SINK) else set()
    used = {regs[name] for name in operands} - {0, X_SINK}
    base = _reg_local(d.rs1)
    if d.rs1 == 0:
        ea = str(d.imm & _M64)
    elif d.imm == 0:
        ea = base
    else:
        ea = f"({base} + ({d.imm})) & M64"
    values = {
        "ea": ea,
        "target": f"(pc + ({offset + d.imm})) & M64",
        "NEXT": f"((pc + {offset + d.length}) & M64)",
        "pc": f"(pc + {offset})" if offset else "pc",
        "imm": f"({d.imm})",
        "rd": str(d.rd), "rs1": str(d.rs1), "rs2": str(d.rs2),
        "Xrd": _reg_local(d.rd), "Xrs1": _reg_local(d.rs1), "Xrs2": _reg_local(d.rs2),
    }
    text = "".join(values[part] if i & 1 else part for i, part in enumerate(parts))
    return text.splitlines(), used, written


def block_source(name: str, decoded: list[Decoded], offsets: list[int]) -> str:
    """Python source of the function running ``decoded`` (one block)."""
    body: list[str] = []
    used: set[int] = set()
    written: set[int] = set()
    last = len(decoded) - 1
    end = offsets[last] + decoded[last].length
    ends_in_control = "ends_block" in decoded[last].insn.flags
    if ends_in_control:
        body.append(f"_next = pc + {end}")
    for i, (d, off) in enumerate(zip(decoded, offsets, strict=True)):
        if d.insn.flags.intersection(_MAY_TRAP) or any(w in d.insn.sem for w in _TRAP_WORDS):
            body.append(f"i = {i}")
        lines, reads, writes = _specialize(d, off, i == last)
        body += lines
        used |= reads | writes
        written |= writes
    load = [f"    x{n} = X[{n}]" for n in sorted(used)]
    store = [f"X[{n}] = x{n}" for n in sorted(written)]
    src = [f"def {name}(pc):", *load, "    i = 0", "    try:"]
    src += ["        " + line for line in body]
    src += ["    except Trap as _trap:"]
    src += ["        " + line for line in store]
    src += ["        _trap.index = i", "        raise"]
    src += ["    " + line for line in store]
    src.append("    return _next" if ends_in_control else f"    return pc + {end}")
    return "\n".join(src)


@lru_cache(maxsize=1 << 16)
def compiled(src: str) -> CodeType:
    """Compiling dominates translation; the same code recurs (shared libraries in many
    processes, reboots, pages written and re-translated; the same WebAssembly module
    instantiated again), so keep it by source."""
    return compile(src, "<popek block>", "exec")


def block_code(decoded: list[Decoded], offsets: list[int]) -> CodeType:
    """The code object defining the block's function (what ``translate`` runs)."""
    return compiled(block_source("block", decoded, offsets))


def translate(namespace: dict[str, object], decoded: list[Decoded], offsets: list[int],
              code: CodeType | None = None) -> BlockFn:
    """Compile a block into a function bound to the hart's semantics namespace; ``code``
    is its ``block_code`` when that is known already (from the disk cache)."""
    local: dict[str, object] = {}
    exec(code or block_code(decoded, offsets), namespace, local)  # noqa: S102
    return local["block"]  # type: ignore[return-value]
