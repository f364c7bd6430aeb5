"""Network benchmark: popek's virtio-net beside qemu-system-riscv64's, same guest, same run.

Each emulator boots the same kernel and initramfs with two NICs: user networking (popek:
passt; QEMU: its built-in slirp) with a port forward to the guest's busybox httpd, and a
stream NIC whose other end is this script. Once the guest has its DHCP lease:

- wake latency: the guest idles; this script sends it an ARP request on the stream NIC
  and times the reply (a frame waking an idle guest, through its kernel, and back);
- guest -> host: a 16 MiB GET from the guest's httpd through the forwarded port;
- host -> guest: the guest's wget fetches 16 MiB from a server on this host's loopback
  (through 10.0.2.2), timed from the command to its "done" line on the console;
- small requests: sequential GETs of a small page from the guest's httpd (each one a TCP
  connection and a forked httpd in the guest);
- guest -> guest: two guests (128 MiB each, static addresses, the 64 KiB MTU a switch's
  DHCP offers) joined by a link; one fetches 16 MiB from the other's httpd with wget,
  timed between two lines on the fetching guest's console. popek's guests run under
  ``popek serve`` on a popek switch, QEMU's are joined directly (``-netdev stream``, one
  listening); a last row puts QEMU's guests on a popek switch instead, to show what the
  switch itself costs.

    python bench/net.py [--engine jit] [--requests 50]

Times are wall clock; the ratio column is popek's time over QEMU's. A last line times
popek's machine runner alone: an idle bare-metal guest, a frame sent to its NIC, and the
delay until the NIC has taken it (the runner's wait ending, in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import http.server
import lzma
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.vmm import own_vmm  # noqa: E402
from popek import images  # noqa: E402
from popek.api.client import Client  # noqa: E402
from popek.net.dhcp import MTU  # noqa: E402
from popek.vmm.networks import Networks  # noqa: E402
from tests.linux_guest import ConsoleLines, free_port  # noqa: E402

SIZE = 16 << 20
G2G_FETCHER, G2G_SERVER = "10.9.0.1", "10.9.0.2"  # the guest-to-guest pair's addresses
USER_MAC, LINK_MAC, PEER_MAC = "52:54:00:12:34:56", "52:54:00:12:34:57", "52:54:00:aa:bb:cc"
GUEST_LINK_IP, PEER_IP = "192.168.77.2", "192.168.77.1"
BOOT_TIMEOUT = 900

# The kernel's and init's own network set-up is off (ip=off): the script takes the user
# NIC's lease itself, whichever interface it is, so both emulators run the same steps.
GUEST = r"""
for i in /sys/class/net/eth*; do
  [ "$(cat $i/address)" = {user_mac} ] && U=${{i##*/}}
  [ "$(cat $i/address)" = {link_mac} ] && S=${{i##*/}}
done
ip link set lo up; ip link set $U up
udhcpc -i $U -q -f -n -O mtu >/dev/null 2>&1
ip link set $S up; ip addr add {link_ip}/24 dev $S
mkdir /www; echo small page > /www/index.html
dd if=/dev/zero of=/www/big bs=1M count={mib} 2>/dev/null
httpd -h /www -p 80
echo "READY mtu $(cat /sys/class/net/$U/mtu)"
while read cmd; do
  case "$cmd" in
    h2g) wget -q -O /dev/null http://10.0.2.2:{host_port}/big; echo "DONE $?";;
    quit) break;;
  esac
done
"""


class _Big(http.server.BaseHTTPRequestHandler):
    """Serves SIZE zero bytes at any path."""

    body = bytes(SIZE)
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def arp_request() -> bytes:
    mac = bytes.fromhex(PEER_MAC.replace(":", ""))
    return b"\xff" * 6 + mac + struct.pack(">HHHBBH", 0x0806, 1, 0x0800, 6, 4, 1) + mac \
        + socket.inet_aton(PEER_IP) + bytes(6) + socket.inet_aton(GUEST_LINK_IP)


def wake_latencies(link: socket.socket, samples: int) -> list[float]:
    """Seconds from an ARP request to the idle guest until its reply arrives."""
    request = arp_request()
    link.settimeout(5)
    times = []
    for _ in range(samples):
        time.sleep(0.05)  # let the guest go idle again
        start = time.perf_counter()
        link.sendall(struct.pack(">I", len(request)) + request)
        while True:  # skip anything else the guest says
            size = struct.unpack(">I", _exactly(link, 4))[0]
            frame = _exactly(link, size)
            if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                break
        times.append(time.perf_counter() - start)
    return times


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the guest's stream NIC closed")
        data += chunk
    return data


def runner_wake(samples: int) -> list[float]:
    """Seconds from a frame's send to an idle guest's NIC until the NIC has taken it."""
    from popek.machine.config import MachineConfig, NicSpec
    from popek.machine.runner import MachineRunner
    from popek.machine.virt import VirtMachine
    from popek.net.stream import StreamBackend
    from tests.vmm_guests import guest

    peer, ours = socket.socketpair()
    backend = StreamBackend(ours)
    taken: list[float] = []
    receive = backend.receive

    def timed_receive() -> bytes | None:
        frame = receive()
        if frame is not None:
            taken.append(time.perf_counter())
        return frame
    backend.receive = timed_receive
    runner, out = MachineRunner(), bytearray()
    config = MachineConfig(kernel=guest("idle"), mem=32 << 20, rng=False,
                           nics=[NicSpec(type="stream", connect="/unused")])
    runner.machine = machine = VirtMachine(config, out.extend, nets=[backend],
                                            events=runner.sources)
    while b"idle ready" not in out:
        runner.step()
    frame = arp_request()
    sent: list[float] = []

    def send() -> None:
        for _ in range(samples):
            time.sleep(0.02)
            sent.append(time.perf_counter())
            peer.sendall(struct.pack(">I", len(frame)) + frame)
    sender = threading.Thread(target=send)
    sender.start()
    while len(taken) < samples:
        runner.step()
    sender.join()
    machine.close()
    return [t - s for s, t in zip(sent, taken, strict=True)]


def get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


def measure(name: str, cmd: list[str], listener: socket.socket, fwd_port: int,
            requests: int) -> dict[str, float]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        listener.settimeout(BOOT_TIMEOUT)
        link, _ = listener.accept()
        console = ConsoleLines(proc)
        start = time.monotonic()
        ready = console.wait_for("READY", BOOT_TIMEOUT)
        print(f"  {name}: ready after {time.monotonic() - start:.0f} s ({ready})",
              file=sys.stderr)
        time.sleep(2)
        wake = wake_latencies(link, 30)
        start = time.perf_counter()
        body = get(fwd_port, "/big")
        g2h = time.perf_counter() - start
        assert len(body) == SIZE, len(body)
        start = time.perf_counter()
        console.send("h2g")
        done = console.wait_for("DONE", 300)
        h2g = time.perf_counter() - start
        assert done == "DONE 0", done
        start = time.perf_counter()
        for _ in range(requests):
            assert get(fwd_port, "/index.html") == b"small page\n"
        small = (time.perf_counter() - start) / requests
        console.send("quit")
        proc.wait(60)
        return {"wake": statistics.median(wake), "g2h": g2h, "h2g": h2g, "small": small}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- guest to guest ---------------------------------------------------------------------------
def g2g_appends(mib: int) -> tuple[str, str]:
    """Kernel command lines of the (fetcher, server) pair: each runs its part as the
    initramfs' ``popek.cmd``. The fetcher prints ``G2G-START`` when the server answers,
    ``G2G-DONE`` once the file is in, then its size, and powers off; the server serves
    until it is killed."""
    up = f"mtu {MTU} up"
    fetcher = (f"ifconfig eth0 {G2G_FETCHER} {up}; until wget -q -O /dev/null "
               f"http://{G2G_SERVER}/index.html; do sleep 1; done; echo G2G-START; "
               f"wget -q -O /tmp/got http://{G2G_SERVER}/big; echo G2G-DONE; "
               "wc -c < /tmp/got")
    server = (f"ifconfig eth0 {G2G_SERVER} {up}; mkdir /www; echo hi > /www/index.html; "
              f"dd if=/dev/zero of=/www/big bs=1M count={mib} 2>/dev/null; "
              "httpd -f -h /www -p 80")
    return _popek_cmd(fetcher), _popek_cmd(server)


def _popek_cmd(command: str) -> str:
    return "console=ttyS0 quiet ip=off popek.cmd=" + base64.b64encode(command.encode()).decode()


class G2GClock:
    """The fetcher's console, fed as it arrives: when G2G-START and G2G-DONE appeared,
    and the size it printed after G2G-DONE."""

    def __init__(self) -> None:
        self.text = b""
        self.seen: dict[bytes, float] = {}

    def feed(self, data: bytes) -> None:
        self.text += data
        for marker in (b"G2G-START", b"G2G-DONE"):
            if marker not in self.seen and b"\n" + marker in self.text:
                self.seen[marker] = time.monotonic()

    def seconds(self, mib: int) -> float:
        size = re.search(rb"G2G-DONE\r?\n(\d+)", self.text)
        if size is None or int(size.group(1)) != mib << 20 or len(self.seen) < 2:
            sys.exit("guest to guest: the transfer did not complete; the fetcher's console "
                     f"ends with {self.text[-800:].decode(errors='replace')!r}")
        return self.seen[b"G2G-DONE"] - self.seen[b"G2G-START"]


def qemu_g2g(kernel: Path, mib: int, netdevs: tuple[str, str]) -> float:
    """Seconds for one QEMU guest to fetch ``mib`` MiB from another's httpd, the two on
    the given ``-netdev`` (fetcher's, server's)."""
    clock, procs = G2GClock(), []
    try:
        for n, (append, netdev) in enumerate(reversed(list(zip(g2g_appends(mib), netdevs,
                                                                 strict=True)))):
            procs.append(subprocess.Popen(
                ["qemu-system-riscv64", "-M", "virt", "-m", "128M", "-nographic",
                 "-kernel", str(kernel), "-initrd", str(images.INITRD), "-append", append,
                 "-device", f"virtio-net-device,netdev=n0,mac=52:54:00:00:09:{n:02x}",
                 "-netdev", netdev],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            time.sleep(0.5)  # the server first: it listens, when the link is direct
        fetcher = procs[1]
        while chunk := fetcher.stdout.read1(65536):
            clock.feed(chunk)
        fetcher.wait(60)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return clock.seconds(mib)


def qemu_via_switch(kernel: Path, mib: int, where: Path) -> float:
    """QEMU's pair, each guest on a port of a popek switch run in this process."""
    path = where / "switch.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        switch = Networks().create({"name": "bench", "subnet": None})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), lambda: switch.attach(listener.accept()[0]))
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait()
    netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={path}"
    try:
        return qemu_g2g(kernel, mib, (netdev, netdev))
    finally:
        loop.call_soon_threadsafe(loop.stop)


async def _popek_g2g(sock: Path, kernel: Path, mib: int, engine: str) -> float:
    clock = G2GClock()
    async with Client(sock) as client:
        await client.create_network("bench", subnet=None)
        fetcher, server = g2g_appends(mib)
        await client.create(name="server", kernel=str(kernel), initrd=str(images.INITRD),
                            mem=128 << 20, append=server, engine=engine,
                            nics=[{"type": "switch", "switch": "bench"}])
        vm = await client.create(name="fetcher", kernel=str(kernel),
                                 initrd=str(images.INITRD), mem=128 << 20, append=fetcher,
                                 engine=engine, nics=[{"type": "switch", "switch": "bench"}])
        async with client.console(vm["id"]) as ws:
            async for msg in ws:
                clock.feed(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
    return clock.seconds(mib)


def popek_g2g(kernel: Path, mib: int, engine: str, where: Path) -> float:
    """popek's pair under a ``popek serve`` of its own, on a popek switch."""
    with own_vmm(where) as (sock, _):
        return asyncio.run(asyncio.wait_for(_popek_g2g(sock, kernel, mib, engine),
                                            BOOT_TIMEOUT + 60 * mib))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="jit", help="popek's execution tier (jit)")
    parser.add_argument("--requests", type=int, default=50, help="small GETs timed (50)")
    args = parser.parse_args()
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        kernel, disk, link_path = Path(tmp) / "Image", Path(tmp) / "script.img", \
            Path(tmp) / "link.sock"
        kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
        script = GUEST.format(user_mac=USER_MAC, link_mac=LINK_MAC, link_ip=GUEST_LINK_IP,
                              mib=SIZE >> 20, host_port=host.server_address[1]).encode()
        disk.write_bytes(script + bytes(-len(script) % 512))
        run_script = "tr -d '\\0' < /dev/vda > /tmp/s; sh /tmp/s"
        append = "console=ttyS0 quiet ip=off popek.cmd=" + \
            base64.b64encode(run_script.encode()).decode()
        for name in ("qemu", "popek"):
            link_path.unlink(missing_ok=True)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(link_path))
            listener.listen(1)
            fwd = free_port()
            if name == "popek":
                cmd = [sys.executable, "-m", "popek", "run", "--engine", args.engine,
                       "--kernel", str(kernel), "--initrd", str(images.INITRD),
                       "--append", append, "--disk", f"{disk},ro",
                       "--nic", f"user,mac={USER_MAC},hostfwd=tcp:127.0.0.1:{fwd}-:80",
                       "--nic", f"stream,mac={LINK_MAC},connect={link_path}"]
            else:
                cmd = ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic",
                       "-kernel", str(kernel), "-initrd", str(images.INITRD), "-append", append,
                       "-drive", f"file={disk},format=raw,if=none,id=d0,readonly=on",
                       "-device", "virtio-blk-device,drive=d0",
                       "-netdev", f"user,id=u0,hostfwd=tcp:127.0.0.1:{fwd}-:80",
                       "-device", f"virtio-net-device,netdev=u0,mac={USER_MAC}",
                       "-netdev", f"stream,id=s0,server=off,addr.type=unix,addr.path={link_path}",
                       "-device", f"virtio-net-device,netdev=s0,mac={LINK_MAC}"]
            results[name] = measure(name, cmd, listener, fwd, args.requests)
            listener.close()
        link = f"stream,id=n0,addr.type=unix,addr.path={Path(tmp) / 'g2g.sock'}"
        results["qemu"]["g2g"] = qemu_g2g(kernel, SIZE >> 20, (f"{link},server=off",
                                                               f"{link},server=on"))
        results["popek"]["g2g"] = popek_g2g(kernel, SIZE >> 20, args.engine, Path(tmp))
        via_switch = qemu_via_switch(kernel, SIZE >> 20, Path(tmp))
    host.shutdown()
    p, q = results["popek"], results["qemu"]
    mib = SIZE >> 20
    print(f"Guest networking: popek (--engine {args.engine}, --nic user = passt, popek "
          "switch) beside qemu-system-riscv64 (-netdev user = slirp, -netdev stream); same "
          "kernel, initramfs and scripts")
    print(f"  {'':<48}{'popek':>12}{'QEMU':>12}{'popek/QEMU':>12}")
    rows = [
        (f"{mib} MiB guest -> host (host GETs from httpd)", "g2h", "s"),
        (f"{mib} MiB host -> guest (guest wget via 10.0.2.2)", "h2g", "s"),
        ("small GET through hostfwd (per request)", "small", "ms"),
        ("idle guest answers an ARP (median)", "wake", "ms"),
        (f"{mib} MiB guest -> guest (wget from httpd)", "g2g", "s"),
    ]
    for label, key, unit in rows:
        scale = 1000 if unit == "ms" else 1
        print(f"  {label:<48}{p[key] * scale:10.2f}{unit:>2}{q[key] * scale:10.2f}{unit:>2}"
              f"{p[key] / q[key]:11.1f}x")
    print(f"  QEMU's guests through a popek switch: {via_switch:.2f} s, "
          f"{via_switch / q['g2g']:.2f}x QEMU's direct link")
    wake = runner_wake(50)
    print(f"  popek's runner: a frame to an idle guest's NIC is taken after "
          f"{statistics.median(wake) * 1e6:.0f} us (median of 50; max {max(wake) * 1e6:.0f} us)")
    for key, label in (("g2h", "guest -> host"), ("h2g", "host -> guest"),
                       ("g2g", "guest -> guest")):
        print(f"  throughput {label}: popek {mib / p[key]:.1f} MiB/s, QEMU {mib / q[key]:.1f} "
              "MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
