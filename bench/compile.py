"""Tier 2 compile cost per block, by phase: what a block costs before it runs natively.

Runs the Lua workload of ``bench/programs.py`` under ``popek exec --engine jit``,
records every batch of blocks the engine sends to the native compiler, then compiles
those batches again in a fresh runtime, timing each phase: IR emission (Python),
``parse_assembly``, the runtime's pass pipeline, and code generation (``finalize_object``).

    python bench/compile.py [--repeat N]

Prints milliseconds per block for each phase and IR bytes per block (CPU time of
this process, so other load on the machine inflates it less than wall time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.programs import LUA_SCRIPT  # noqa: E402
from popek import cli, images  # noqa: E402
from popek.engine import irtext as ir  # noqa: E402
from popek.engine import jit  # noqa: E402

Batch = list[tuple[list, tuple[int, ...], bool]]


def record_batches() -> tuple[jit.NativeRuntime, list[Batch]]:
    """The batches of blocks a Lua run compiles, and the runtime that compiled them."""
    batches: list[Batch] = []
    runtimes: list[jit.NativeRuntime] = []
    original = jit.NativeRuntime.compile_later

    def recording(self: jit.NativeRuntime, blocks: list) -> None:
        batches.append([(decoded, offsets, fp) for _, decoded, offsets, fp in blocks])
        runtimes.append(self)
        original(self, blocks)

    jit.NativeRuntime.compile_later = recording
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "bench.lua"
            script.write_text(LUA_SCRIPT)
            cli.main(["exec", "--engine", "jit", str(images.PROGRAMS / "lua"), str(script)])
    finally:
        jit.NativeRuntime.compile_later = original
    jit.NativeRuntime.wait_compiles()
    return runtimes[0], batches


def measure(runtime: jit.NativeRuntime, batches: list[Batch]) -> dict[str, float]:
    """CPU seconds per phase over all batches (the runtime's own pass pipeline), IR bytes
    and blocks compiled."""
    llvm = jit.llvm
    totals = dict.fromkeys(("emit", "parse", "passes", "codegen"), 0.0)
    totals["bytes"] = totals["blocks"] = 0
    runtime.start_over()
    clock = time.process_time
    for blocks in batches:
        t0 = clock()
        module = ir.Module(name="batch")
        names = [n for d, o, fp in blocks
                 if (n := runtime._emit_block(module, d, o, fp)) is not None]
        text = str(module)
        t1 = clock()
        if not names:
            continue
        with jit.LLVM_LOCK:
            mod = llvm.parse_assembly(text)
            t2 = clock()
            runtime.passes.run(mod, runtime.pass_builder)
            t3 = clock()
            runtime.engine.add_module(mod)
            runtime.engine.finalize_object()
            for n in names:
                runtime.engine.get_function_address(n)
            runtime.engine.remove_module(mod)
        t4 = clock()
        for key, dt in zip(("emit", "parse", "passes", "codegen"), (t1 - t0, t2 - t1, t3 - t2,
                                                                     t4 - t3), strict=True):
            totals[key] += dt
        totals["bytes"] += len(text)
        totals["blocks"] += len(names)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3,
                        help="compile the recorded batches this many times (default 3)")
    args = parser.parse_args()
    runtime, batches = record_batches()
    print(f"{sum(map(len, batches))} blocks in {len(batches)} batches")
    for _ in range(args.repeat):
        t = measure(runtime, batches)
        n = t["blocks"]
        phases = "  ".join(f"{k} {1e3 * t[k] / n:.3f}" for k in ("emit", "parse", "passes",
                                                                  "codegen"))
        total = sum(t[k] for k in ("emit", "parse", "passes", "codegen"))
        print(f"{n} blocks: ms/block {phases}  total {1e3 * total / n:.3f};"
              f"  IR bytes/block {t['bytes'] / n:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
