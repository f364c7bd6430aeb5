"""Guest-to-guest throughput on a virtual switch: popek beside QEMU, in one run.

Two guests (the bundled SMP kernel and initramfs, 1 hart, static addresses and the
64 KiB MTU a switch's DHCP offers, on every row alike) pass ``--mib`` MiB of zeros with
busybox ``nc``: the sender pipes ``dd`` into ``nc``, the receiver counts what arrives
with ``wc -c``. Each guest runs its part as the initramfs'
``popek.cmd`` and prints markers; the host times the transfer from the sender's
``TX-START`` to the receiver's ``RX-DONE`` as they appear on the consoles, so the figure
is wall time of the whole path (both guests' network stacks, their NICs, the link).

Rows:

- popek: two guests under ``popek serve`` on a popek switch (plain segment);
- QEMU, direct: two ``qemu-system-riscv64`` guests joined by ``-netdev stream`` (one
  listens, the other connects): QEMU's own guest-to-guest link;
- QEMU via popek's switch: the same two QEMU guests, each connected to a port of a popek
  switch instead, which shows what the switch itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import lzma
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from popek import images
from popek.api.client import Client
from popek.net.dhcp import MTU
from popek.vmm.networks import Networks

RECEIVER_IP, SENDER_IP = "10.9.0.1", "10.9.0.2"
PORT = 5000
BOOT_TIMEOUT = 600.0  # seconds for both guests to boot (popek's, on a busy host)
TRANSFER_SECONDS_PER_MIB = 120.0  # patience per MiB (popek's guests are slow at bulk TCP)


def commands(mib: int) -> tuple[str, str]:
    """(receiver, sender) shell commands."""
    up = f"mtu {MTU} up"
    receiver = (f"ifconfig eth0 {RECEIVER_IP} {up}; echo RX-READY; nc -l -p {PORT} | wc -c; "
                "echo RX-DONE")
    sender = (f"ifconfig eth0 {SENDER_IP} {up}; until ping -c 1 -W 1 {RECEIVER_IP} "
              f">/dev/null; do :; done; sleep 1; echo TX-START; dd if=/dev/zero bs=65536 "
              f"count={mib * 16} 2>/dev/null | nc {RECEIVER_IP} {PORT}; echo TX-DONE")
    return receiver, sender


def append(command: str) -> str:
    return "console=ttyS0 popek.cmd=" + base64.b64encode(command.encode()).decode()


class Markers:
    """When each marker first appeared on any console (host monotonic time)."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.text: dict[str, bytes] = {}

    def feed(self, who: str, data: bytes) -> None:
        self.text[who] = self.text.get(who, b"") + data
        for marker in re.findall(rb"\n(TX-START|RX-DONE|TX-DONE)", self.text[who]):
            self.seen.setdefault(marker.decode(), time.monotonic())

    def received(self, who: str) -> int:
        match = re.search(rb"\n(\d+)\r?\nRX-DONE", self.text.get(who, b""))
        return int(match.group(1)) if match else -1

    def seconds(self) -> float:
        return self.seen["RX-DONE"] - self.seen["TX-START"]


