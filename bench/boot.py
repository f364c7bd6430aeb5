"""Boot benchmark: launch to guest userspace, popek beside qemu-system-riscv64.

Both boot the same bundled kernel and initramfs with the same command line; the
clock stops when the guest's init prints its first line (the POPEK-CMD-BEGIN
marker), i.e. when userspace runs. popek's guest instruction count comes from
``popek run --stats`` (the whole run, including the short shutdown).

    python bench/boot.py [--runs N] [--bios popek|opensbi] [--tiers jit,translate,interp]

Each line also gives the CPU time the emulator process used (the whole run), which a
busy host does not inflate the way it inflates wall time. Tier 2 (jit) boots twice per
run: with an empty native code cache (cold, a fresh directory each time) and again with
the cache the cold boot left (warm: its hot blocks native from the first instruction).
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
    parser.add_argument("--tiers", default="jit,translate,interp",
                        help="popek engine tiers to boot (default jit,translate,interp)")
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
        for tier in args.tiers.split(","):
            popek_cmd = [sys.executable, "-m", "popek", "run", "--stats", "--bios", args.bios,
                         "--engine", tier, "--kernel", str(kernel), "--initrd",
                         str(images.INITRD), "--append", APPEND]
            if tier != "jit":  # the only tier with native code to cache
                runs = {tier: [time_to_marker([*popek_cmd, "--no-code-cache"])
                               for _ in range(args.runs)]}
            else:
                runs = {"jit, cold cache": [], "jit, warm cache": []}
                for n in range(args.runs):
                    cache = ["--code-cache", str(Path(tmp) / f"code{n}")]
                    runs["jit, cold cache"].append(time_to_marker([*popek_cmd, *cache]))
                    runs["jit, warm cache"].append(time_to_marker([*popek_cmd, *cache]))
            for label, results in runs.items():
                p, p_cpu, err = min(results)
                match = re.search(r"(\d+) guest instructions", err.decode())
                rows.append((label, p, p_cpu, int(match.group(1)) if match else 0))
    print("Linux 6.1 boot to userspace (bundled kernel + initramfs, 256 MiB, 1 hart, "
          f"popek firmware: {args.bios})")
    print(f"  {'emulator':<30}{'to userspace':>13}{'CPU (all)':>11}{'M insns':>9}"
          f"{'MIPS':>8}{'vs qemu':>9}")
    for tier, p, p_cpu, insns in rows:
        print(f"  {'popek ' + tier:<30}{p:12.2f}s{p_cpu:10.2f}s{insns / 1e6:9.1f}"
              f"{insns / p / 1e6:8.2f}{p / q:8.1f}x")
    print(f"  {'qemu-system-riscv64 TCG':<30}{q:12.2f}s{q_cpu:10.2f}s{'':>9}{'':>8}{1:8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
