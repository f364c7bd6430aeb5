"""xv6-riscv benchmark: a command at xv6's shell, popek beside qemu-system-riscv64.

Both boot the same xv6 build (github.com/mit-pdos/xv6-riscv, built by hand with
``make TOOLPREFIX=riscv64-linux-gnu-``: it is in no package registry, so CI has none)
as its Makefile boots it on QEMU: ``--bios none``, 3 harts, 128 MiB, ``fs.img`` on
virtio-mmio slot 0 (each on a fresh copy of it). The command is typed once the shell
prompts, and the clock stops when its output matches ``--until``.

    python bench/xv6.py XV6_DIR [--command "usertests -q"] [--until "ALL TESTS PASSED"]
                        [--engine jit|translate|interp] [--timeout SECONDS]

Each line gives wall time and the CPU time the emulator process used, which a busy
host does not inflate the way it inflates wall time (QEMU runs each hart on a thread
of its own, so its CPU time can exceed its wall time).
"""

from __future__ import annotations

import argparse
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

PROMPT = re.compile(rb"init: starting sh\n\$ ")
FAILED = re.compile(rb"panic|SOME TESTS FAILED|FAILED --")


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str], command: str, until: re.Pattern, timeout: float,
        log: Path) -> tuple[float, float, bytes]:
    """Boot with ``argv``, type ``command`` at the prompt, wait for ``until``; returns
    wall seconds, CPU seconds and the console output."""
    cpu0, start = child_cpu(), time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = bytearray()
    typed = False
    with selectors.DefaultSelector() as sel, log.open("wb") as log_file:
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while not (typed and (until.search(out) or FAILED.search(out))):
                left = start + timeout - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"{argv[0]}: no {until.pattern!r} after {timeout:g} s")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{argv[0]} ended: {bytes(out[-300:])!r}")
                out += chunk
                log_file.write(chunk)
                if not typed and PROMPT.search(out):
                    proc.stdin.write(command.encode() + b"\n")
                    proc.stdin.flush()
                    typed = True
        finally:
            wall = time.monotonic() - start
            proc.kill()
            proc.wait()
    return wall, child_cpu() - cpu0, bytes(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("xv6", type=Path, help="an xv6-riscv tree, built (kernel/kernel, fs.img)")
    parser.add_argument("--command", default="usertests -q")
    parser.add_argument("--until", default="ALL TESTS PASSED",
                        help="regex of the output that ends the run")
    parser.add_argument("--engine", default=None, help="popek's tier (default: its fastest)")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    args = parser.parse_args()
    kernel, image = args.xv6 / "kernel" / "kernel", args.xv6 / "fs.img"
    for path in (kernel, image):
        if not path.exists():
            sys.exit(f"{path} is missing: build xv6 with make TOOLPREFIX=riscv64-linux-gnu-")
    if shutil.which("qemu-system-riscv64") is None:
        sys.exit("qemu-system-riscv64 is missing: apt-get install qemu-system-misc")
    until = re.compile(args.until.encode())
    results = {}
    with tempfile.TemporaryDirectory(prefix="popek-xv6-") as tmp:
        for name in ("qemu", "popek"):
            disk = Path(tmp) / f"fs-{name}.img"
            shutil.copy(image, disk)
            if name == "qemu":
                argv = ["qemu-system-riscv64", "-machine", "virt", "-bios", "none",
                        "-kernel", str(kernel), "-m", "128M", "-smp", "3", "-nographic",
                        "-global", "virtio-mmio.force-legacy=false",
                        "-drive", f"file={disk},if=none,format=raw,id=x0",
                        "-device", "virtio-blk-device,drive=x0,bus=virtio-mmio-bus.0"]
            else:
                argv = [sys.executable, "-m", "popek", "run", "--bios", "none",
                        "--kernel", str(kernel), "--cpus", "3", "--mem", "128M",
                        "--disk", str(disk), *(["--engine", args.engine] if args.engine else [])]
            wall, cpu, out = run(argv, args.command, until, args.timeout,
                                 Path(tmp) / f"{name}.log")
            failed = FAILED.search(out)
            verdict = f"FAILED: {failed.group(0).decode()}" if failed else \
                until.search(out).group(0).decode()
            results[name] = (wall, cpu)
            print(f"{name:5}  {wall:8.1f} s wall  {cpu:8.1f} CPU s  {verdict}", flush=True)
    (pw, pc), (qw, qc) = results["popek"], results["qemu"]
    print(f"popek/qemu: {pw / qw:.1f}x wall, {pc / qc:.1f}x CPU  ({args.command!r})")


if __name__ == "__main__":
    main()
