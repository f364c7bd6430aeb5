"""The reference tier: runs lowered code (see :mod:`popek.wasm.validate`) one op at a time.

Fuel, on every tier, is spent by each call of a wasm function and each backward branch
(a loop's next iteration), so every tier runs out at the same point.

Calls between wasm functions push a frame on an explicit list rather than recursing in
Python, so the call depth and the stack space a module may use are bounded exactly
(``call stack exhausted``), whatever the host's recursion limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.wasm.errors import OutOfFuel, Trap
from popek.wasm.types import MAX_CALL_DEPTH
from popek.wasm.validate import (
    BR,
    BR_IF,
    BR_TABLE,
    CALL,
    CALL_INDIRECT,
    IF,
    JUMP,
    RETURN,
    UNREACHABLE,
)

if TYPE_CHECKING:
    from popek.wasm.instance import Function

MAX_STACK_SLOTS = 1 << 22  # locals and operands of all active frames together


def resolve_indirect(X: tuple, S: list) -> Function:
    table, ftype = X
    i = S.pop()
    if i >= len(table.elements):
        raise Trap(f"undefined element {i}")
    f = table.elements[i]
    if f is None:
        raise Trap(f"uninitialized element {i}")
    if f.type != ftype:
        raise Trap("indirect call type mismatch")
    return f


def run(func: Function, args: list) -> list:  # noqa: C901 - the dispatch loop is one piece
    """Call the wasm function ``func`` with raw ``args``; its raw results."""
    from popek.wasm.instance import HostFunction

    owner = func.instance
    fuel = owner.fuel
    frames: list[tuple] = []
    fn = func
    code = fn.code
    L = list(args) + fn.local_defaults
    S: list = []
    base = pc = 0
    slots = fn.frame_size
    if fuel is not None:
        if fuel <= 0:
            raise OutOfFuel()
        fuel -= 1
    try:
        while True:
            kind, h, X = code[pc]
            pc += 1
            if kind == 0:
                h(S, L, X)
                continue
            if kind == BR_IF:
                if not S.pop():
                    continue
                kind = BR
            elif kind == BR_TABLE:
                i = S.pop()
                X = X[i] if i < len(X) - 1 else X[-1]
                kind = BR
            if kind == BR:
                target, arity, height = X
                height += base
                if arity:
                    S[height:] = S[len(S) - arity:]
                else:
                    del S[height:]
                if target < pc and fuel is not None:
                    if fuel <= 0:
                        raise OutOfFuel()
                    fuel -= 1
                pc = target
            elif kind == IF:
                if not S.pop():
                    pc = X[0]
            elif kind == JUMP:
                pc = X[0]
            elif kind == CALL or kind == CALL_INDIRECT:
                callee = X if kind == CALL else resolve_indirect(X, S)
                n = callee.nparams
                call_args = S[len(S) - n:] if n else []
                if n:
                    del S[len(S) - n:]
                if type(callee) is HostFunction:
                    owner.fuel = fuel
                    S.extend(callee.invoke(fn.instance, call_args))
                    fuel = owner.fuel
                    continue
                if fuel is not None:
                    if fuel <= 0:
                        raise OutOfFuel()
                    fuel -= 1
                slots += callee.frame_size
                if len(frames) >= MAX_CALL_DEPTH or slots > MAX_STACK_SLOTS:
                    raise Trap("call stack exhausted")
                frames.append((code, pc, L, base, fn))
                fn = callee
                code = fn.code
                pc = 0
                L = call_args + fn.local_defaults
                base = len(S)
            elif kind == RETURN:
                if X:
                    S[base:] = S[len(S) - X:]
                else:
                    del S[base:]
                if not frames:
                    return S
                slots -= fn.frame_size
                code, pc, L, base, fn = frames.pop()
            elif kind == UNREACHABLE:
                raise Trap("unreachable")
    except RecursionError:  # host functions re-entering wasm without end
        raise Trap("call stack exhausted") from None
    finally:
        owner.fuel = fuel
