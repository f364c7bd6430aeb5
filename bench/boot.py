"""Boot benchmark: launch to guest userspace, popek beside qemu-system-riscv64.

Both boot the same bundled kernel and initramfs with the same command line; the
clock stops when the guest's init prints its first line (the POPEK-CMD-BEGIN
marker), i.e. when userspace runs. popek's guest instruction count comes from
``popek run --stats`` (the whole run, including the short shutdown).

    python bench/boot.py [--runs N] [--bios none|opensbi]
"""

from __future__ import annotations

import argparse
import base64
import lzma
import os
import re
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


def time_to_marker(cmd: list[str], timeout: float = 900) -> tuple[float, bytes]:
    """Seconds from launch until MARKER appears on stdout; then wait for exit."""
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
    return elapsed, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="boots per emulator (best is kept)")
    parser.add_argument("--bios", default="none", choices=["none", "opensbi"],
                        help="popek's firmware (QEMU always uses its default OpenSBI)")
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-riscv64")
    if qemu is None:
        sys.exit("bench/boot.py needs qemu-system-riscv64: apt-get install qemu-system-misc")
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "Image"
        kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
        popek_cmd = [sys.executable, "-m", "popek", "run", "--stats", "--bios", args.bios,
                     "--kernel", str(kernel), "--initrd", str(images.INITRD),
                     "--append", APPEND]
        qemu_cmd = [qemu, "-M", "virt", "-m", "256M", "-nographic", "-kernel", str(kernel),
                    "-initrd", str(images.INITRD), "-append", APPEND]
        popek_times, qemu_times, stats = [], [], ""
        for _ in range(args.runs):
            seconds, err = time_to_marker(qemu_cmd)
            qemu_times.append(seconds)
            seconds, err = time_to_marker(popek_cmd)
            popek_times.append(seconds)
            stats = err.decode().strip().splitlines()[-1]
    p, q = min(popek_times), min(qemu_times)
    match = re.search(r"(\d+) guest instructions", stats)
    insns = int(match.group(1)) if match else 0
    print("Linux 6.1 boot to userspace (bundled kernel + initramfs, 256 MiB, 1 hart)")
    print(f"  popek ({args.bios:>7} bios): {p:8.2f} s   {insns / 1e6:7.1f} M guest instructions"
          f"   {insns / p / 1e6:6.2f} MIPS")
    print(f"  qemu-system-riscv64 TCG: {q:8.2f} s   {insns / q / 1e6:7.1f} MIPS (same workload)")
    print(f"  ratio popek/qemu: {p / q:.1f}x slower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
