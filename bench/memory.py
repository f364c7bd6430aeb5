"""Memory benchmark: resident memory of a booted guest, popek beside qemu-system-riscv64.

Issue 5's target: a booted 256 MiB guest keeps popek's resident memory under the
guest RAM it touched + 100 MiB. Both emulators boot the same bundled kernel and
initramfs with 256 MiB; the guest's command prints a marker and sleeps, and while
the guest idles the host's ``/proc`` says how much each process holds: RSS and PSS
of the whole process, and the resident part of the guest RAM mapping (the one
anonymous mapping of exactly the guest's size, or QEMU's slightly larger one),
i.e. the guest RAM actually touched. What remains is the emulator's own overhead.

    python bench/memory.py [--tiers baseline,jit,translate,interp] [--bios popek|opensbi]

The native tiers (baseline, jit; the default) boot twice: with a code-cache directory
holding only the stencil library (cold: see bench/boot.py) and with the directory the
cold boot left (warm). Under baseline LLVM is never loaded; under jit, once tier 2 has
work. Each popek boot is a
column beside QEMU's, with issue 12's target for it: RSS under touched + 100 MiB.
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.boot import NATIVE_TIERS, cold_cache, stencil_library  # noqa: E402
from popek import images  # noqa: E402
from popek.engine.engine import TIERS  # noqa: E402
from popek.vmm.procstat import memory  # noqa: E402

MIB = 1 << 20
GUEST_MEM = 256 * MIB
OVERHEAD_TARGET = 100 * MIB
COLUMN = 21  # characters of each popek boot's column
READY = b"POPEK-MEM-READY"
COMMAND = "echo POPEK-MEM-READY; sleep 3600"  # then the guest idles until killed
APPEND = "console=ttyS0 popek.cmd=" + base64.b64encode(COMMAND.encode()).decode()
SETTLE = 2.0  # seconds after the marker, so the shell's last pages are in


@dataclass
class Footprint:
    """What the host kernel says one emulator process holds."""

    rss: int
    pss: int
    peak_rss: int
    guest_touched: int  # resident bytes of the guest RAM mapping

    @property
    def overhead(self) -> int:
        return self.rss - self.guest_touched


def guest_ram_resident(pid: int, size: int) -> int:
    """Resident bytes of the largest anonymous mapping of at least ``size`` bytes.

    popek maps guest RAM as exactly ``size`` bytes, advised so that the kernel never
    merges it with neighbouring anonymous memory; QEMU rounds its mapping up a little
    for alignment. Nothing else in either process maps that much anonymously.
    """
    best_size, best_rss = 0, 0
    current_size = current_anon = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split()
                current_anon = len(fields) < 6  # no path: anonymous
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current_size = end - start
            elif line.startswith("Rss:") and current_anon and current_size >= size:
                if best_size == 0 or current_size < best_size:
                    best_size, best_rss = current_size, int(line.split()[1]) * 1024
    if best_size == 0:
        raise RuntimeError(f"process {pid} has no anonymous mapping of {size >> 20} MiB")
    return best_rss


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def footprint_when_idle(cmd: list[str], timeout: float = 1800) -> tuple[Footprint, float]:
    """Boot with ``cmd``, wait for READY on the console, measure, then kill the process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        seen = b""
        while READY not in seen:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{cmd[0]}: no userspace after {timeout} s")
            if not sel.select(timeout=1):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"{cmd[0]} exited before userspace:\n{seen[-2000:].decode()}")
            seen += chunk
        booted = time.monotonic() - start
        time.sleep(SETTLE)
        whole = memory(proc.pid)
        result = Footprint(rss=whole["rss"], pss=whole["pss"], peak_rss=peak_rss(proc.pid),
                           guest_touched=guest_ram_resident(proc.pid, GUEST_MEM))
        return result, booted
    finally:
        proc.kill()
        proc.wait()


def mib(n: int) -> str:
    return f"{n / MIB:7.1f} MiB"


def row(label: str, cells: list[str], theirs: str = "") -> None:
    """One line of the table: a column per popek boot, then QEMU's."""
    print(f"{label:<26}" + "".join(f"{cell:>{COLUMN}}" for cell in cells) + f"{theirs:>12}")


def verdict(p: Footprint) -> str:
    """Whether ``p`` meets the target (RSS <= touched + 100 MiB), and by how much."""
    margin = (p.guest_touched + OVERHEAD_TARGET - p.rss) / MIB
    return f"met, +{margin:.1f}" if margin >= 0 else f"MISSED, {margin:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", default="baseline,jit",
                        help="popek execution tiers to boot, of " + ",".join(TIERS)
                        + " (default baseline,jit)")
    parser.add_argument("--bios", default="popek", choices=["popek", "opensbi"],
                        help="popek's firmware (QEMU always uses its default OpenSBI)")
    args = parser.parse_args()
    tiers = args.tiers.split(",")
    if unknown := set(tiers) - set(TIERS):
        parser.error(f"unknown tiers: {', '.join(sorted(unknown))}")
    qemu = shutil.which("qemu-system-riscv64")
    if qemu is None:
        sys.exit("bench/memory.py needs qemu-system-riscv64: apt-get install qemu-system-misc")
    runs: dict[str, tuple[Footprint, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Path(tmp) / "Image"
        kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
        qemu_cmd = [qemu, "-M", "virt", "-m", "256M", "-nographic", "-kernel", str(kernel),
                    "-initrd", str(images.INITRD), "-append", APPEND]
        q, _ = footprint_when_idle(qemu_cmd)
        seed, _ = stencil_library(Path(tmp))
        for tier in tiers:
            popek_cmd = [sys.executable, "-m", "popek", "run", "--mem", "256M",
                         "--engine", tier, "--bios", args.bios, "--kernel", str(kernel),
                         "--initrd", str(images.INITRD), "--append", APPEND]
            if tier not in NATIVE_TIERS:
                runs[tier] = footprint_when_idle([*popek_cmd, "--no-code-cache"])
                continue
            cache = ["--code-cache", str(cold_cache(seed, Path(tmp) / f"code-{tier}"))]
            runs[f"{tier} cold"] = footprint_when_idle([*popek_cmd, *cache])
            runs[f"{tier} warm"] = footprint_when_idle([*popek_cmd, *cache])
    booted = [p for p, _ in runs.values()]
    print("Idle Linux 6.1 guest after boot (bundled kernel + initramfs, 256 MiB, 1 hart; "
          "popek cold/warm: empty code cache / the one the cold boot left)")
    row("", [f"popek {label}" for label in runs], "qemu")
    row("booted in", [f"{seconds:.1f} s" for _, seconds in runs.values()])
    for label, field in [("RSS", "rss"), ("PSS", "pss"), ("peak RSS", "peak_rss"),
                         ("guest RAM touched", "guest_touched"),
                         ("RSS - touched (overhead)", "overhead")]:
        row(label, [mib(getattr(p, field)) for p in booted], mib(getattr(q, field)))
    row("RSS / qemu RSS", [f"{p.rss / q.rss:.1f}x" for p in booted])
    row("target: touched + 100 MiB", [mib(p.guest_touched + OVERHEAD_TARGET) for p in booted])
    row("RSS <= target (MiB spare)", [verdict(p) for p in booted])
    met = all(p.rss <= p.guest_touched + OVERHEAD_TARGET for p in booted)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
