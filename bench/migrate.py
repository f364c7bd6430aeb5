"""Live migration benchmark: popek beside QEMU, the same Linux guest, in one run.

The bundled Linux (kernel and initramfs, 256 MiB of RAM) boots once under two
``popek serve`` instances' care and once under qemu-system-riscv64; each then migrates
four times on this host, back and forth: idle; while a shell loop keeps rewriting a
4 MiB file (a guest dirtying memory at a steady rate); the same over a link capped at
2 MiB/s, slower than the guest dirties (popek's exact auto-converge, QEMU's
``auto-converge`` capability and ``max-bandwidth``); and the same by post-copy (popek's
``--postcopy``; QEMU's ``postcopy-ram``, with ``migrate-start-postcopy`` right after
``migrate``). popek's figures come from ``GET /v1/vms/{vm}`` (``migration``), QEMU's from
QMP's ``query-migrate`` (``downtime``, ``total-time``, ``ram.transferred``,
``cpu-throttle-percentage``; its ``downtime`` means nothing after a post-copy, so none
is shown). Both get a 50 ms downtime budget.

Two downtimes are shown. Each VMM's own count: popek's from the pause to the GO that
commits the handover (the destination has loaded the state by then), QEMU's from the
pause to the last byte sent (its destination has not loaded anything yet). And the one
that matters to the guest, the same for both: from the pause on the source to the first
instruction on the destination, from the destination's word (popek's ``resumed_at``
beside the source's ``paused_at``; QEMU's QMP ``STOP`` and ``RESUME`` event times).

    python bench/migrate.py
"""

from __future__ import annotations

import asyncio
import json
import lzma
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from popek import images  # noqa: E402
from popek.api.client import Client  # noqa: E402

MEM = 256 << 20
BOOTED = rb"popek guest: Linux"
DIRTIER = (b"dd if=/dev/urandom of=/tmp/src bs=1M count=4 2>/dev/null; (while true; do "
           b"dd if=/tmp/src of=/tmp/d bs=1M conv=notrunc 2>/dev/null; sleep 0.1; done) & "
           b"echo dirtier-$((6*7))\n")
DIRTYING = rb"dirtier-42"
PATIENCE = 600.0
SLOW_LINK = 2 << 20  # bytes a second, for the throttled migration
# name: (popek's migrate options, QEMU's capabilities, QEMU's parameters)
KINDS: dict[str, tuple[dict[str, Any], dict[str, bool], dict[str, int]]] = {
    "idle": ({}, {}, {}),
    "dirtying": ({}, {}, {}),
    "throttled": ({"max_bandwidth": SLOW_LINK}, {"auto-converge": True},
                  {"max-bandwidth": SLOW_LINK}),
    "postcopy": ({"postcopy": True}, {"postcopy-ram": True}, {}),
}


# -- popek -----------------------------------------------------------------------------------------
async def _until(client: Client, vm: str, pattern: bytes) -> None:
    deadline = time.monotonic() + PATIENCE
    while not re.search(pattern, await client.console_log(vm)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest never printed {pattern!r}")
        await asyncio.sleep(0.2)


async def _migrate(client: Client, vm: str, to: Path, dest: Client,
                   **options: Any) -> dict[str, Any]:
    """The source's figures, and the time from the guest's pause on the source to its
    first run on the destination, as the destination saw it."""
    await client.migrate(vm, str(to), max_downtime=0.05, **options)
    while (info := await client.info(vm))["migration"]["state"] == "migrating":
        await asyncio.sleep(0.05)
    if info["migration"]["state"] != "done":
        raise RuntimeError(f"popek's migration failed: {info['migration']['error']}")
    while (arrived := (await dest.info(vm)).get("migration") or {}).get("state") != "arrived":
        await asyncio.sleep(0.05)
    stop_to_run = 1000 * (arrived["resumed_at"] - info["migration"]["paused_at"])
    return {**info["migration"], "stop_to_run_ms": stop_to_run}


async def measure_popek(tmp: Path) -> dict[str, dict[str, float]]:
    socks, procs = [], []
    for name in ("a", "b"):
        sock = tmp / f"{name}.sock"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "popek", "serve", "--socket", str(sock), "--state-dir",
             str(tmp / f"state-{name}"), "--stop-guests", "--stop-timeout", "0"],
            stderr=subprocess.DEVNULL))
        socks.append(sock)
    try:
        while not all(sock.exists() for sock in socks):
            await asyncio.sleep(0.1)
        async with Client(socks[0]) as a, Client(socks[1]) as b:
            vm = (await a.create(kernel=str(images.KERNEL), initrd=str(images.INITRD),
                                 mem=MEM))["id"]
            await _until(a, vm, BOOTED)
            await asyncio.sleep(2)
            clients, results = (a, b), {}
            for n, (kind, (options, _, _)) in enumerate(KINDS.items()):
                source, dest = clients[n % 2], clients[1 - n % 2]
                if kind == "dirtying":
                    async with source.console(vm, replay=False) as ws:
                        await ws.send_bytes(DIRTIER)
                    await _until(source, vm, DIRTYING)
                    await asyncio.sleep(3)
                results[kind] = await _migrate(source, vm, socks[1 - n % 2], dest, **options)
                await _until(dest, vm, BOOTED)  # (its history came along; it runs there now)
                await asyncio.sleep(1)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return {kind: {"downtime_ms": m["downtime_ms"], "stop_to_run_ms": m["stop_to_run_ms"],
                   "total_s": m["total_seconds"], "sent_mib": m["bytes_sent"] / 2**20,
                   "throttle_percent": m["throttle_percent"], "rounds": m["rounds"]}
            for kind, m in results.items()}


