"""Turning the declarations of :mod:`popek.wasm.isa` into code: the names semantics may use,
and the interpreter's per-instruction handlers (the oracle every other tier must match).

A handler is ``h(S, L, X)``: ``S`` the operand stack (a list), ``L`` the frame's locals and
``X`` the instruction's immediate bound to the instance (see :data:`~popek.wasm.isa.IMM_NAMES`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from popek.wasm import numeric, runtime
from popek.wasm.errors import Trap
from popek.wasm.isa import IMM_NAMES, OPS, Op
from popek.wasm.validate import COMPUTE

Handler = Callable[[list, list, object], None]

# The unpack/pack functions of each access size (1 byte is indexed directly).
_ACCESS = {2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


def namespace() -> dict[str, object]:
    """What instruction semantics see: numeric helpers, bulk operations, access structs."""
    ns: dict[str, object] = {k: v for k, v in vars(numeric).items() if not k.startswith("_")}
    ns.update({k: v for k, v in vars(runtime).items() if not k.startswith("_")})
    ns["Trap"] = Trap
    for size, st in _ACCESS.items():
        ns[f"unpack{size}"] = st.unpack_from
        ns[f"pack{size}"] = st.pack_into
    return ns


def bind_line(op: Op) -> str:
    """The statement naming the bound immediate's parts for the semantics."""
    names = IMM_NAMES[op.imm]
    if not names:
        return ""
    return f"{', '.join(names)} = X"


def load_lines(op: Op, addr: str, result: str) -> list[str]:
    """Source of a load of ``op.size`` bytes at ``addr`` + off into ``result``."""
    size = op.size
    access = "M[ea]" if size == 1 else f"unpack{size}(M, ea)[0]"
    load = [f"{result} = {access}"] if op.sem == "v" else [f"v = {access}", f"{result} = {op.sem}"]
    return [f"ea = {addr} + off",
            f"if ea > len(M) - {size}:",
            "    raise Trap(OOB_MEMORY)",
            *load]


def store_lines(op: Op, addr: str, value: str) -> list[str]:
    size = op.size
    mask = (1 << (8 * size)) - 1
    write = f"M[ea] = {value} & 255" if size == 1 else f"pack{size}(M, ea, {value} & {mask:#x})"
    return [f"ea = {addr} + off",
            f"if ea > len(M) - {size}:",
            "    raise Trap(OOB_MEMORY)",
            write]


def handler_source(op: Op, name: str) -> str:
    """Python source of the interpreter's handler for ``op``."""
    lines = [bind_line(op)] if IMM_NAMES[op.imm] else []
    if op.kind == "load":
        lines += load_lines(op, "S[-1]", "S[-1]")
    elif op.kind == "store":
        lines += ["b = S.pop()", *store_lines(op, "S.pop()", "b")]
    elif op.kind == "keep":
        lines += ["a = S[-1]", op.sem]
    else:
        operands = "abc"[:len(op.params)]
        results = len(op.results)
        if results and operands:
            lines += [f"{x} = S.pop()" for x in reversed(operands[1:])]
            lines += ["a = S[-1]", f"S[-1] = {op.sem}"]
        elif results:
            lines.append(f"S.append({op.sem})")
        else:
            lines += [f"{x} = S.pop()" for x in reversed(operands)]
            lines.append(op.sem)
    body = "\n".join("    " + line for line in lines)
    return f"def {name}(S, L, X):\n{body}\n"


def _handlers() -> dict[Op, Handler]:
    ns = namespace()
    out: dict[Op, Handler] = {}
    for i, op in enumerate(OPS):
        if op.kind == "control":
            continue
        name = f"h{i}_{op.name.replace('.', '_')}"
        exec(compile(handler_source(op, name), f"<wasm {op.name}>", "exec"), ns)  # noqa: S102
        out[op] = ns[name]  # type: ignore[assignment]
    return out


HANDLERS = _handlers()
# The interpreter's op for each instruction without an immediate, shared by all its uses.
BOUND_BARE = {op: (COMPUTE, handler, None) for op, handler in HANDLERS.items()}
