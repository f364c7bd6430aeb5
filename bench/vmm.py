"""VMM benchmark: guest starts, memory per idle guest, snapshot, restore and clones.

Runs ``popek serve`` and drives it through the API (the SDK), with tiny bare-metal
guests (tests/vmm_guests.py: an idle one that waits in WFI, a counter that fills 1 MiB
of RAM). Prints each figure beside Firecracker's published ones (125 ms to guest init,
< 5 MiB overhead per microVM, 150 microVMs/s per host) and beside QEMU's from this run,
where qemu-system-riscv64 runs the same guest ELF (OpenSBI enters it in S-mode, as
popek's SBI does) and saves/restores it by migration to a file.

    python bench/vmm.py [--guests N] [--mem SIZE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from popek.api.client import Client  # noqa: E402
from popek.vmm import procstat  # noqa: E402
from tests.vmm_guests import guest  # noqa: E402

FIRECRACKER = {"start_ms": 125.0, "overhead_mib": 5.0, "starts_per_s": 150.0}


async def _until_output(client: Client, vm_id: str, pattern: bytes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, await client.console_log(vm_id)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"VM {vm_id} never printed {pattern!r}")
        await asyncio.sleep(0.002)


async def _timed(step: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await step()
    return time.perf_counter() - start


async def measure_popek(sock: Path, serve_pid: int, n: int, mem: int,
                        tmp: Path) -> dict[str, float]:
    idle, counter = str(guest("idle")), str(guest("counter"))
    results: dict[str, float] = {}
    async with Client(sock) as client:
        await client.delete((await client.create(kernel=idle, mem=mem))["id"])  # warm up
        starts = []
        begin = time.perf_counter()
        for _ in range(n):
            async def start() -> None:
                vm = await client.create(kernel=idle, mem=mem)
                await _until_output(client, vm["id"], b"idle ready")
            starts.append(await _timed(start))
        results["starts_per_s"] = n / (time.perf_counter() - begin)
        results["start_ms"] = 1000 * statistics.median(starts)
        for vm in await client.list():
            await client.delete(vm["id"])

        async def start_one() -> None:
            vm = await client.create(kernel=idle, mem=mem)
            await _until_output(client, vm["id"], b"idle ready")
        begin = time.perf_counter()
        await asyncio.gather(*(start_one() for _ in range(n)))
        results["parallel_starts_per_s"] = n / (time.perf_counter() - begin)
        await asyncio.sleep(2)  # let the workers settle
        vms = await client.list()
        pss = [v["memory"]["pss_bytes"] for v in vms]
        rss = [v["memory"]["rss_bytes"] for v in vms]
        results["idle_pss_mib"] = statistics.mean(pss) / 2**20
        results["idle_rss_mib"] = statistics.mean(rss) / 2**20
        results["idle_cpu_percent"] = _cpu_percent([v["pid"] for v in vms], 3.0) / len(vms)
        results["vmm_rss_mib"] = procstat.memory(serve_pid)["rss"] / 2**20
        idle_snap = tmp / "idle.snap"
        await client.snapshot(vms[0]["id"], idle_snap)
        for vm in vms:
            await client.delete(vm["id"])

        vm = await client.create(kernel=counter, mem=mem)
        await _until_output(client, vm["id"], rb"tick 1\n")
        snap = tmp / "counter.snap"
        saves = [await _timed(lambda: client.snapshot(vm["id"], snap)) for _ in range(3)]
        results["snapshot_ms"] = 1000 * min(saves)
        results["snapshot_stored_mib"] = os.stat(snap).st_blocks * 512 / 2**20
        await client.delete(vm["id"])

        restores = []
        for _ in range(3):
            async def restore() -> None:
                clone = await client.restore(snap)
                await _until_output(client, clone["id"], rb"tick \d+\n")
                await client.delete(clone["id"])
            restores.append(await _timed(restore))
        results["restore_ms"] = 1000 * statistics.median(restores)

        begin = time.perf_counter()
        for _ in range(n):
            await client.restore(idle_snap)
        results["clones_per_s"] = n / (time.perf_counter() - begin)
        await asyncio.sleep(1)
        clones = await client.list()
        results["clone_pss_mib"] = statistics.mean(
            v["memory"]["pss_bytes"] for v in clones) / 2**20
        for clone in clones:
            await client.delete(clone["id"])
    return results


def _cpu_percent(pids: list[int], seconds: float) -> float:
    """Percent of one core the processes used together over the next ``seconds``."""
    before = sum(procstat.cpu_seconds(pid) or 0.0 for pid in pids)
    time.sleep(seconds)
    return 100 * (sum(procstat.cpu_seconds(pid) or 0.0 for pid in pids) - before) / seconds


class Qemu:
    """qemu-system-riscv64 running one guest ELF, with its HMP monitor on a Unix socket."""

    def __init__(self, qemu: str, elf: str, mem: int, tmp: Path, *extra: str) -> None:
        self.monitor_path = tmp / f"qemu-{time.monotonic_ns()}.mon"
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(
            [qemu, "-M", "virt", "-m", f"{mem >> 20}M", "-nographic", "-kernel", elf,
             "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
             "-serial", "stdio", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.output = b""
        self.monitor: socket.socket | None = None

    def wait_output(self, pattern: bytes, timeout: float = 60) -> float:
        """Seconds from launch until ``pattern`` appears on the serial console."""
        os.set_blocking(self.proc.stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu never printed {pattern!r}")
            with contextlib.suppress(BlockingIOError):
                self.output += os.read(self.proc.stdout.fileno(), 65536) or b""
            time.sleep(0.001)
        return time.perf_counter() - self.start

    def hmp(self, command: str) -> str:
        if self.monitor is None:
            while not self.monitor_path.exists():
                time.sleep(0.001)
            self.monitor = socket.socket(socket.AF_UNIX)
            self.monitor.connect(str(self.monitor_path))
            self._read_prompt()
        self.monitor.sendall(command.encode() + b"\n")
        return self._read_prompt()

    def _read_prompt(self) -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            data += self.monitor.recv(4096)
        return data.decode(errors="replace")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def measure_qemu(qemu: str, mem: int, tmp: Path) -> dict[str, float]:
    results: dict[str, float] = {}
    idle, counter = str(guest("idle")), str(guest("counter"))
    vm = Qemu(qemu, idle, mem, tmp)
    results["start_ms"] = 1000 * vm.wait_output(b"idle ready")
    time.sleep(1)
    mem_info = procstat.memory(vm.proc.pid)
    results["idle_rss_mib"] = mem_info["rss"] / 2**20
    results["idle_pss_mib"] = mem_info["pss"] / 2**20
    results["idle_cpu_percent"] = _cpu_percent([vm.proc.pid], 3.0)
    vm.close()

    vm = Qemu(qemu, counter, mem, tmp)
    vm.wait_output(rb"tick 1\n")
    state = tmp / "qemu.state"
    start = time.perf_counter()
    vm.hmp(f'migrate "exec:cat > {state}"')
    while "completed" not in vm.hmp("info migrate"):
        time.sleep(0.001)
    results["snapshot_ms"] = 1000 * (time.perf_counter() - start)
    results["snapshot_stored_mib"] = os.stat(state).st_blocks * 512 / 2**20
    vm.close()

    restores = []
    for _ in range(3):
        clone = Qemu(qemu, counter, mem, tmp, "-incoming", f"exec:cat {state}")
        clone.output = b""
        restores.append(clone.wait_output(rb"tick \d+\n"))
        clone.close()
    results["restore_ms"] = 1000 * statistics.median(restores)
    return results


def report(popek: dict[str, float], qemu: dict[str, float] | None) -> None:
    rows = [
        ("guest start, API call to first guest output (ms)", "start_ms", "start_ms"),
        ("guests started per second (sequential)", "starts_per_s", "starts_per_s"),
        ("guests started per second (all requests at once)", "parallel_starts_per_s",
         "starts_per_s"),
        ("host memory per idle guest, PSS (MiB)", "idle_pss_mib", "overhead_mib"),
        ("host memory per idle guest, RSS (MiB)", "idle_rss_mib", "overhead_mib"),
        ("host CPU per idle guest (% of a core)", "idle_cpu_percent", None),
        ("snapshot of a running guest (ms)", "snapshot_ms", None),
        ("snapshot file, blocks on disk (MiB)", "snapshot_stored_mib", None),
        ("restore, API call to first new guest output (ms)", "restore_ms", None),
        ("idle clones restored per second (sequential)", "clones_per_s", "starts_per_s"),
        ("host memory per idle clone, PSS (MiB)", "clone_pss_mib", "overhead_mib"),
    ]
    print(f"{'':52} {'popek':>9} {'FC':>7} {'ratio':>6} {'QEMU':>9} {'ratio':>6}")
    for label, key, fc_key in rows:
        ours = popek[key]
        fc = FIRECRACKER.get(fc_key) if fc_key else None
        theirs = qemu.get(key) if qemu else None
        print(f"{label:52} {ours:9.2f} "
              + (f"{fc:7.0f} {ours / fc:6.2f} " if fc else f"{'-':>7} {'-':>6} ")
              + (f"{theirs:9.2f} " if theirs is not None else f"{'-':>9} ")
              + (f"{ours / theirs:6.2f}" if theirs else f"{'-':>6}"))
    print(f"\nVMM service RSS: {popek['vmm_rss_mib']:.1f} MiB. Ratios are popek / other "
          "(for times, > 1 is slower; for rates, > 1 is faster). Firecracker figures are its "
          "published ones (x86 KVM microVMs booting Linux), not measured here. QEMU saves by "
          "migration to a file at its default migration bandwidth.")


@contextlib.contextmanager
def own_vmm(where: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A ``popek serve`` of the benchmark's own, on a socket and state directory in
    ``where``: (its socket, its process). Its guests end with it."""
    sock = where / "vmm.sock"
    serve = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                              "--state-dir", str(where / "state"), "--stop-guests",
                              "--stop-timeout", "0"], stderr=subprocess.DEVNULL)
    try:
        while not sock.exists():
            time.sleep(0.01)
        yield sock, serve
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=10, help="guests and clones to start")
    parser.add_argument("--mem", type=int, default=64, help="guest RAM in MiB (64)")
    args = parser.parse_args()
    mem = args.mem << 20
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with own_vmm(tmp) as (sock, serve):
            popek = asyncio.run(measure_popek(sock, serve.pid, args.guests, mem, tmp))
        qemu_bin = shutil.which("qemu-system-riscv64")
        qemu = measure_qemu(qemu_bin, mem, tmp) if qemu_bin else None
        if qemu_bin is None:
            print("(qemu-system-riscv64 not found: apt-get install qemu-system-misc)")
    report(popek, qemu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
