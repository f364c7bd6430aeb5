"""CPU-bound WebAssembly: popek's wasm engine beside wasmtime (a JIT), wasm3 (a C
interpreter, PyPI's pywasm3) and pywasm (a pure-Python interpreter), in the same run.

The workloads are tests/wasi/compress.c, compiled here with clang-14 for wasm32-wasi as
a reactor: an LZ77 compression and decompression of generated text (``lz_crc``) and an
n-body simulation in double precision (``nbody_nanojoules``). Every runtime calls the same
exported function of the same module (with WASI linked, though the kernels make no
system calls: pywasm3 0.5 cannot run a whole WASI command) and must return the same
result; the time is that of the call alone, in this process, after instantiation; ratios are
of CPU time (the host may be shared).

    python bench/wasm.py [--lz-kib 32] [--nbody-steps 2000] [--engines interp]
        [--runtimes wasmtime,wasm3,pywasm] [--commands]

With --commands, the whole WASI command (``compress lz N``) also runs in a process of its
own on each runtime that can run one (popek wasm run, wasmtime, pywasm's command line),
startup, loading and translation included, its output compared.

The comparison runtimes are installed into this Python's environment when missing
(pip install wasmtime pywasm3 pywasm). With the defaults the run takes about a minute,
most of it in pywasm.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from popek import wasm  # noqa: E402
from popek.wasm.wasi import Wasi  # noqa: E402

TESTS = Path(__file__).resolve().parent.parent / "tests"
SOURCE = TESTS / "wasi" / "compress.c"
WASMTIME_RUN = TESTS / "wasmtime_run.py"  # wasmtime's command line, on PyPI's wasmtime
LABELS = {"wasmtime": "wasmtime (JIT)", "wasm3": "wasm3 (C interp.)", "pywasm": "pywasm (Python)"}
PACKAGES = {"wasmtime": "wasmtime", "wasm3": "pywasm3", "pywasm": "pywasm"}  # module: pip name
Call = Callable[[str, int], int]  # (export, argument) -> result, the module instantiated


def build(out: Path) -> tuple[Path, Path]:
    """compress.c as a reactor (its kernels exported) and as a WASI command."""
    if shutil.which("clang-14") is None:
        sys.exit("bench/wasm.py needs clang-14 and wasi-libc: apt-get install clang-14 lld-14 "
                 "wasi-libc libclang-rt-14-dev-wasm32")
    modules = out / "kernels.wasm", out / "compress.wasm"
    for model, module in zip(("reactor", "command"), modules, strict=True):
        subprocess.run(["clang-14", "--target=wasm32-wasi", f"-mexec-model={model}", "-O2",
                        "-o", str(module), str(SOURCE)], check=True)
    return modules


def ensure_installed(modules: list[str]) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(PACKAGES[name])
    if missing:
        print(f"installing {' '.join(missing)} with pip", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def popek_runtime(data: bytes, engine: str | None) -> Call:
    wasi = Wasi(["compress"])
    instance = wasm.instantiate(wasm.load(data), wasi.imports(), engine=engine)
    instance.call("_initialize")
    return instance.call


def wasmtime_runtime(data: bytes) -> Call:
    import wasmtime
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    exports = linker.instantiate(store, wasmtime.Module(engine, data)).exports(store)
    exports["_initialize"](store)
    return lambda name, arg: exports[name](store, arg)


def wasm3_runtime(data: bytes) -> Call:
    import wasm3
    environment = wasm3.Environment()
    runtime = environment.new_runtime(1 << 20)
    module = environment.parse_module(data)
    runtime.load(module)
    runtime.find_function("_initialize")()
    return lambda name, arg, module=module: runtime.find_function(name)(arg)


def pywasm_runtime(data: bytes) -> Call:
    import pywasm
    import pywasm.wasi
    runtime = pywasm.core.Runtime()
    pywasm.wasi.Preview1(["compress"], {}, {}).bind(runtime)
    with tempfile.NamedTemporaryFile(suffix=".wasm") as file:
        file.write(data)
        file.flush()
        instance = runtime.instance_from_file(file.name)
    runtime.invocate(instance, "_initialize", [])
    return lambda name, arg: runtime.invocate(instance, name, [arg])[0]


def timed(call: Call, export: str, arg: int, bits: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of one call, and its result (unsigned: runtimes differ in
    how they hand over integers)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call(export, arg)
    return time.perf_counter() - wall, time.process_time() - cpu, result & (1 << bits) - 1


def command_lines(engines: list[str], others: list[str], module: Path,
                  args: list[str]) -> dict[str, list[str]]:
    """How each runtime that can (pywasm3 has no WASI) runs the whole command ``module args``."""
    lines = {f"popek ({e})": [sys.executable, "-m", "popek", "wasm", "run",
                              *([] if e == "default" else ["--engine", e]), str(module), *args]
             for e in engines}
    if "wasmtime" in others:
        lines[LABELS["wasmtime"]] = [sys.executable, str(WASMTIME_RUN), str(module), *args]
    if "pywasm" in others:
        lines[LABELS["pywasm"]] = [sys.executable, "-m", "pywasm", "--wasi", "preview1",
                                   *(f"--wasi-args={a}" for a in args), str(module)]
    return lines


def timed_command(command: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds of a whole run (startup, loading, translation included) and
    a checksum of what it printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    done = subprocess.run(command, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.perf_counter() - wall, cpu, zlib.crc32(done.stdout)


def print_table(heading: str, rows: list[tuple[str, dict[str, tuple[float, float, int]]]]) -> None:
    """Each workload's runtimes, with the first runtime's CPU time over each one's."""
    first = next(iter(rows[0][1]))
    print(f"\n{heading}\n{'workload':<20} {'runtime':<20} {'wall s':>10} {'CPU s':>10} "
          f"{'result':>18}  {first} CPU time / this")
    for title, measured in rows:
        reference = measured[first]
        for label, (wall, cpu, result) in measured.items():
            ratio = reference[1] / cpu if cpu else float("inf")
            note = "" if result == reference[2] else "  DIFFERENT RESULT"
            print(f"{title:<20} {label:<20} {wall:>10.4g} {cpu:>10.4g} {result:>18x}  "
                  f"{ratio:>10.2f}x{note}")
            title = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lz-kib", type=int, default=32, help="text to compress (KiB)")
    parser.add_argument("--nbody-steps", type=int, default=2000, help="n-body steps")
    parser.add_argument("--engines", default="default",
                        help="popek engines to measure, comma-separated (default: its default)")
    parser.add_argument("--runtimes", default="wasmtime,wasm3,pywasm",
                        help="comparison runtimes (default wasmtime,wasm3,pywasm)")
    parser.add_argument("--commands", action="store_true",
                        help="also run the whole WASI command on each runtime that can")
    args = parser.parse_args()
    others = [r for r in args.runtimes.split(",") if r]
    ensure_installed(others)
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        reactor, command = build(Path(tmp))
        data = reactor.read_bytes()
        runtimes: dict[str, Callable[[], Call]] = {}
        for engine in engines:
            runtimes[f"popek ({engine})"] = \
                lambda e=engine: popek_runtime(data, None if e == "default" else e)
        factories = {"wasmtime": wasmtime_runtime, "wasm3": wasm3_runtime,
                     "pywasm": pywasm_runtime}
        for name in others:
            runtimes[LABELS[name]] = lambda f=factories[name]: f(data)
        workloads = [(f"lz {args.lz_kib} KiB", "lz_crc", args.lz_kib, 32, ["lz", str(args.lz_kib)]),
                     (f"nbody {args.nbody_steps} steps", "nbody_nanojoules", args.nbody_steps, 64,
                      ["nbody", str(args.nbody_steps)])]
        print_table("The exported kernels, called after instantiation:",
                    [(title, {label: timed(make(), export, arg, bits)
                              for label, make in runtimes.items()})
                     for title, export, arg, bits, _ in workloads])
        if not args.commands:
            return 0
        rows = [(title, {label: timed_command(line) for label, line in
                         command_lines(engines, others, command, argv).items()})
                for title, _, _, _, argv in workloads]
        print_table("Whole WASI commands (compress lz|nbody N), startup included:", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
