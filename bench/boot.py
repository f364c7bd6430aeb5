"""Boot benchmark: launch to guest userspace, popek beside qemu-system-riscv64.

Both boot the same bundled kernel and initramfs with the same command line; the
clock stops when the guest's init prints its first line (the POPEK-CMD-BEGIN
marker), i.e. when userspace runs. popek's guest instruction count comes from
``popek run --stats`` (the whole run, including the short shutdown).

    python bench/boot.py [--runs N] [--bios popek|opensbi] [--tiers baseline,jit,translate,interp]

Each line also gives the CPU time the emulator process used (the whole run), which a
busy host does not inflate the way it inflates wall time. The native tiers boot twice
per run: with a code-cache directory that holds nothing but the stencil library (cold,
a fresh one each time: a new guest's first boot; the library is built once per popek
version, as at installation, and the time that took is printed once) and again with
the directory the cold boot left (warm). ``baseline`` never loads LLVM and, warm,
places the patched code the cold boot kept instead of patching again; ``jit`` compiles
its hottest blocks, cold, and finds them native from the first instruction, warm.
Beside each run: the blocks patched from stencils (``popek run --stats``), the
microseconds patching took per block, the blocks patched per second of patching, the
blocks LLVM compiled, and the blocks placed from kept patched code with the
microseconds each took.
"""

from __future__ import annotations

import argparse
import base64
import lzma
import os
import re
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from popek import images  # noqa: E402

MARKER = b"POPEK-CMD-BEGIN"
APPEND = "console=ttyS0 popek.cmd=" + base64.b64encode(b"true").decode()
NATIVE_TIERS = ("baseline", "jit")  # the tiers that keep native code in a code cache
NATIVE_STATS = re.compile(r"native code: (\d+) blocks patched from stencils "
                          r"\(([\d.]+) us each\), (\d+) blocks compiled by LLVM, "
                          r"(\d+) blocks placed from kept patched code \(([\d.]+) us each\)")
NATIVE_HEADER = f"{'patched':>9}{'us/blk':>8}{'blk/s':>9}{'LLVM':>7}{'placed':>8}{'us/blk':>8}"


# What a first run after installation leaves in the cache besides the stencil library:
# the interpreter handlers' compiled code (~30 ms), which depends on popek alone.
SEED_HANDLERS = """
import sys
from pathlib import Path
from popek.engine import handlers, jit
from popek.engine.native_cache import CACHE
CACHE.configure(Path(sys.argv[1]))
CACHE.open(jit.toolchain())
handlers._compiled()
CACHE.flush()
"""


