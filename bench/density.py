"""Density benchmark: many idle Linux guests on one host, popek beside qemu-system-riscv64.

Issue 19's consolidation figures. popek: one guest of the bundled Linux (kernel +
initramfs) boots under ``popek serve``, is snapshotted, and N clones are restored from
the snapshot (default 50); each must answer its console (an ``echo`` with its own
number). Then, once the host's KSM has scanned everything twice (steady state), while
they idle: total and per-guest PSS (``/proc/PID/smaps_rollup``), the CPU they use
together over 30 s (percent of one core), and the time from the restore requests (all
sent at once) to the last clone's answer. Separately, a smaller number of guests booted
one by one (no clone: nothing shared by a snapshot) with page sharing on and off. QEMU
has no clones, so the same count of ``qemu-system-riscv64`` guests boot the same kernel
and initramfs; their PSS and idle CPU are measured the same way, in the same run.

Then every guest of each popek run is swapped out (``popek vm swap-out``) and left idle a
few seconds: what each then holds (its worker's RSS and PSS, and of that the guest RAM
the host holds), what its swap file holds, and the time from typing on every console to
the last answer (the pages each shell touches come back from the files). A clone's RAM
is mostly its snapshot's pages, which are dropped, not written; a booted guest's is its
own. QEMU has no swap-out: beside these figures stand its idle guests' RSS and PSS.

Totals count every process of the platform: popek's workers plus the VMM and its fork
server; QEMU's processes. Idle CPU includes the host's ``ksmd`` (page merging), which
both platforms use: QEMU advises its guest RAM mergeable by default. A PSS breakdown
of one idle clone shows where its memory goes (guest RAM touched, LLVM, Python and
other libraries, the heap it shares with the fork server or through KSM, and its private
heap: decoded and translated code, LLVM's heap and native code, the machine's objects).

    python bench/density.py [--guests 50] [--booted 4] [--mem 128] [--idle 30] [--no-qemu]
"""

from __future__ import annotations

import argparse
import asyncio
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from popek import images  # noqa: E402
from popek.api.client import Client  # noqa: E402
from popek.vmm import pagesharing, procstat  # noqa: E402

MIB = 1 << 20
PROMPT = rb"popek guest: Linux"  # the bundled init's banner, just before its shell
BOOT_PATIENCE = 900.0


# -- measuring processes ---------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def total_pss(pids: Iterable[int]) -> int:
    return sum(procstat.memory(pid).get("pss", 0) for pid in pids)


def cpu_percent(pids: list[int], seconds: float) -> float:
    """Percent of one core the processes used together over the next ``seconds``."""
    before = sum(procstat.cpu_seconds(pid) or 0.0 for pid in pids)
    time.sleep(seconds)
    return 100 * (sum(procstat.cpu_seconds(pid) or 0.0 for pid in pids) - before) / seconds


def mappings(pid: int) -> list[tuple[int, str, str, dict[str, int]]]:
    """Each mapping of ``pid`` from ``/proc/PID/smaps``: size, permissions, path and its
    counters in bytes."""
    found: list[tuple[int, str, str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((end - start, fields[1], fields[5] if len(fields) > 5 else "", {}))
            elif line.split()[-1:] == ["kB"]:
                name, value = line.split()[:2]
                found[-1][3][name.rstrip(":")] = int(value) * 1024
    return found


SHARED_HEAP = "heap shared (with the fork server, or merged by KSM)"
PRIVATE_HEAP = "private heap (code cache, LLVM heap, machine)"


def pss_breakdown(pid: int, guest_mem: int) -> dict[str, int]:
    """PSS of one worker by kind of mapping (see the module docstring)."""
    parts = dict.fromkeys(("guest RAM touched", "LLVM library (libllvmlite)",
                           "Python and other libraries", SHARED_HEAP,
                           "native code (JIT, anonymous r-x)", PRIVATE_HEAP), 0)
    for size, perms, path, counts in mappings(pid):
        pss = counts.get("Pss", 0)
        if size == guest_mem:
            parts["guest RAM touched"] += pss
        elif "llvmlite" in path:
            parts["LLVM library (libllvmlite)"] += pss
        elif path.startswith("/"):
            parts["Python and other libraries"] += pss
        elif "x" in perms:
            parts["native code (JIT, anonymous r-x)"] += pss
        else:
            # A shared anonymous page came from the fork server: split the mapping's PSS
            # by its shared fraction (exact for mappings wholly shared or wholly private).
            shared = counts.get("Shared_Clean", 0) + counts.get("Shared_Dirty", 0)
            share = pss * shared // counts["Rss"] if counts.get("Rss") else 0
            parts[SHARED_HEAP] += share
            parts[PRIVATE_HEAP] += pss - share
    return parts


# -- popek -----------------------------------------------------------------------------
class Serve:
    """One ``popek serve`` in a directory of its own."""

    def __init__(self, tmp: Path, name: str, *extra: str) -> None:
        self.sock = tmp / f"{name}.sock"
        self.log = tmp / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "popek", "serve", "--socket", str(self.sock),
                 "--state-dir", str(tmp / f"{name}-state"), "--stop-guests",
                 "--stop-timeout", "0", *extra], stderr=log)
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"popek serve {' '.join(extra)} exited")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def close(self, failed: bool = False) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        if failed:
            print(f"popek serve's log:\n{self.log.read_text()[-3000:]}", file=sys.stderr)


