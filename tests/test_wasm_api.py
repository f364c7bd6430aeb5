"""The embedding API of popek.wasm (what the WASI layer builds on) and hostile modules.

Modules are assembled by wabt's ``wat2wasm``. Hostile input (mutated binaries, runaway
loops, huge memories and tables, host functions that fail) must end in a wasm error or the
host's own exception, never in any other exception out of popek.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

import popek.wasm as wasm
from popek.wasm.spectest import spectest_module

TIMEOUT = 60


def wat(text: str, tmp_path: Path) -> bytes:
    tool = shutil.which("wat2wasm")
    if tool is None:
        pytest.fail("wat2wasm is missing: ./quickstart installs Debian's wabt")
    src, out = tmp_path / "m.wat", tmp_path / "m.wasm"
    src.write_text(text)
    subprocess.run([tool, str(src), "-o", str(out)], check=True, timeout=TIMEOUT)
    return out.read_bytes()


ECHO = """
(module
  (import "host" "write" (func $write (param i32 i32) (result i32)))
  (import "host" "scale" (func $scale (param f64) (result f64 i64)))
  (memory (export "memory") 1 4)
  (data (i32.const 16) "hello")
  (func (export "greet") (result i32) (call $write (i32.const 16) (i32.const 5)))
  (func (export "scaled") (param f64) (result f64) (call $scale (local.get 0)) (drop))
  (func (export "neg") (param i32) (result i32) (i32.sub (i32.const 0) (local.get 0)))
  (func (export "half") (param f32) (result f32) (f32.mul (local.get 0) (f32.const 0.5)))
  (func (export "spin") (loop (br 0)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0))))
