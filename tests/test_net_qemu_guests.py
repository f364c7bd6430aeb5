"""popek's switches between real Linux guests emulated by QEMU, which no one here wrote.

QEMU's ``-netdev stream`` speaks the framing of a switch port, so each QEMU guest here
connects to a Unix socket whose connections the test turns into ports of a switch of
:class:`popek.vmm.networks.Networks`, the VMM's own. The guests are the bundled SMP
kernel and initramfs; busybox's udhcpc, ping, nc and wget do the talking. QEMU boots
them in seconds, so this checks DHCP, switching, isolation and NAT against a real
network stack cheaply; tests/test_vmm_net_linux.py does it again with popek's guests.
"""

from __future__ import annotations

import asyncio
import hashlib
import lzma
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from net_guests import Shell, check_switched_guests, http_server

from popek import images
from popek.vmm.networks import Networks

QEMU = shutil.which("qemu-system-riscv64")
BOOT_PATIENCE = 120.0


class SwitchHost:
    """The VMM's networks in an event loop of their own (a thread). Each switch listens on
    a Unix socket, and every connection to it becomes a port."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.networks: Networks = self.call(Networks)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def inside() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(inside(), self.loop).result(30)

    def add(self, name: str, **options: Any) -> Path:
        path = self.where / f"{name}.sock"

        def listen() -> None:
            switch = self.networks.create({"name": name, **options})
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen()
            listener.setblocking(False)

            def accept() -> None:
                conn, _ = listener.accept()
                switch.attach(conn, vm_name=f"qemu{len(switch.ports)}")
            self.loop.add_reader(listener.fileno(), accept)
        self.call(listen)
        return path

    def info(self, name: str) -> dict[str, Any]:
        return self.call(self.networks.info, name)

    def close(self) -> None:
        self.call(self.networks.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class QemuGuest(Shell):
    """A QEMU guest whose serial console is this process's pipe."""

    def __init__(self, name: str, kernel: Path, link: Path, mac: str) -> None:
        super().__init__()
        self.name = name
        self.mac = mac
        self.proc = subprocess.Popen(
            [QEMU, "-M", "virt", "-m", "128M", "-nographic", "-kernel", str(kernel),
             "-initrd", str(images.INITRD), "-append", "console=ttyS0",
             "-device", f"virtio-net-device,netdev=n0,mac={mac}",
             "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={link}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(65536):
            self._out += chunk

    def type(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def output(self) -> str:
        return self._out.decode(errors="replace")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Lab:
    """Two switches: ``lan`` (DHCP on 192.168.77.0/24, NAT) with guests ``a`` and ``b``,
    and ``other``, a plain segment, with ``outsider``."""

    host: SwitchHost
    a: QemuGuest
    b: QemuGuest
    outsider: QemuGuest
    a_ip: str
    b_ip: str
    lan: Path  # where stations join the lan switch


@pytest.fixture(scope="class")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if QEMU is None:
        pytest.fail("needs qemu-system-riscv64: apt-get install qemu-system-misc")
    where = tmp_path_factory.mktemp("qemu-net")
    kernel = where / "Image-smp"
    kernel.write_bytes(lzma.decompress(images.KERNEL_SMP.read_bytes()))
    lab = Lab()
    lab.host = SwitchHost(where)
    lan = lab.host.add("lan", subnet="192.168.77.0/24", nat=True)
    other = lab.host.add("other", subnet=None)
    guests = [QemuGuest("a", kernel, lan, "52:54:00:77:00:0a"),
              QemuGuest("b", kernel, lan, "52:54:00:77:00:0b"),
              QemuGuest("outsider", kernel, other, "52:54:00:77:00:0c")]
    lab.a, lab.b, lab.outsider = guests
    try:
        for guest in guests:
            guest.wait_for("popek guest: Linux", BOOT_PATIENCE)
            guest.ok("dmesg -n 1")
        lab.a_ip, lab.b_ip = lab.a.dhcp(), lab.b.dhcp()
        lab.outsider.ok("ifconfig eth0 192.168.77.50 netmask 255.255.255.0 up")
        lab.lan = lan
        yield lab
    finally:
        for guest in guests:
            guest.close()
        lab.host.close()


class TestQemuGuestsOnSwitches:
    def test_dhcp_leases_differ_and_stay(self, lab: Lab) -> None:
        assert lab.a_ip != lab.b_ip
        assert {lab.a_ip, lab.b_ip} <= {f"192.168.77.{n}" for n in range(3, 255)}
        assert lab.a.dhcp() == lab.a_ip  # asked again: the same address
        leases = {x["mac"]: x["address"] for x in lab.host.info("lan")["leases"]}
        assert leases == {lab.a.mac: lab.a_ip, lab.b.mac: lab.b_ip}

    def test_guests_on_one_switch_talk_and_the_outsider_reaches_neither(self, lab: Lab) -> None:
        check_switched_guests(lab.a, lab.b, lab.a_ip, lab.b_ip, outsider=lab.outsider)
        lan = lab.host.info("lan")
        learned = {mac for port in lan["ports"] for mac in port["learned"]}
        assert lab.outsider.mac not in learned and {lab.a.mac, lab.b.mac} <= learned
        moved = sum(port["counters"]["bytes_in"] for port in lan["ports"])
        assert moved > 3 << 20
        assert all(p["counters"]["dropped_in"] == 0 for p in lan["ports"])

    def test_nat_reaches_the_hosts_loopback_through_the_gateway(self, lab: Lab) -> None:
        with http_server() as (port, page):
            out = lab.b.ok(f"wget -q -O - http://192.168.77.1:{port}/page | sha256sum")
        assert out.split()[0] == hashlib.sha256(page).hexdigest()
        uplinks = lab.host.info("lan")["uplinks"]
        assert [(u["mac"], u["address"], u["state"]) for u in uplinks] == \
            [(lab.b.mac, lab.b_ip, "up")]
        status, _ = lab.outsider.sh(f"wget -q -T 3 -O - http://192.168.77.1:{port}/page")
        assert status != 0  # a plain segment has no gateway

    def test_a_flooding_port_leaves_the_guests_talking(self, lab: Lab) -> None:
        """A station floods broadcasts of junk, runts and frames from forged group
        addresses while the guests pass a file; then it sends a length no NIC would and
        is cut off. The guests never notice more than the junk itself."""
        flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flooder.connect(str(lab.lan))
        junk = [b"\xff" * 6 + bytes((2, 0, 0, 0, 0, 1)) + b"\x88\xb5" + bytes(1000),
                b"\x01\x02", b"\xff" * 6 + b"\x01" * 6 + b"\x88\xb5junk"]
        burst = b"".join(struct.pack(">I", len(f)) + f for f in junk) * 50
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                flooder.sendall(burst)
                time.sleep(0.005)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        try:
            lab.b.ok("dd if=/dev/urandom of=/tmp/f2 bs=1024 count=1024 2>/dev/null")
            lab.a.ok("nc -l -p 5001 > /tmp/g2 & sleep 1")
            lab.b.ok(f"nc {lab.a_ip} 5001 < /tmp/f2")
            lab.a.ok("wait")
            assert lab.a.sha256("/tmp/g2") == lab.b.sha256("/tmp/f2")
        finally:
            stop.set()
            thread.join()
        flooder.sendall(struct.pack(">I", 1 << 30))
        flooder.settimeout(10)
        while flooder.recv(1 << 20):  # what was queued for it, then the switch hangs up
            pass
        ports = lab.host.info("lan")["ports"]
        (hostile,) = [p for p in ports if p["state"].startswith("down")]
        assert "over the" in hostile["state"] and hostile["counters"]["dropped_in"] > 100
        lab.a.ok(f"ping -c 1 -W 5 {lab.b_ip}")
        flooder.close()
