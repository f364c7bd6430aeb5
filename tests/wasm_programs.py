"""Random valid WebAssembly programs (text format), for differential tests between tiers,
and the comparison of a module's runs with wabt's interpreter.

Each function computes a typed expression tree over its parameters and locals, with
statements before it: local writes, stores, bounded loops, calls of earlier functions.
The numbers are chosen to reach the edges (overflow, NaNs, signed zeros, out-of-bounds
addresses, division by zero), so many calls trap, which the tiers must agree on too.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import popek.wasm as wasm
from popek.wasm import numeric

TYPES = ("i32", "i64", "f32", "f64")
INT_BINARY = ("add", "sub", "mul", "div_s", "div_u", "rem_s", "rem_u", "and", "or", "xor",
              "shl", "shr_s", "shr_u", "rotl", "rotr")
INT_UNARY = ("clz", "ctz", "popcnt", "extend8_s", "extend16_s")
INT_COMPARE = ("eq", "ne", "lt_s", "lt_u", "gt_s", "gt_u", "le_s", "le_u", "ge_s", "ge_u")
FLOAT_BINARY = ("add", "sub", "mul", "div", "min", "max", "copysign")
FLOAT_UNARY = ("abs", "neg", "ceil", "floor", "trunc", "nearest", "sqrt")
FLOAT_COMPARE = ("eq", "ne", "lt", "gt", "le", "ge")
FLOAT_CONSTANTS = ("0", "-0", "1.5", "-2.5", "0.5", "inf", "-inf", "nan", "nan:0x200",
                   "1e30", "-1e-30", "3", "4294967296", "-2147483649")


class ProgramGenerator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.signatures: list[tuple[list[str], str]] = []

    def const(self, t: str) -> str:
        r = self.rng
        if t in ("i32", "i64"):
            bits = int(t[1:])
            v = r.choice([0, 1, -1, 7, 255, 1 << (bits - 1), (1 << (bits - 1)) - 1,
                          r.randrange(-1000, 1000), r.getrandbits(bits) - (1 << (bits - 1))])
            return f"({t}.const {v})"
        return f"({t}.const {r.choice([*FLOAT_CONSTANTS, repr(r.uniform(-1e6, 1e6))])})"

    def address(self, depth: int, locals_: list[str]) -> str:
        mask = self.rng.choice([0xFF, 0xFFF, 0xFFFF, 0x1FFFF])  # memory is 2 pages: some miss
        return f"(i32.and {self.expr('i32', depth, locals_)} (i32.const {mask}))"

    def expr(self, t: str, depth: int, locals_: list[str]) -> str:  # noqa: C901
        r = self.rng
        same = [i for i, lt in enumerate(locals_) if lt == t]
        if depth <= 0 or r.random() < 0.2:
            return f"(local.get {r.choice(same)})" if same and r.random() < 0.6 else self.const(t)
        d = depth - 1
        sub = lambda u: self.expr(u, d, locals_)  # noqa: E731
        k = r.random()
        if t in ("i32", "i64"):
            if k < 0.3:
                return f"({t}.{r.choice(INT_BINARY)} {sub(t)} {sub(t)})"
            if k < 0.38:
                return f"({t}.{r.choice(INT_UNARY)} {sub(t)})"
            if k < 0.46:
                c = r.choice(TYPES)
                ops = INT_COMPARE if c[0] == "i" else FLOAT_COMPARE
                test = (f"({c}.eqz {sub(c)})" if c[0] == "i" and r.random() < 0.2 else
                        f"({c}.{r.choice(ops)} {sub(c)} {sub(c)})")
                return test if t == "i32" else f"(i64.extend_i32_{r.choice('su')} {test})"
            if k < 0.54:
                f = r.choice(("f32", "f64"))
                return r.choice([
                    f"({t}.trunc_{f}_{r.choice('su')} {sub(f)})",
                    f"({t}.trunc_sat_{f}_{r.choice('su')} {sub(f)})",
                    f"(i32.wrap_i64 {sub('i64')})" if t == "i32" else f"(i64.extend32_s {sub(t)})",
                    f"({t}.reinterpret_{'f32' if t == 'i32' else 'f64'} "
                    f"{sub('f32' if t == 'i32' else 'f64')})",
                ])
            if k < 0.62:
                widths = ["", "8_s", "8_u", "16_s", "16_u"]
                widths += ["32_s", "32_u"] if t == "i64" else []
                return (f"({t}.load{r.choice(widths)} offset={r.randrange(64)} "
                        f"{self.address(d, locals_)})")
        else:
            other = "f64" if t == "f32" else "f32"
            bits = "i32" if t == "f32" else "i64"
            if k < 0.3:
                return f"({t}.{r.choice(FLOAT_BINARY)} {sub(t)} {sub(t)})"
            if k < 0.4:
                return f"({t}.{r.choice(FLOAT_UNARY)} {sub(t)})"
            if k < 0.5:
                i = r.choice(("i32", "i64"))
                return r.choice([
                    f"({t}.{'demote' if t == 'f32' else 'promote'}_{other} {sub(other)})",
                    f"({t}.convert_{i}_{r.choice('su')} {sub(i)})",
                    f"({t}.reinterpret_{bits} {sub(bits)})",
                ])
            if k < 0.56:
                return f"({t}.load offset={r.randrange(64)} {self.address(d, locals_)})"
        if k < 0.68:
            return f"(select {sub(t)} {sub(t)} {sub('i32')})"
        if k < 0.76:
            return (f"(if (result {t}) {sub('i32')} (then {self.statements(d, locals_)} "
                    f"{sub(t)}) (else {sub(t)}))")
        if k < 0.84:
            return (f"(block (result {t}) {self.statements(d, locals_)} "
                    f"(drop (br_if 0 {sub(t)} {sub('i32')})) {sub(t)})")
        writable = [i for i in same if i < len(locals_) - 1]  # not the loop counter
        if k < 0.9 and writable:
            return f"(local.tee {r.choice(writable)} {sub(t)})"
        callees = [i for i, (_, result) in enumerate(self.signatures) if result == t]
        if k < 0.96 and callees:
            f = r.choice(callees)
            return f"(call {f} {' '.join(sub(p) for p in self.signatures[f][0])})"
        return self.const(t)

    def statements(self, depth: int, locals_: list[str], in_loop: bool = False) -> str:
        """Statements; ``locals_[-1]`` is an i32 reserved as the loop counter."""
        r = self.rng
        out = []
        for _ in range(r.randrange(3)):
            k = r.random()
            if k < 0.4 and len(locals_) > 1:
                i = r.randrange(len(locals_) - 1)
                out.append(f"(local.set {i} {self.expr(locals_[i], depth - 1, locals_)})")
            elif k < 0.7:
                t = r.choice(TYPES)
                width = r.choice(["", "8", "16"]) if t[0] == "i" else ""
                value = self.expr(t, depth - 1, locals_)
                out.append(f"({t}.store{width} offset={r.randrange(64)} "
                           f"{self.address(depth - 1, locals_)} {value})")
            elif k < 0.85 and not in_loop:
                c = len(locals_) - 1
                body = self.statements(depth - 1, locals_, in_loop=True)
                out.append(f"(local.set {c} (i32.const {r.randrange(1, 6)})) "
                           f"(loop (local.set {c} (i32.sub (local.get {c}) (i32.const 1))) "
                           f"{body} (br_if 0 (local.get {c})))")
            else:
                out.append(f"(drop {self.expr(r.choice(TYPES), depth - 1, locals_)})")
        return " ".join(out)

    def module(self, functions: int, thunks: bool = False) -> str:
        """``functions`` exported as ``f0``...; with ``thunks``, each also called with
        constant arguments by an export ``t0``... that takes none (for runners that pass
        no arguments, such as wabt's ``wasm-interp --run-all-exports``)."""
        r = self.rng
        funcs = []
        for i in range(functions):
            params = [r.choice(TYPES) for _ in range(r.randrange(4))]
            result = r.choice(TYPES)
            extra = [r.choice(TYPES) for _ in range(r.randrange(3))] + ["i32"]
            locals_ = params + extra
            body = f"{self.statements(4, locals_)} {self.expr(result, 5, locals_)}"
            self.signatures.append((params, result))
            p = f"(param {' '.join(params)}) " if params else ""
            funcs.append(f'(func (export "f{i}") {p}(result {result}) '
                         f'(local {" ".join(extra)}) {body})')
        if thunks:
            for i, (params, result) in enumerate(self.signatures):
                args = " ".join(self.const(t) for t in params)
                funcs.append(f'(func (export "t{i}") (result {result}) (call {i} {args}))')
        return "(module (memory 2)\n" + "\n".join(funcs) + ")\n"


def _as_wasm_interp_prints(inst: wasm.Instance, name: str, result: str) -> str:
    try:
        value = inst.exports[name].call_raw([])  # type: ignore[union-attr]
    except wasm.Trap as trap:
        return f"error: {trap.message}"
    if not value:
        return ""
    if result in ("f32", "f64"):
        x = numeric.f32(value[0]) if result == "f32" else numeric.f64(value[0])
        return f"{result}:{'nan' if x != x else f'{x:f}'}"  # C's %f, as wabt prints
    return f"{result}:{value[0]}"


def assert_runs_as_wasm_interp(path: Path, wasm_interp: str) -> None:
    """Every export without parameters, called in order on each tier (memory carrying
    over), returns or traps as ``wasm-interp --run-all-exports`` reports."""
    run = subprocess.run([wasm_interp, "--run-all-exports", str(path)], capture_output=True,
                         text=True, timeout=60)
    wabt = dict(line.split("() =>") for line in run.stdout.splitlines() if "() =>" in line)
    module = wasm.load(path.read_bytes())
    for engine in ("interp", "translate", "jit"):
        inst = wasm.instantiate(module, engine=engine)
        ours = {}
        for name, f in inst.exports.items():
            if isinstance(f, wasm.Function) and not f.type.params:
                ours[name] = _as_wasm_interp_prints(inst, name, "".join(f.type.results[:1]))
        assert ours.keys() == wabt.keys()
        for name, printed in wabt.items():
            printed = printed.strip().replace("-nan", "nan")
            assert printed.startswith(ours[name]), (engine, name, printed, ours[name])
