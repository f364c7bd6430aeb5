"""CPU-bound real programs: popek exec (each tier) beside qemu-riscv64, same inputs.

Workloads: Lua 5.4 running a CPU-bound script, busybox sha256sum and gzip of
generated data, a pthread program (tests/user/pthreads.c, cross-built here when
riscv64-linux-gnu-gcc is installed) and the Go-built esbuild from npm bundling and
minifying tests/user/typescript (fetched with npm into ~/.cache/popek/npm). Guest
instruction counts come from ``popek exec --stats``; the program and input are
deterministic, so QEMU retires the same instructions and its MIPS is that count over
its own wall time (for the threaded programs, whose threads may spin or sleep
differently, only roughly).

    python bench/programs.py [--size-kib N] [--runs N] [--tiers baseline,jit,translate,interp]

Each line gives wall time and the CPU time of the emulator process, the best of
``--runs`` (QEMU's too: its time varies by tens of percent from run to run); MIPS are per
wall second. The native tiers (baseline, jit) run each program twice: with a code-cache
directory holding only the stencil library (cold; the library is built once per popek
version, as at installation: see bench/boot.py) and with the directory the cold run left
(warm). Beside each native run, as in
bench/boot.py: blocks patched from stencils, microseconds per block, blocks patched per
second of patching, blocks compiled by LLVM, and blocks placed from the patched code the
cold run kept, with microseconds per block. The default tiers take a few minutes;
with translate and interp as well, about half an hour, most of it in the interpreter.
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.boot import (  # noqa: E402
    NATIVE_HEADER,
    NATIVE_TIERS,
    cold_cache,
    native_columns,
    stencil_library,
)
from popek import images  # noqa: E402
from tests import registry_packages  # noqa: E402

TESTS = Path(__file__).resolve().parent.parent / "tests"

LUA_SCRIPT = """
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
local t = {}
for i = 1, 20000 do t[i] = string.format("%d:%.3f", i, i / 7) end
table.sort(t)
print(fib(25), #t, t[1], t[#t])
"""


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str]) -> tuple[float, float, bytes, str]:
    """Wall and CPU seconds of running ``cmd``, its stdout and its stderr."""
    cpu0 = child_cpu()
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.decode()[-2000:]}")
    return elapsed, child_cpu() - cpu0, proc.stdout, proc.stderr.decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-kib", type=int, default=2048,
                        help="input size for sha256sum and gzip (default 2048 KiB)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs of each (best kept; a native tier's cold runs each get a "
                        "fresh cache, its warm runs the last cold run's)")
    parser.add_argument("--tiers", default="baseline,jit",
                        help="popek engine tiers to measure, of baseline,jit,translate,interp "
                        "(default baseline,jit)")
    args = parser.parse_args()
    qemu = shutil.which("qemu-riscv64")
    if qemu is None:
        sys.exit("bench/programs.py needs qemu-riscv64: apt-get install qemu-user")
    tiers = args.tiers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        seed, _ = stencil_library(Path(tmp))
        data = Path(tmp) / "input.bin"
        rng = random.Random(1)
        words = [bytes(rng.choices(b"abcdefghij klmnop\n", k=8)) for _ in range(512)]
        data.write_bytes(b"".join(rng.choice(words) for _ in range(args.size_kib * 128)))
        script = Path(tmp) / "bench.lua"
        script.write_text(LUA_SCRIPT)
        busybox, lua = str(images.PROGRAMS / "busybox"), str(images.PROGRAMS / "lua")
        workloads = {
            "lua script": [lua, str(script)],
            f"sha256sum {args.size_kib} KiB": [busybox, "sha256sum", str(data)],
            f"gzip {args.size_kib} KiB": [busybox, "gzip", "-c", "-6", str(data)],
        }
        cc = shutil.which("riscv64-linux-gnu-gcc")
        if cc:
            threaded = Path(tmp) / "pthreads"
            subprocess.run([cc, "-O2", "-static", "-pthread", "-o", str(threaded),
                            str(TESTS / "user" / "pthreads.c")], check=True)
            workloads["pthreads (5 threads)"] = [str(threaded)]
        else:
            print("(no riscv64-linux-gnu-gcc: the pthread workload is left out)")
        try:
            esbuild = str(registry_packages.esbuild())
        except RuntimeError as e:
            print(f"(esbuild is left out: {e})")
        else:
            workloads["esbuild bundle+minify"] = [
                esbuild, str(TESTS / "user" / "typescript" / "src" / "main.ts"), "--bundle",
                "--minify", "--target=es2017", "--format=esm"]
        print(f"{'workload':<22}{'emulator':<28}{'wall s':>9}{'CPU s':>9}{'M insns':>10}"
              f"{'MIPS':>9}{'vs qemu':>10}{NATIVE_HEADER}")
        for name, cmd in workloads.items():
            q_time, q_cpu, q_out, _ = min(timed([qemu, *cmd]) for _ in range(args.runs))
            insns = 0
            rows = []
            for tier in tiers:
                popek = [sys.executable, "-m", "popek", "exec", "--stats", "--engine", tier]
                # a native tier runs twice: with an empty code cache, then with what the
                # first run left in it; the other tiers have no native code to cache
                caches = [str(cold_cache(seed, Path(tempfile.mkdtemp(dir=tmp)) / tier))
                          for _ in range(args.runs)]
                runs = {f"{tier}, cold cache": [["--code-cache", c] for c in caches],
                        f"{tier}, warm cache": [["--code-cache", caches[-1]]] * args.runs} \
                    if tier in NATIVE_TIERS else {tier: [["--no-code-cache"]] * args.runs}
                for label, options in runs.items():
                    p_time, p_cpu, p_out, err = min(timed([*popek, *o, *cmd]) for o in options)
                    if p_out != q_out:
                        raise RuntimeError(f"{name}: popek ({label}) and qemu disagree on "
                                           "output")
                    match = re.search(r"(\d+) guest instructions", err)
                    insns = int(match.group(1)) if match else 0
                    rows.append((f"popek {label}", p_time, p_cpu, native_columns(err)))
            rows.append(("qemu-riscv64", q_time, q_cpu, ""))
            for label, seconds, cpu, native in rows:
                print(f"{name:<22}{label:<28}{seconds:9.2f}{cpu:9.2f}{insns / 1e6:10.1f}"
                      f"{insns / seconds / 1e6:9.2f}{seconds / q_time:9.1f}x{native}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
