"""Interpreter handlers, generated from the instruction semantics.

Each declared instruction becomes ``def h(pc, rd, rs1, rs2, imm) -> next_pc`` in two
variants (4-byte and compressed 2-byte), compiled once per process and bound per
hart by executing the code in a namespace that holds that hart's registers,
memory accessors and services. Globals of generated code are looked up through
the namespace dict, so a handler touches no Python object it does not need.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache
from types import CodeType

from popek.engine.native_cache import CACHE, block_key
from popek.isa import helpers, softfloat
from popek.isa.decoder import ALL_INSNS
from popek.isa.spec import Insn

Handler = Callable[[int, int, int, int, int], int]
LENGTHS = (4, 2)
HANDLERS_KEY = block_key(b"interpreter handlers")  # their code's key in the code cache


def handler_name(ins: Insn, length: int) -> str:
    return f"h_{ins.name.replace('.', '_')}_{length}"


def handler_source(ins: Insn, length: int) -> str:
    """Python source of one handler: the semantics, plus the fall-through return."""
    body = ins.sem.replace("NEXT", f"((pc + {length}) & M64)")
    lines = [f"def {handler_name(ins, length)}(pc, rd, rs1, rs2, imm):"]
    lines += ["    " + line for line in body.splitlines()]
    lines.append(f"    return pc + {length}")
    return "\n".join(lines)


ILLEGAL_SOURCE = "def h_illegal(pc, rd, rs1, rs2, imm):\n    raise Trap(ILLEGAL_INSN, None)"


@cache
def _compiled() -> CodeType:
    """The handlers' code: from the code cache if open (compiling it takes ~35 ms of
    every process's start; the cache's directory is per popek source and Python)."""
    code = CACHE.code_object(HANDLERS_KEY)
    if code is None:
        parts = [ILLEGAL_SOURCE]
        parts += [handler_source(ins, n) for ins in ALL_INSNS for n in LENGTHS]
        code = compile("\n\n".join(parts), "<popek semantics>", "exec")
        CACHE.translated(HANDLERS_KEY, code)
    return code


def semantics_namespace(hart) -> dict[str, object]:
    """Everything instruction semantics may name, bound to ``hart``."""
    ns: dict[str, object] = {name: getattr(helpers, name) for name in helpers.__all__}
    ns.update({name: getattr(softfloat, name) for name in softfloat.__all__})
    ns.update(hart.mmu.accessors)
    # The TLB and RAM themselves, for translated code that inlines the TLB hit path.
    ns.update(tlb_r=hart.mmu.tlb_r, tlb_w=hart.mmu.tlb_w, ram=hart.mem.ram)
    for bits, code in ((8, "B"), (16, "H"), (32, "I"), (64, "Q")):
        fmt = struct.Struct("<" + code)
        ns[f"unpack{bits}"], ns[f"pack{bits}"] = fmt.unpack_from, fmt.pack_into
    ns.update(X=hart.x, F=hart.f, C=hart.csr, hart=hart, csr_op=hart.csrs.op)
    return ns


def bind_handlers(ns: dict[str, object]) -> dict[tuple[str, int], Handler]:
    """The handlers of every instruction and length, in a hart's semantics namespace."""
    exec(_compiled(), ns)  # noqa: S102 - source generated from our own declarations
    table: dict[tuple[str, int], Handler] = {
        (ins.name, n): ns[handler_name(ins, n)] for ins in ALL_INSNS for n in LENGTHS
    }
    table[("illegal", 0)] = ns["h_illegal"]
    return table