# -- QEMU ------------------------------------------------------------------------------------------
class Qemu:
    """qemu-system-riscv64 with QMP on a Unix socket and its serial console on pipes."""

    def __init__(self, tmp: Path, name: str, kernel: Path, *extra: str) -> None:
        self.qmp_path = tmp / f"{name}.qmp"
        self.proc = subprocess.Popen(
            ["qemu-system-riscv64", "-M", "virt", "-m", f"{MEM >> 20}M", "-display", "none",
             "-kernel", str(kernel), "-initrd", str(images.INITRD),
             "-append", "console=ttyS0", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
             "-serial", "stdio", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.output = b""
        self.events: dict[str, float] = {}  # QMP event name -> its latest time (host clock)
        threading.Thread(target=self._read, daemon=True).start()
        self.qmp = self._connect(self.qmp_path)
        self.qmp_file = self.qmp.makefile("rwb")
        self.qmp_file.readline()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self.output += chunk

    def type(self, line: bytes) -> None:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    @staticmethod
    def _connect(path: Path) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(path))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def command(self, name: str, **arguments: Any) -> Any:
        self.qmp_file.write(json.dumps({"execute": name, "arguments": arguments}).encode())
        self.qmp_file.flush()
        while True:
            reply = json.loads(self.qmp_file.readline())
            if "event" in reply:
                stamp = reply["timestamp"]
                self.events[reply["event"]] = stamp["seconds"] + stamp["microseconds"] / 1e6
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")

    def until(self, pattern: bytes) -> None:
        deadline = time.monotonic() + PATIENCE
        while not re.search(pattern, self.output):
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU's guest never printed {pattern!r}")
            time.sleep(0.1)

    def migrate_to(self, port: int, dest: Qemu, capabilities: dict[str, bool],
                   parameters: dict[str, int]) -> dict[str, float]:
        self.command("migrate-set-capabilities", capabilities=[
            {"capability": name, "state": capabilities.get(name, False)}
            for name in ("auto-converge", "postcopy-ram")])
        self.command("migrate-set-parameters", **{"downtime-limit": 50,
                                                  "max-bandwidth": 1 << 40, **parameters})
        self.command("migrate", uri=f"tcp:127.0.0.1:{port}")
        if capabilities.get("postcopy-ram"):
            self.command("migrate-start-postcopy")
        throttle = 0
        while (status := self.command("query-migrate"))["status"] not in ("completed",
                                                                         "failed"):
            throttle = status.get("cpu-throttle-percentage", throttle)
            time.sleep(0.05)
        if status["status"] != "completed":
            raise RuntimeError(f"QEMU's migration failed: {status}")
        while "RESUME" not in dest.events:
            dest.command("query-status")  # reads the events that came before its answer
            time.sleep(0.01)
        postcopy = capabilities.get("postcopy-ram", False)
        return {"downtime_ms": None if postcopy else float(status["downtime"]),
                "stop_to_run_ms": 1000 * (dest.events["RESUME"] - self.events["STOP"]),
                "total_s": status["total-time"] / 1000,
                "sent_mib": status["ram"]["transferred"] / 2**20,
                "throttle_percent": throttle}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_qemu(tmp: Path) -> dict[str, dict[str, float]]:
    kernel = tmp / "Image"
    kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
    source = Qemu(tmp, "q0", kernel)
    machines = [source]
    try:
        source.until(BOOTED)
        time.sleep(2)
        results = {}
        for index, (kind, (_, capabilities, parameters)) in enumerate(KINDS.items()):
            port = _free_port()
            dest = Qemu(tmp, f"q{index + 1}", kernel, "-incoming", "defer")
            machines.append(dest)
            dest.command("migrate-set-capabilities", capabilities=[
                {"capability": name, "state": state} for name, state in capabilities.items()
                if name == "postcopy-ram"])  # both ends must agree on post-copy
            dest.command("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            if kind == "dirtying":
                source.type(DIRTIER)
                source.until(DIRTYING)
                time.sleep(3)
            results[kind] = source.migrate_to(port, dest, capabilities, parameters)
            source = dest
            time.sleep(1)
        return results
    finally:
        for machine in machines:
            machine.close()


ROWS = (("downtime_ms", "downtime, the VMM's count (ms)"),
        ("stop_to_run_ms", "stop -> running there (ms)"),
        ("total_s", "total time (s)"), ("sent_mib", "sent (MiB)"),
        ("throttle_percent", "guest throttled at the end (%)"))


def report(popek: dict[str, dict[str, float]], qemu: dict[str, dict[str, float]] | None) -> None:
    print(f"{'live migration, 256 MiB Linux':40} {'popek':>10} {'QEMU':>10} {'ratio':>7}")
    for kind in popek:
        for key, label in ROWS:
            ours = popek[kind][key]
            theirs = qemu[kind][key] if qemu else None  # None: QEMU gives no such figure
            ratio = f"{ours / theirs:6.2f}x" if theirs else "     -"
            shown = f"{theirs:10.1f}" if theirs is not None else f"{'-':>10}"
            print(f"{kind + ': ' + label:40} {ours:10.1f} {shown} {ratio}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="popek-migrate-") as tmp:
        popek = asyncio.run(measure_popek(Path(tmp)))
        print(f"popek: {popek}", flush=True)
        qemu = measure_qemu(Path(tmp)) if shutil.which("qemu-system-riscv64") else None
        if qemu is None:
            print("(qemu-system-riscv64 not found: apt-get install qemu-system-misc)")
    report(popek, qemu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