async def wait_console(client: Client, vm: str, pattern: bytes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, await client.console_log(vm)):
        if time.monotonic() > deadline:
            log = await client.console_log(vm)
            raise RuntimeError(f"{vm} never printed {pattern!r}; it ends {log[-300:]!r}")
        await asyncio.sleep(0.25)


async def answer(client: Client, vms: list[str], timeout: float = 300,
                 first: int = 1000) -> None:
    """Each VM's shell echoes a line of its own (so all of them really run), numbered from
    ``first`` (a number no earlier answer printed)."""
    for i, vm in enumerate(vms, first):
        async with client.console(vm, replay=False) as ws:
            await ws.send_bytes(f"echo answer-$((0+{i}))\n".encode())
    await asyncio.gather(*(wait_console(client, vm, f"answer-{i}".encode(), timeout)
                           for i, vm in enumerate(vms, first)))


def ksmd() -> list[int]:
    """The host's KSM thread: its merging work is the guests' cost (QEMU advises its guest
    RAM mergeable by default too, so it counts for both)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/comm").read_text().strip() == "ksmd":
                    return [int(name)]
            except OSError:
                continue
    return []


def settle(timeout: float = 180.0) -> float:
    """Wait until the host's KSM has scanned everything twice (it merges a page on the
    second scan that finds it unchanged), so PSS is the steady state of idle guests, not
    a moment of it; seconds waited (0 without a running KSM)."""
    ksm = pagesharing.host_counters()
    if not ksm.get("running"):
        return 0.0
    start, target = time.monotonic(), ksm["full_scans"] + 2
    while pagesharing.host_counters()["full_scans"] < target and \
            time.monotonic() - start < timeout:
        time.sleep(1)
    return time.monotonic() - start


def mean_mib(values: list[int]) -> float:
    return sum(values) / len(values) / MIB


def idle_figures(pids: list[int], worker_pids: list[int], seconds: float) -> dict[str, float]:
    settled = settle()
    cpu = cpu_percent(pids + ksmd(), seconds)
    workers = [procstat.memory(pid) for pid in worker_pids]
    return {"total_pss": total_pss(pids) / MIB,
            "per_guest_pss": mean_mib([w.get("pss", 0) for w in workers]),
            "per_guest_rss": mean_mib([w.get("rss", 0) for w in workers]),
            "cpu": cpu, "settle_s": settled}


async def swapped_figures(client: Client, vms: list[str]) -> dict[str, float]:
    """Swap every guest out, let them idle, then what each holds and how soon all answer."""
    held = [(await client.info(vm))["memory"]["guest_touched_bytes"] for vm in vms]
    for vm in vms:
        await client.swap_out(vm)
    await asyncio.sleep(5)  # idle: each fetches back what its timer ticks touch
    memory = [(await client.info(vm))["memory"] for vm in vms]
    begin = time.perf_counter()
    await answer(client, vms, first=2000)
    return {"resident_guest_ram": mean_mib(held),
            "swapped_rss": mean_mib([m["rss_bytes"] for m in memory]),
            "swapped_pss": mean_mib([m["pss_bytes"] for m in memory]),
            "swapped_guest_ram": mean_mib([m["guest_touched_bytes"] for m in memory]),
            "swapped_file": mean_mib([m["swapped_bytes"] for m in memory]),
            "swapped_answer_s": time.perf_counter() - begin}


async def popek_clones(serve: Serve, n: int, mem: int, idle: float, tmp: Path,
                       breakdown: dict[str, int]) -> dict[str, float]:
    async with Client(serve.sock) as client:
        vm = await client.create(kernel=str(images.KERNEL), initrd=str(images.INITRD), mem=mem)
        await wait_console(client, vm["id"], PROMPT, BOOT_PATIENCE)
        await answer(client, [vm["id"]])
        await asyncio.sleep(2)  # its shell is back in its read
        snap = tmp / "idle.snap"
        await client.action(vm["id"], "pause")
        await client.snapshot(vm["id"], snap)
        await client.delete(vm["id"])
        begin = time.perf_counter()
        clones = [vm["id"] for vm in await asyncio.gather(
            *(client.restore(snap) for _ in range(n)))]  # all requests at once
        await answer(client, clones)
        restore_seconds = time.perf_counter() - begin
        await asyncio.sleep(5)  # settle: output flushed, first merges
        workers = [v["pid"] for v in await client.list()]
        figures = idle_figures(serve.pids(), workers, idle)
        figures["restore_s"] = restore_seconds
        breakdown.update(pss_breakdown(workers[0], mem))
        figures.update(await swapped_figures(client, clones))
        for clone in clones:
            await client.delete(clone)
    return figures


async def popek_booted(serve: Serve, n: int, mem: int, idle: float) -> dict[str, float]:
    async with Client(serve.sock) as client:
        vms = []
        for _ in range(n):  # one at a time: boots are CPU-bound
            vm = await client.create(kernel=str(images.KERNEL), initrd=str(images.INITRD),
                                     mem=mem)
            await wait_console(client, vm["id"], PROMPT, BOOT_PATIENCE)
            vms.append(vm["id"])
        await answer(client, vms)
        await asyncio.sleep(5)
        figures = idle_figures(serve.pids(), [v["pid"] for v in await client.list()], idle)
        figures.update(await swapped_figures(client, vms))
        for vm in vms:
            await client.delete(vm)
    return figures


# -- QEMU ------------------------------------------------------------------------------
def qemu_guests(qemu: str, kernel: Path, n: int, mem: int, idle: float) -> dict[str, float]:
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(
                [qemu, "-M", "virt", "-m", f"{mem >> 20}M", "-nographic", "-kernel", str(kernel),
                 "-initrd", str(images.INITRD), "-append", "console=ttyS0"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        for i, proc in enumerate(procs):
            _qemu_expect(proc, PROMPT)
            proc.stdin.write(f"echo answer-$((1000+{i}))\n".encode())
            proc.stdin.flush()
            _qemu_expect(proc, f"answer-{1000 + i}".encode())
        time.sleep(5)
        pids = [p.pid for p in procs]
        return idle_figures(pids, pids, idle)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _qemu_expect(proc: subprocess.Popen, pattern: bytes, timeout: float = 300) -> None:
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    seen = getattr(proc, "seen", b"")
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        if time.monotonic() > deadline:
            raise RuntimeError(f"qemu never printed {pattern!r}")
        try:
            seen += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    proc.seen = seen[-4096:]


# -- report ----------------------------------------------------------------------------
def report(args: argparse.Namespace, rows: list[tuple[str, dict[str, float]]],
           qemu_n: dict[str, float] | None, breakdown: dict[str, int],
           ksm: dict[str, object]) -> None:
    print(f"Idle Linux 6.1 guests (bundled kernel + initramfs, {args.mem} MiB, 1 hart); "
          f"idle CPU over {args.idle:.0f} s; PSS totals include the VMM and fork server")
    print(f"{'':44}{'guests':>7}{'total PSS':>11}{'PSS/guest':>11}{'idle CPU':>10}"
          f"{'restore':>9}")
    for label, r in rows:
        print(f"{label:44}{int(r['n']):7d}{r['total_pss']:9.0f} M{r['per_guest_pss']:9.1f} M"
              f"{r['cpu']:9.1f}%" + (f"{r['restore_s']:8.1f}s" if "restore_s" in r else ""))
    if qemu_n:
        clones = rows[0][1]
        print(f"popek clones / QEMU: total PSS {clones['total_pss'] / qemu_n['total_pss']:.2f}x, "
              f"per guest {clones['per_guest_pss'] / qemu_n['per_guest_pss']:.2f}x, "
              f"idle CPU {clones['cpu'] / max(qemu_n['cpu'], 0.01):.2f}x")
    print("\nSwapped out (popek vm swap-out, then idle 5 s), per guest: its worker's RSS and "
          "PSS, the guest RAM the host holds, its swap file, and the time until every "
          "guest answered an echo")
    for label, r in rows:
        if "swapped_rss" in r:
            print(f"{label:44}RSS {r['swapped_rss']:5.1f} M  PSS {r['swapped_pss']:5.1f} M  "
                  f"guest RAM {r['swapped_guest_ram']:5.1f} M (was "
                  f"{r['resident_guest_ram']:5.1f} M)  swap file "
                  f"{r['swapped_file']:5.1f} M  answered in {r['swapped_answer_s']:.2f} s")
    if qemu_n:
        clones = rows[0][1]
        print(f"QEMU has no swap-out; its idle guests: RSS {qemu_n['per_guest_rss']:.1f} M, "
              f"PSS {qemu_n['per_guest_pss']:.1f} M each; popek clones swapped out / QEMU "
              f"idle: RSS {clones['swapped_rss'] / qemu_n['per_guest_rss']:.2f}x, "
              f"PSS {clones['swapped_pss'] / qemu_n['per_guest_pss']:.2f}x")
    print("\nPSS of one idle clone:")
    for part, size in breakdown.items():
        print(f"  {part:52}{size / MIB:8.1f} MiB")
    print(f"  {'total':52}{sum(breakdown.values()) / MIB:8.1f} MiB")
    print(f"\nhost KSM at the end: {ksm}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=50, help="clones (and QEMU guests)")
    parser.add_argument("--booted", type=int, default=4,
                        help="guests booted one by one, with and without page sharing (4; "
                             "0 skips); each boot costs 15-40 s of CPU")
    parser.add_argument("--mem", type=int, default=128, help="guest RAM in MiB (128)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU to count")
    parser.add_argument("--no-qemu", action="store_true")
    args = parser.parse_args()
    mem = args.mem * MIB
    qemu = None if args.no_qemu else shutil.which("qemu-system-riscv64")
    if not args.no_qemu and qemu is None:
        sys.exit("bench/density.py needs qemu-system-riscv64: apt-get install qemu-system-misc")
    rows: list[tuple[str, dict[str, float]]] = []
    breakdown: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runs = [("popek, clones of one snapshot", (), args.guests, "clones")]
        if args.booted:
            runs += [("popek, booted one by one", (), args.booted, "booted"),
                     ("popek, booted, --page-sharing off", ("--page-sharing", "off"),
                      args.booted, "booted")]
        for i, (label, extra, n, how) in enumerate(runs):
            serve = Serve(tmp, f"vmm{i}", *extra)
            try:
                if how == "clones":
                    figures = asyncio.run(popek_clones(serve, n, mem, args.idle, tmp, breakdown))
                else:
                    figures = asyncio.run(popek_booted(serve, n, mem, args.idle))
            except BaseException:
                serve.close(failed=True)
                raise
            serve.close()
            rows.append((label, {**figures, "n": n}))
            print(f"{label}: {figures}", file=sys.stderr)
        ksm = pagesharing.host_counters()
        qemu_n = None
        if qemu:
            kernel = tmp / "Image"
            kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
            for n in sorted({args.guests, args.booted} - {0}):
                figures = qemu_guests(qemu, kernel, n, mem, args.idle)
                rows.append(("qemu-system-riscv64 7.2 (TCG), booted", {**figures, "n": n}))
                if n == args.guests:
                    qemu_n = figures
    report(args, rows, qemu_n, breakdown, ksm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