# -- QEMU ------------------------------------------------------------------------------------
def qemu_pair(qemu: str, kernel: Path, mib: int, nets: tuple[list[str], list[str]]) -> float:
    """Seconds to move ``mib`` MiB between two QEMU guests with the given -netdev args."""
    markers = Markers()
    procs = []
    for n, (who, command, netdev) in enumerate(zip(("rx", "tx"), commands(mib), nets,
                                                   strict=True)):
        procs.append((who, subprocess.Popen(
            [qemu, "-M", "virt", "-m", "128M", "-nographic", "-kernel", str(kernel),
             "-initrd", str(images.INITRD), "-append", append(command),
             "-device", f"virtio-net-device,netdev=n0,mac=52:54:00:00:00:{n + 1:02x}",
             *netdev],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        time.sleep(0.5)  # the listening side first
    for who, proc in procs:
        _pump(who, proc, markers)
    deadline = time.monotonic() + _patience(mib)
    for _, proc in procs:
        proc.wait(max(1.0, deadline - time.monotonic()))
    return _result(markers, mib)


def _patience(mib: int) -> float:
    return BOOT_TIMEOUT + mib * TRANSFER_SECONDS_PER_MIB


def _pump(who: str, proc: subprocess.Popen[bytes], markers: Markers) -> None:
    import threading

    def read() -> None:
        while chunk := proc.stdout.read1(65536):
            markers.feed(who, chunk)
    threading.Thread(target=read, daemon=True).start()


def _result(markers: Markers, mib: int) -> float:
    if markers.received("rx") != mib << 20:
        sys.exit("the transfer did not complete:\n" +
                 "\n".join(t[-800:].decode(errors="replace") for t in markers.text.values()))
    return markers.seconds()


def qemu_direct(qemu: str, kernel: Path, mib: int, where: Path) -> float:
    link = where / "link.sock"
    addr = f"addr.type=unix,addr.path={link}"
    return qemu_pair(qemu, kernel, mib, (["-netdev", f"stream,id=n0,server=on,{addr}"],
                                         ["-netdev", f"stream,id=n0,server=off,{addr}"]))


def qemu_via_switch(qemu: str, kernel: Path, mib: int, where: Path) -> float:
    """The QEMU guests on a popek switch, run in an event loop of this process."""
    import threading

    path = where / "switch.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        networks = Networks()
        switch = networks.create({"name": "bench", "subnet": None})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), lambda: switch.attach(listener.accept()[0]))
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait()
    netdev = ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={path}"]
    try:
        return qemu_pair(qemu, kernel, mib, (netdev, netdev))
    finally:
        loop.call_soon_threadsafe(loop.stop)


# -- popek ----------------------------------------------------------------------------------
async def popek_switch(sock: Path, kernel: Path, mib: int, engine: str | None) -> float:
    markers = Markers()
    async with Client(sock) as client:
        await client.create_network("bench", subnet=None)
        tasks = []
        for who, command in zip(("rx", "tx"), commands(mib), strict=True):
            vm = await client.create(name=who, kernel=str(kernel), initrd=str(images.INITRD),
                                     mem=128 << 20, append=append(command), engine=engine,
                                     nics=[{"type": "switch", "switch": "bench"}])
            tasks.append(asyncio.create_task(_follow(client, vm["id"], who, markers)))
        await asyncio.wait_for(asyncio.gather(*tasks), _patience(mib))
    return _result(markers, mib)


async def _follow(client: Client, vm: str, who: str, markers: Markers) -> None:
    async with client.console(vm) as ws:
        async for msg in ws:
            markers.feed(who, msg.data if isinstance(msg.data, bytes) else msg.data.encode())


def popek_run(kernel: Path, mib: int, engine: str | None, where: Path) -> float:
    sock = where / "vmm.sock"
    with open(where / "vmm.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                                  str(sock)], stderr=log)
    try:
        while not sock.exists():
            time.sleep(0.05)
        return asyncio.run(popek_switch(sock, kernel, mib, engine))
    finally:
        serve.terminate()
        serve.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=16, help="MiB to transfer (16)")
    parser.add_argument("--engine", default=None, help="popek's tier (default: its own)")
    parser.add_argument("--skip-popek", action="store_true", help="only the QEMU rows")
    args = parser.parse_args()
    qemu = shutil.which("qemu-system-riscv64")
    if qemu is None:
        sys.exit("bench/net_switch.py needs qemu-system-riscv64: apt-get install "
                 "qemu-system-misc")
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        kernel = where / "Image-smp"
        kernel.write_bytes(lzma.decompress(images.KERNEL_SMP.read_bytes()))
        runs: list[tuple[str, Callable[[], float | Awaitable[float]]]] = [
            ("QEMU, direct -netdev stream", lambda: qemu_direct(qemu, kernel, args.mib, where)),
            ("QEMU via a popek switch", lambda: qemu_via_switch(qemu, kernel, args.mib, where)),
        ]
        if not args.skip_popek:
            runs.insert(0, ("popek guests, popek switch",
                            lambda: popek_run(kernel, args.mib, args.engine, where)))
        for label, run in runs:
            rows.append((label, run()))
    qemu_seconds = dict(rows)["QEMU, direct -netdev stream"]
    print(f"Guest-to-guest throughput, {args.mib} MiB over busybox nc (Linux 6.1 SMP kernel, "
          "1 hart each, 128 MiB)")
    print(f"  {'':<30}{'wall':>10}{'MB/s':>10}{'vs QEMU':>10}")
    for label, seconds in rows:
        print(f"  {label:<30}{seconds:9.2f}s{args.mib * 1.048576 / seconds:10.2f}"
              f"{seconds / qemu_seconds:9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
