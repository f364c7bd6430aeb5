"""Linux guests on virtual switches, driven through their shells, for the network tests.

:class:`Shell` types a command on a guest's console and returns what it printed and its
exit status; where the console lives (QEMU's stdio, a VMM's WebSocket) is a subclass's
business. :func:`check_switched_guests` is the scenario that real guests on one switch,
and one on another, must pass, whoever emulates them.
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# udhcpc's hook: configure the interface with the lease (the bundled initramfs may have
# none of its own).
DHCP_SCRIPT = ('#!/bin/sh\\ncase "$1" in deconfig) ifconfig "$interface" 0.0.0.0 up;; '
               'bound|renew) ifconfig "$interface" "$ip" netmask "$subnet" ${mtu:+mtu $mtu} '
               'up; [ -n "$router" ] && route add default gw "$router"; echo '
               '"DHCP-BOUND $ip";; esac\\nexit 0\\n')
FILE_KIB = 3072  # the file the guests pass each other
TRANSFER_PATIENCE = 900.0  # seconds for it: popek's guests move ~15 KB/s on a busy host


class Shell:
    """A guest's interactive busybox shell on its console."""

    name = "guest"

    def __init__(self) -> None:
        self._marks = itertools.count(1)

    def type(self, text: str) -> None:
        raise NotImplementedError

    def output(self) -> str:
        """Everything the console printed so far."""
        raise NotImplementedError

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} in {timeout:.0f} s; the "
                                     f"console ends with {self.output()[-1500:]!r}")
            time.sleep(0.1)

    def sh(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run ``command``; (exit status, what it printed)."""
        n = next(self._marks)
        self.type(f"echo BEGIN-{n}; {command}; echo END-{n}-$?\n")
        match = self.wait_for(rf"(?s)\nBEGIN-{n}\r?\n(.*?)END-{n}-(\d+)", timeout)
        return int(match.group(2)), match.group(1).replace("\r", "")

    def ok(self, command: str, timeout: float = 120.0) -> str:
        status, out = self.sh(command, timeout)
        assert status == 0, f"{self.name}: {command!r} failed ({status}): {out[-1500:]}"
        return out

    def dhcp(self) -> str:
        """Configure eth0 by DHCP; the address leased."""
        self.ok(f"printf '{DHCP_SCRIPT}' > /tmp/dhcp.sh; chmod +x /tmp/dhcp.sh")
        out = self.ok("udhcpc -i eth0 -s /tmp/dhcp.sh -n -q -t 10 -T 2", timeout=60)
        return re.search(r"DHCP-BOUND (\S+)", out).group(1)

    def sha256(self, path: str) -> str:
        return self.ok(f"sha256sum {path}").split()[0]


def check_switched_guests(a: Shell, b: Shell, a_ip: str, b_ip: str, kib: int = FILE_KIB,
                          outsider: Shell | None = None) -> None:
    """``a`` and ``b`` share a switch: they ping each other and pass a file of ``kib`` KiB
    with nc, intact. ``outsider``, on another switch with an address of the same subnet,
    reaches neither."""
    a.ok(f"ping -c 2 -W 5 {b_ip}")
    b.ok(f"ping -c 2 -W 5 {a_ip}")
    b.ok(f"dd if=/dev/urandom of=/tmp/sent bs=1024 count={kib} 2>/dev/null")
    sent = b.sha256("/tmp/sent")
    a.ok("nc -l -p 5000 > /tmp/got & sleep 1")
    b.ok(f"nc {a_ip} 5000 < /tmp/sent", TRANSFER_PATIENCE)
    a.ok("wait")
    assert a.sha256("/tmp/got") == sent
    assert a.ok("wc -c < /tmp/got").strip() == str(kib * 1024)
    for ip in (a_ip, b_ip) if outsider is not None else ():
        status, out = outsider.sh(f"ping -c 2 -W 2 {ip}")
        assert status != 0 and " 0 packets received" in out, out


@contextmanager
def http_server() -> Iterator[tuple[int, bytes]]:
    """An HTTP server on the host's loopback: (its port, the page at /page)."""
    page = hashlib.sha256(b"popek").hexdigest().encode() * 100

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/page" else 404)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], page
    finally:
        server.shutdown()
        server.server_close()


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