def stencil_library(tmp: Path) -> tuple[Path, float]:
    """A code-cache directory holding only what depends on popek alone, not on guest
    code: the stencil library, built now (as popek builds it: ``python -m
    popek.engine.stencils``), and the interpreter handlers' code; and the seconds the
    library took."""
    from popek.engine import stencils
    seed = tmp / "stencil-library"
    path = stencils.library_path(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    built = subprocess.run([sys.executable, "-m", "popek.engine.stencils"], check=True,
                           capture_output=True)
    path.write_bytes(built.stdout)
    elapsed = time.monotonic() - start
    subprocess.run([sys.executable, "-c", SEED_HANDLERS, str(seed)], check=True)
    return seed, elapsed


def cold_cache(seed: Path, where: Path) -> Path:
    """A fresh code-cache directory with the stencil library (see stencil_library)."""
    shutil.copytree(seed, where)
    return where


def native_columns(stderr: str) -> str:
    """The blocks patched, microseconds per block, blocks per second of patching, blocks
    compiled by LLVM, and blocks placed from the patched code a cold run kept with the
    microseconds each took, that ``--stats`` reported in ``stderr``, as columns under
    NATIVE_HEADER (blank for a tier without native code)."""
    match = NATIVE_STATS.search(stderr)
    if match is None or int(match.group(1)) + int(match.group(4)) == 0:
        return ""
    patched, each, compiled = int(match.group(1)), float(match.group(2)), int(match.group(3))
    placed, placing = int(match.group(4)), float(match.group(5))
    return (f"{patched:9d}{each:8.1f}{1e6 / each if each else 0:9.0f}{compiled:7d}"
            f"{placed:8d}{placing:8.1f}")


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_to_marker(cmd: list[str], timeout: float = 900) -> tuple[float, float, bytes]:
    """Seconds from launch until MARKER appears on stdout; then wait for exit. Also the
    CPU seconds the process used in all."""
    cpu0 = child_cpu()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen = b""
    elapsed = None
    while elapsed is None:
        if time.monotonic() - start > timeout:
            proc.kill()
            raise RuntimeError(f"{cmd[0]}: no userspace after {timeout} s")
        if not sel.select(timeout=1):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise RuntimeError(f"{cmd[0]} exited before userspace:\n{seen[-2000:].decode()}")
        seen += chunk
        if MARKER in seen:
            elapsed = time.monotonic() - start
    _, err = proc.communicate(timeout=timeout)
    return elapsed, child_cpu() - cpu0, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="boots per emulator (best is kept)")
    parser.add_argument("--bios", default="popek", choices=["popek", "opensbi"],
                        help="popek's firmware (QEMU always uses its default OpenSBI)")
    parser.add_argument("--tiers", default="baseline,jit",
                        help="popek engine tiers to boot, of baseline,jit,translate,interp "
                        "(default baseline,jit)")
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-riscv64")
    if qemu is None:
        sys.exit("bench/boot.py needs qemu-system-riscv64: apt-get install qemu-system-misc")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "Image"
        kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
        qemu_cmd = [qemu, "-M", "virt", "-m", "256M", "-nographic", "-kernel", str(kernel),
                    "-initrd", str(images.INITRD), "-append", APPEND]
        q, q_cpu, _ = min(time_to_marker(qemu_cmd) for _ in range(args.runs))
        seed, built = stencil_library(Path(tmp))
        for tier in args.tiers.split(","):
            popek_cmd = [sys.executable, "-m", "popek", "run", "--stats", "--bios", args.bios,
                         "--engine", tier, "--kernel", str(kernel), "--initrd",
                         str(images.INITRD), "--append", APPEND]
            if tier not in NATIVE_TIERS:
                runs = {tier: [time_to_marker([*popek_cmd, "--no-code-cache"])
                               for _ in range(args.runs)]}
            else:
                cold, warm = f"{tier}, cold cache", f"{tier}, warm cache"
                runs = {cold: [], warm: []}
                for n in range(args.runs):
                    cache = ["--code-cache",
                             str(cold_cache(seed, Path(tmp) / f"code-{tier}-{n}"))]
                    runs[cold].append(time_to_marker([*popek_cmd, *cache]))
                    runs[warm].append(time_to_marker([*popek_cmd, *cache]))
            for label, results in runs.items():
                p, p_cpu, err = min(results)
                match = re.search(r"(\d+) guest instructions", err.decode())
                rows.append((label, p, p_cpu, int(match.group(1)) if match else 0,
                             native_columns(err.decode())))
    print("Linux 6.1 boot to userspace (bundled kernel + initramfs, 256 MiB, 1 hart, "
          f"popek firmware: {args.bios}); the stencil library, built once per popek "
          f"version, took {built:.2f} s")
    print(f"  {'emulator':<30}{'to userspace':>13}{'CPU (all)':>11}{'M insns':>9}"
          f"{'MIPS':>8}{'vs qemu':>9}{NATIVE_HEADER}")
    for tier, p, p_cpu, insns, native in rows:
        print(f"  {'popek ' + tier:<30}{p:12.2f}s{p_cpu:10.2f}s{insns / 1e6:9.1f}"
              f"{insns / p / 1e6:8.2f}{p / q:8.1f}x{native}")
    print(f"  {'qemu-system-riscv64 TCG':<30}{q:12.2f}s{q_cpu:10.2f}s{'':>9}{'':>8}{1:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