"""


def _instance(tmp_path: Path, written: list[bytes], **kwargs: object) -> wasm.Instance:
    def write(caller: wasm.Instance, ptr: int, n: int) -> int:
        written.append(caller.memory.read(ptr, n))
        caller.memory.store_u32(0, 0xDEADBEEF)
        return n

    imports = {"host": {"write": wasm.HostFunction(["i32", "i32"], ["i32"], write),
                        "scale": wasm.HostFunction(["f64"], ["f64", "i64"],
                                                   lambda caller, x: (x * 3, -1))}}
    return wasm.instantiate(wasm.load(wat(ECHO, tmp_path)), imports, **kwargs)


def test_host_functions_see_the_callers_memory(tmp_path: Path) -> None:
    written: list[bytes] = []
    inst = _instance(tmp_path, written)
    assert inst.call("greet") == 5
    assert written == [b"hello"]
    mem = inst.exports["memory"]
    assert isinstance(mem, wasm.Memory) and mem.size == 65536
    assert mem.load_u32(0) == 0xDEADBEEF and mem.read(0, 4) == b"\xef\xbe\xad\xde"
    mem.store_u64(8, 0x0102030405060708)
    assert mem.load_u64(8) == 0x0102030405060708
    mem.write(100, b"xyz")
    assert mem.read(99, 5) == b"\0xyz\0"
    with pytest.raises(wasm.Trap, match="out of bounds memory access"):
        mem.read(65535, 2)


def test_values_cross_the_boundary(tmp_path: Path) -> None:
    inst = _instance(tmp_path, [])
    assert inst.call("neg", 5) == 0xFFFFFFFB  # integers come back as their unsigned bits
    assert inst.call("neg", -5) == 5
    assert inst.call("half", 3.0) == 1.5
    assert inst.call("scaled", 1.25) == 3.75
    f = inst.exports["neg"]
    assert isinstance(f, wasm.Function) and f(1) == 0xFFFFFFFF


@pytest.mark.parametrize("engine", ["interp", "translate"])
def test_fuel_stops_a_runaway_loop(tmp_path: Path, engine: str) -> None:
    inst = _instance(tmp_path, [], fuel=1000, engine=engine)
    with pytest.raises(wasm.OutOfFuel):
        inst.call("spin")


def test_memory_limit(tmp_path: Path) -> None:
    inst = _instance(tmp_path, [], max_memory=2 * 65536)
    assert inst.call("grow", 1) == 1
    assert inst.call("grow", 1) == 0xFFFFFFFF  # -1: beyond max_memory, though within max 4
    with pytest.raises(wasm.Trap, match="exceeds the limit"):
        wasm.instantiate(wasm.load(wat("(module (memory 100))", tmp_path)), max_memory=65536)


def test_huge_declared_table_is_refused(tmp_path: Path) -> None:
    module = wasm.load(wat("(module (table 4000000000 funcref))", tmp_path))
    with pytest.raises(wasm.Trap, match="exceeds the limit"):
        wasm.instantiate(module)


def test_host_exception_propagates_unchanged(tmp_path: Path) -> None:
    class Exit(Exception):
        pass

    def leave(caller: wasm.Instance) -> None:
        raise Exit(3)

    module = wasm.load(wat('(module (import "h" "exit" (func $e)) '
                           '(func (export "main") (call $e) (unreachable)))', tmp_path))
    inst = wasm.instantiate(module, {"h": {"exit": wasm.HostFunction([], [], leave)}})
    with pytest.raises(Exit):
        inst.call("main")


def test_missing_or_mistyped_import(tmp_path: Path) -> None:
    module = wasm.load(wat('(module (import "h" "f" (func (param i32))))', tmp_path))
    with pytest.raises(wasm.LinkError, match="unknown import"):
        wasm.instantiate(module)
    with pytest.raises(wasm.LinkError, match="incompatible import type"):
        wasm.instantiate(module, {"h": {"f": wasm.HostFunction([], [], lambda c: None)}})


def _loads(data: bytes) -> bool:
    try:
        wasm.load(data)
    except wasm.WasmError:
        return False
    return True


@pytest.mark.parametrize("engine", ["interp", "translate"])
def test_mutated_modules_fail_only_with_wasm_errors(tmp_path: Path, engine: str) -> None:
    """Random corruptions of the valid spec test modules: each one decodes and runs, or is
    rejected, or traps; no other exception escapes."""
    seeds = [wat(ECHO, tmp_path)]
    for script in sorted((Path(__file__).parent / "wasm").glob("*.wast")):
        subprocess.run([shutil.which("wast2json") or "wast2json", str(script), "-o",
                        str(tmp_path / (script.stem + ".json"))], check=True, timeout=TIMEOUT)
    seeds += [p.read_bytes() for p in sorted(tmp_path.glob("*.wasm")) if _loads(p.read_bytes())]
    rng = random.Random(17)
    outcomes = {"ran": 0, "rejected": 0}
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 2)):
            if not data:
                break
            pos = rng.randrange(len(data))
            if rng.random() < 0.95:
                data[pos] = rng.randrange(256)
            else:
                del data[pos:]
        try:
            inst = wasm.instantiate(wasm.load(bytes(data)), {"spectest": spectest_module()},
                                    fuel=2000, max_memory=1 << 20, engine=engine)
            for f in inst.exports.values():
                if isinstance(f, wasm.Function):
                    try:
                        f(*[0 if t[0] == "i" else 0.0 if t[0] == "f" else None
                            for t in f.type.params])
                    except wasm.WasmError:
                        pass
            outcomes["ran"] += 1
        except wasm.WasmError:
            outcomes["rejected"] += 1
    assert outcomes["ran"] > 40 and outcomes["rejected"] > 300, outcomes


def test_tiers_run_out_of_fuel_at_the_same_point(tmp_path: Path) -> None:
    """Fuel is spent by calls and loop iterations alike on every tier, so a program stops
    with the same state whichever tier runs it."""
    module = wasm.load(wat("""
        (module
          (global $n (export "n") (mut i32) (i32.const 0))
          (func $step (global.set $n (i32.add (global.get $n) (i32.const 1))))
          (func (export "run")
            (loop (call $step) (block (br_if 1 (i32.const 1)))  (br 0))))""", tmp_path))
    counts = []
    for engine in ("interp", "translate"):
        inst = wasm.instantiate(module, fuel=1001, engine=engine)
        with pytest.raises(wasm.OutOfFuel):
            inst.call("run")
        counts.append(inst.exports["n"].value)
    assert counts == [500, 500]
