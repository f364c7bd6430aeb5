"""Guest networking with real clients on the other end, in one Linux boot.

One ``popek run`` guest gets two NICs: user networking (passt, QEMU's address layout,
a ``hostfwd`` port, a pcap capture) and a ``stream`` network that a QEMU guest (same
kernel and initramfs) joins. The guest's init takes its address by DHCP; its script
fetches a page from a host server with ``wget``, serves files with busybox ``httpd``
(fetched by aiohttp on the host), and swaps a file with the QEMU guest over ``nc`` both
ways. Each test asserts one outcome of that run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import ipaddress
import lzma
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from popek import images
from tests.linux_guest import BOOT_TIMEOUT, ConsoleLines, free_port

BUSYBOX = images.PROGRAMS / "busybox"  # the initramfs's /bin/busybox
HOST_PAGE = b"served by the host on its loopback\n"
SUBNET = "192.168.76"  # the stream network between the two guests

# The bundled init has configured eth0 (the user NIC) by DHCP before this runs.
POPEK_GUEST = """
echo "page: $(wget -q -O - http://10.0.2.2:{host_port}/page.txt)"
mkdir /www; echo popek guest page > /www/index.html
cat /bin/busybox /bin/busybox /bin/busybox > /www/big
httpd -h /www -p 80
ip link set eth1 up; ip addr add {subnet}.1/24 dev eth1
echo READY
read go
until nc {subnet}.2 5000 < /bin/busybox; do sleep 1; done
nc -l -p 5001 > /tmp/from-qemu
echo "from qemu: $(sha256sum < /tmp/from-qemu)"
"""

# busybox nc stops sending once the other side has closed, and a receiver whose stdin
# ends closes its side at once: so each guest receives in the foreground (stdin is the
# console), and they take turns. The QEMU guest's kernel configures its address itself.
QEMU_IP = f"ip={SUBNET}.2:::255.255.255.0::eth0:off"
QEMU_GUEST = """
nc -l -p 5000 > /tmp/from-popek
echo "from popek: $(sha256sum < /tmp/from-popek)"
until nc {subnet}.1 5001 < /bin/busybox; do sleep 1; done
"""


@dataclass
class Run:
    """What the two guests and the host saw."""

    popek: list[str] = field(default_factory=list)  # the popek guest's output lines
    qemu: str = ""  # the QEMU guest's console
    fetched: dict[str, bytes] = field(default_factory=dict)  # over the hostfwd port
    pcap: Path | None = None
    console: str = ""  # the popek guest's whole console, boot included

    def line(self, key: str) -> str:
        for line in self.popek:
            if line.startswith(key + ": "):
                return line[len(key) + 2:]
        raise AssertionError(f"no {key!r} line in the popek guest's output: {self.popek}")


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(HOST_PAGE)))
        self.end_headers()
        self.wfile.write(HOST_PAGE)

    def log_message(self, *args: object) -> None:
        pass


async def _fetch(port: int, paths: list[str]) -> dict[str, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        fetched = {}
        for path in paths:
            async with session.get(f"http://127.0.0.1:{port}/{path}") as response:
                assert response.status == 200, path
                fetched[path] = await response.read()
        return fetched


@pytest.mark.boots_linux
class TestGuestNetworking:
    """One boot of the popek guest (and a two-second one of QEMU's) serves every test."""

    @pytest.fixture(scope="class")
    @classmethod
    def run(cls, tmp_path_factory: pytest.TempPathFactory) -> Run:
        tmp = tmp_path_factory.mktemp("net")
        qemu_kernel = tmp / "Image"
        with lzma.open(images.KERNEL) as src, open(qemu_kernel, "wb") as dst:
            shutil.copyfileobj(src, dst)
        host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
        threading.Thread(target=host.serve_forever, daemon=True).start()
        fwd_port, link = free_port(), tmp / "link.sock"
        result = Run(pcap=tmp / "eth0.pcap")
        # The script travels on a raw disk: the kernel command line holds only 1 KiB.
        script = POPEK_GUEST.format(host_port=host.server_address[1], subnet=SUBNET).encode()
        disk = tmp / "script.img"
        disk.write_bytes(script + bytes(-len(script) % 512))
        popek = subprocess.Popen(
            [sys.executable, "-m", "popek", "run",
             "--nic", f"user,hostfwd=tcp:127.0.0.1:{fwd_port}-:80,pcap={result.pcap}",
             "--nic", f"stream,listen={link}", "--console-log", str(tmp / "console.log"),
             "--disk", f"{disk},ro", "-c", "tr -d '\\0' < /dev/vda > /tmp/s; sh /tmp/s"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        qemu = None
        try:
            lines = ConsoleLines(popek)
            lines.wait_for("READY", BOOT_TIMEOUT)
            result.fetched = asyncio.run(_fetch(fwd_port, ["index.html", "big"]))
            qemu_cmd = base64.b64encode(QEMU_GUEST.format(subnet=SUBNET).encode()).decode()
            qemu = subprocess.Popen(
                ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic",
                 "-kernel", str(qemu_kernel), "-initrd", str(images.INITRD),
                 "-append", f"console=ttyS0 quiet {QEMU_IP} popek.cmd={qemu_cmd}",
                 "-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={link}",
                 "-device", "virtio-net-device,netdev=n0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            lines.send("go")
            out, err = popek.communicate(timeout=BOOT_TIMEOUT)
            lines.lines += out.decode(errors="replace").replace("\r", "").splitlines()
            result.popek = lines.lines
            result.qemu = qemu.communicate(timeout=120)[0].decode(errors="replace")
            result.console = (tmp / "console.log").read_text(errors="replace")
            assert popek.returncode == 0, (err.decode(), lines.lines, result.qemu[-3000:])
        finally:
            for proc in (popek, qemu):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            host.shutdown()
        return result

    def test_dhcp_gives_qemus_address_layout_and_a_64k_mtu(self, run: Run) -> None:
        """DNS is the host's nameserver (10.0.2.2 when that is on the host's loopback):
        this passt cannot offer QEMU's 10.0.2.3 and also forward it (popek/net/passt.py)."""
        match = re.search(r"eth0: (\S+) via (\S+), mtu (\d+), dns (\S+)", run.console)
        assert match, run.console[-3000:]
        assert match.groups()[:3] == ("10.0.2.15/24", "10.0.2.2", "65520")
        host_dns = re.search(r"^nameserver\s+(\S+)", Path("/etc/resolv.conf").read_text(), re.M)
        if host_dns:
            loopback = ipaddress.ip_address(host_dns.group(1)).is_loopback
            assert match.group(4) == ("10.0.2.2" if loopback else host_dns.group(1))

    def test_guest_wget_reaches_a_host_server_on_the_loopback(self, run: Run) -> None:
        assert run.line("page") == HOST_PAGE.decode().strip()

    def test_host_fetches_a_page_and_a_multi_megabyte_file_through_hostfwd(self, run: Run
                                                                          ) -> None:
        assert run.fetched["index.html"] == b"popek guest page\n"
        big = BUSYBOX.read_bytes() * 3
        assert len(run.fetched["big"]) == len(big) > 4 << 20
        assert hashlib.sha256(run.fetched["big"]).digest() == hashlib.sha256(big).digest()

    def test_popek_and_qemu_guests_swap_files_over_a_stream_network(self, run: Run) -> None:
        digest = hashlib.sha256(BUSYBOX.read_bytes()).hexdigest()
        assert re.search(rf"from popek: {digest}\b", run.qemu), run.qemu[-2000:]
        assert run.line("from qemu").split()[0] == digest

    def test_capture_shows_the_dhcp_exchange_and_64k_frames(self, run: Run) -> None:
        dump = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(run.pcap)],
                              capture_output=True, text=True, check=True).stdout
        assert "10.0.2.2.67 > 10.0.2.15.68: BOOTP/DHCP, Reply" in dump
        assert "10.0.2.15.80 > " in dump  # httpd's replies through hostfwd
        sizes = [int(n) for n in re.findall(r", length (\d+):", dump)]
        assert max(sizes) > 60_000  # the big file went out in frames near the 64K MTU
