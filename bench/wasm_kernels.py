"""WebAssembly core: popek's tiers beside other runtimes on the same compiled kernels.

The freestanding C kernels of tests/wasm/kernels.c (sorting, CRC-32, 64-bit mixing,
float series, indirect calls, switches, recursion, conversions, a bytecode interpreter)
are compiled once by clang-14 (-O2, ``-DSCALE`` from ``--scale``) and each runtime runs
every kernel ``--rounds`` times in one fresh instance (translation and JIT compilation
included), checking that all runtimes return the same results. Beside popek: wasmtime
(Cranelift JIT), wasm3 (pywasm3, an interpreter in C) and pywasm (an interpreter in pure
Python), from PyPI:

    pip install wasmtime pywasm3 pywasm
    python bench/wasm_kernels.py [--rounds N] [--scale N] [--skip pywasm]

Each line gives the CPU seconds of the run and the ratio to popek's native tier (jit).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import popek.wasm as popek_wasm  # noqa: E402

SOURCE = Path(__file__).resolve().parent.parent / "tests" / "wasm" / "kernels.c"
KERNELS = ("sort_checksum", "crc32_of_data", "mix64", "series", "float_mix", "dispatch",
           "switchy", "recursion", "conversions", "bytecode")

Runner = Callable[[bytes, int], list]


def compile_kernels(out: Path, scale: int) -> bytes:
    clang, ld = shutil.which("clang-14"), shutil.which("wasm-ld-14")
    if clang is None or ld is None:
        sys.exit("bench/wasm_kernels.py: needs clang-14 and lld-14 (Debian packages)")
    subprocess.run([clang, "--target=wasm32", "-O2", f"-DSCALE={scale}", "-nostdlib",
                    "-Wl,--no-entry",
                    "-Wl,--export-all", f"-fuse-ld={ld}", "-o", str(out), str(SOURCE)],
                   check=True, timeout=300)
    return out.read_bytes()


def _popek(engine: str) -> Runner:
    def run(data: bytes, rounds: int) -> list:
        inst = popek_wasm.instantiate(popek_wasm.load(data), engine=engine)
        return [inst.exports[k](*()) for _ in range(rounds) for k in KERNELS]
    return run


def _wasmtime(data: bytes, rounds: int) -> list:
    import wasmtime
    store = wasmtime.Store()
    inst = wasmtime.Instance(store, wasmtime.Module(store.engine, data), [])
    exports = inst.exports(store)
    return [exports[k](store) for _ in range(rounds) for k in KERNELS]


def _wasm3(data: bytes, rounds: int) -> list:
    import wasm3
    env = wasm3.Environment()
    runtime = env.new_runtime(1 << 20)
    runtime.load(env.parse_module(data))
    return [runtime.find_function(k)() for _ in range(rounds) for k in KERNELS]


def _pywasm(data: bytes, rounds: int) -> list:
    import pywasm
    runtime = pywasm.core.Runtime()
    with tempfile.NamedTemporaryFile(suffix=".wasm") as f:
        f.write(data)
        f.flush()
        inst = runtime.instance_from_file(f.name)
    return [runtime.invocate(inst, k, [])[0] for _ in range(rounds) for k in KERNELS]


RUNTIMES: dict[str, Runner] = {
    "popek interp": _popek("interp"), "popek translate": _popek("translate"),
    "popek jit": _popek("jit"),
    "wasmtime": _wasmtime, "wasm3": _wasm3, "pywasm": _pywasm,
}


def _same(a: object, b: object) -> bool:
    """Results agree: integers as bits of their width, floats to their printed digits."""
    if isinstance(a, float) or isinstance(b, float):
        return f"{float(a):.6g}" == f"{float(b):.6g}"  # type: ignore[arg-type]
    difference = int(a) - int(b)  # type: ignore[call-overload]
    return difference % (1 << 32) == 0  # i32 and i64 results (signed or not) as their bits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=20, help="kernel length (-DSCALE)")
    parser.add_argument("--skip", default="", help="comma-separated runtimes to leave out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = compile_kernels(Path(tmp) / "kernels.wasm", args.scale)
    skip = set(filter(None, args.skip.split(",")))
    times: dict[str, float] = {}
    reference = None
    for name, run in RUNTIMES.items():
        if name in skip:
            continue
        try:
            start = time.process_time()
            results = run(data, args.rounds)
            times[name] = time.process_time() - start
        except ImportError:
            print(f"{name:16} not installed (pip install wasmtime pywasm3 pywasm)")
            continue
        if reference is None:
            reference = results
        elif not all(_same(a, b) for a, b in zip(reference, results, strict=True)):
            print(f"{name:16} DISAGREES: {results} vs {reference}")
        base = times.get("popek jit")
        ratio = f"{times[name] / base:8.2f}x popek jit" if base else ""
        print(f"{name:16} {times[name]:8.3f} s CPU {ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
