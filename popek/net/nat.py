"""A switch's NAT uplink: each guest reaches the outside through a passt of its own.

passt (Debian's package; QEMU, libvirt and podman use it for user networking) turns one
guest's frames into ordinary host sockets, without privileges, and maps its gateway
address to the host's loopback as QEMU's user networking does. But a passt serves exactly
one guest address, and it answers ARP for every address except that one, so one passt
cannot front a whole switch. Each guest that sends to the gateway gets its own, started
on its first such frame and told:

- the guest's leased address (``--address``, ``--netmask``), so replies and inbound
  translations carry the address the guest really has;
- the switch's gateway address (``--gateway``, mapped to the host's loopback) and the
  gateway's MAC as its own (``--mac-addr``), so to the guest every passt is the one router;
- the switch's DNS address (``--dns-forward``), relayed to the host's resolver;
- ``--no-dhcp``: the switch's DHCP server stays the only one.

The switch gives a passt nothing but its guest's frames for the gateway's MAC (ARP for the
gateway is answered by the switch itself, so passt never gets a request it would answer
wrongly for another guest's address) and delivers the passt's frames to that guest alone.

A passt's tap is one end of a socket pair (``--fd``), not a socket file. passt exits when
the pair closes: when the guest's port or the switch goes away, and also when the VMM
dies, since the kernel then closes the VMM's end. No passt outlives its switch or the VMM.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from popek.net import passt
from popek.net.packets import is_multicast, mac_text
from popek.net.switch import Port

RESTART_DELAY = 5.0  # seconds before a guest whose passt failed gets another
STOP_GRACE = 2.0  # seconds a passt has to exit on its own once its socket closed
_NOISE = ("Failed to send", "Don't run as root")  # what passt says when all is well


class NatUnavailable(Exception):
    """passt is not installed."""


def check_available() -> None:
    if shutil.which(passt.PROGRAM) is None:
        raise NatUnavailable("NAT needs passt: install the Debian package 'passt'")


@dataclass(eq=False)
class Uplink:
    """One guest's passt and the port the switch talks to it through."""

    mac: bytes
    address: IPv4Address
    guest: Port
    port: Port | None = None
    process: asyncio.subprocess.Process | None = None
    error: str = ""
    stopping: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def info(self) -> dict[str, Any]:
        if self.port is not None and not self.port.closed:
            state = "up"
        else:
            state = f"down: {self.error or (self.port.closed if self.port else 'starting')}"
        return {"mac": mac_text(self.mac), "address": str(self.address),
                "pid": self.process.pid if self.process is not None else None,
                "state": state, "counters": self.port.info()["counters"] if self.port else {}}


class Nat:
    """The NAT uplinks of one switch, by guest MAC."""

    def __init__(self, subnet: IPv4Network, gateway: IPv4Address, gateway_mac: bytes,
                 dns: IPv4Address, address_of: Callable[[bytes], IPv4Address | None]) -> None:
        self.subnet = subnet
        self.gateway = gateway
        self.gateway_mac = gateway_mac
        self.dns = dns
        self.address_of = address_of
        self.uplinks: dict[bytes, Uplink] = {}
        self.unrouted = 0  # frames for the outside that had nowhere to go
        self._failed: dict[bytes, float] = {}  # guest MAC -> when its passt failed
        self._running: set[Uplink] = set()  # whose passt may not have been reaped yet

    def forward(self, guest: Port, frame: bytes) -> None:
        """A guest's frame for the gateway: to its passt (started if need be)."""
        mac = frame[6:12]
        uplink = self.uplinks.get(mac)
        if uplink is None:
            uplink = self._start(guest, mac)
            if uplink is None:
                self.unrouted += 1
                return
        uplink.guest = guest  # it may have moved to another port
        uplink.port.send(frame, guest)

    def _start(self, guest: Port, mac: bytes) -> Uplink | None:
        """A passt for ``mac``, if it has a lease and has not just seen one fail."""
        address = self.address_of(mac)
        failed = self._failed.get(mac)
        if address is None or (failed is not None and time.monotonic() - failed
                               < RESTART_DELAY):
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        uplink = Uplink(mac, address, guest)
        uplink.port = Port(ours, lambda _, frame: self._from_passt(uplink, frame),
                           lambda _: self._closed(uplink), mac=mac_text(mac))
        uplink.task = asyncio.create_task(self._run(uplink, theirs))
        self.uplinks[mac] = uplink
        self._running.add(uplink)
        return uplink

    def _command(self, fd: int, address: IPv4Address) -> list[str]:
        return passt.arguments(fd, str(address), self.subnet.prefixlen, str(self.gateway),
                               dhcp=False, mac=mac_text(self.gateway_mac),
                               dns_forward=str(self.dns))

    async def _run(self, uplink: Uplink, theirs: socket.socket) -> None:
        """Start the passt, keep the last thing it complained about, reap it."""
        try:
            try:
                uplink.process = await asyncio.create_subprocess_exec(
                    *self._command(theirs.fileno(), uplink.address),
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            except OSError as err:
                uplink.error = f"cannot start passt: {err.strerror}"
                uplink.port.close(uplink.error)
                return
            finally:
                theirs.close()
            last = ""
            async for raw in uplink.process.stderr:
                line = raw.decode(errors="replace").strip()
                if line and not line.startswith(_NOISE):
                    last = line
            status = await uplink.process.wait()
            if not uplink.stopping:
                uplink.error = f"passt exited with status {status}" + \
                    (f": {last}" if last else "")
                uplink.port.close(uplink.error)
        finally:
            self._running.discard(uplink)

    def _from_passt(self, uplink: Uplink, frame: bytes) -> None:
        dst = frame[:6]
        if dst == uplink.mac or is_multicast(dst):
            uplink.guest.send(frame, uplink.port)
        else:
            uplink.port.counters.dropped_in += 1  # for nobody this passt serves

    def _closed(self, uplink: Uplink) -> None:
        if self.uplinks.get(uplink.mac) is uplink:
            del self.uplinks[uplink.mac]
        if not uplink.stopping:
            self._failed[uplink.mac] = time.monotonic()
        asyncio.get_running_loop().call_later(STOP_GRACE, self._kill, uplink)

    @staticmethod
    def _kill(uplink: Uplink) -> None:
        if uplink.process is not None and uplink.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                uplink.process.kill()

    def port_closed(self, guest: Port) -> None:
        """A guest's port went away: so do its passts."""
        for uplink in [u for u in self.uplinks.values() if u.guest is guest]:
            uplink.stopping = True
            uplink.port.close("the guest left")

    async def close(self) -> None:
        """Every passt gone and reaped."""
        for uplink in list(self.uplinks.values()):
            uplink.stopping = True
            uplink.port.close("the switch was removed")
        running = list(self._running)
        if running:
            await asyncio.wait([u.task for u in running], timeout=STOP_GRACE)
        for uplink in running:
            self._kill(uplink)
            await uplink.task

    def info(self) -> list[dict[str, Any]]:
        return [uplink.info() for uplink in self.uplinks.values()]
