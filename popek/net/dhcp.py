"""A DHCP server for one switch's subnet (RFC 2131, options from RFC 2132).

Leases are by the client's MAC address and stay with it for as long as the switch
exists: a guest gets the same address back after a renewal, a reboot, or a restore from a
snapshot (a VM keeps its MAC, so the address the snapshot's kernel still has is its
lease). The lease time only sets how often clients renew. An address goes to another
station only when the pool has run dry, and then it is the oldest lease of a station that
is no longer attached.

Requests are untrusted: a malformed message, or one whose client hardware address is not
the frame's source, is ignored and counted, and one switch port may hold at most
:data:`LEASES_PER_PORT` leases, so a guest forging addresses cannot drain the pool.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from popek.net.packets import BROADCAST, mac_text

SERVER_PORT = 67
CLIENT_PORT = 68
LEASE_SECONDS = 3600
LEASES_PER_PORT = 8
# The MTU offered, as passt offers its guests: the largest 802.3 payload less the header,
# rounded to 32 bits. Every NIC on a switch takes frames that large, and a guest's cost is
# per frame, so large frames move bulk data many times faster than 1500-byte ones.
MTU = 65520
BOOTREQUEST, BOOTREPLY = 1, 2
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
# Options (RFC 2132)
OPT_PAD, OPT_END = 0, 255
OPT_NETMASK, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME, OPT_MTU, OPT_BROADCAST = 1, 3, 6, 12, 26, 28
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
OPT_RENEWAL_TIME, OPT_REBINDING_TIME = 58, 59

_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")
MAGIC = bytes((99, 130, 83, 99))
MIN_MESSAGE = 300  # BOOTP's size, which some clients still insist on
BROADCAST_FLAG = 0x8000
ANY = IPv4Address(0)
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
_HOSTNAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")


@dataclass
class Message:
    """The parts of a client's message the server acts on."""

    kind: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    giaddr: bytes
    chaddr: bytes  # the whole 16-byte field, echoed in the reply
    options: dict[int, bytes]

    @property
    def mac(self) -> bytes:
        return self.chaddr[:6]

    @property
    def requested(self) -> IPv4Address | None:
        value = self.options.get(OPT_REQUESTED_IP)
        return IPv4Address(value) if value is not None and len(value) == 4 else None


def parse(payload: bytes) -> Message | None:
    """A BOOTREQUEST from an Ethernet client, or None if it is anything else or broken."""
    if len(payload) < _BOOTP.size:
        return None
    (op, htype, hlen, _, xid, _, flags, ciaddr, _, _, giaddr, chaddr, _, _,
     magic) = _BOOTP.unpack_from(payload)
    if op != BOOTREQUEST or htype != 1 or hlen != 6 or magic != MAGIC:
        return None
    options: dict[int, bytes] = {}
    pos = _BOOTP.size
    while pos < len(payload):
        code = payload[pos]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            pos += 1
            continue
        if pos + 2 > len(payload) or pos + 2 + payload[pos + 1] > len(payload):
            return None
        end = pos + 2 + payload[pos + 1]
        options[code] = options.get(code, b"") + payload[pos + 2:end]  # RFC 3396
        pos = end
    kind = options.get(OPT_MESSAGE_TYPE, b"")
    if len(kind) != 1 or not DISCOVER <= kind[0] <= INFORM:
        return None
    return Message(kind[0], xid, flags, IPv4Address(ciaddr), giaddr, chaddr, options)


@dataclass
class Lease:
    mac: bytes
    address: IPv4Address
    owner: object  # the switch port that asked for it
    hostname: str = ""
    bound: float | None = None  # time of the last ACK; None while only offered

    def info(self) -> dict[str, Any]:
        return {"mac": mac_text(self.mac), "address": str(self.address),
                "hostname": self.hostname, "state": "bound" if self.bound else "offered",
                "bound": self.bound}


@dataclass
class Reply:
    """A message for the client, and where it must go."""

    payload: bytes
    dst_ip: IPv4Address
    dst_mac: bytes


@dataclass
class DhcpServer:
    """Hands out the addresses of ``subnet`` except ``reserved`` (the gateway's). ``router``
    and ``dns`` are offered when set; ``attached(mac)`` tells whether a station is still on
    the switch (its lease cannot be taken back)."""

    subnet: IPv4Network
    server: IPv4Address
    reserved: frozenset[IPv4Address]
    attached: Callable[[bytes], bool]
    router: IPv4Address | None = None
    dns: IPv4Address | None = None
    leases: dict[bytes, Lease] = field(default_factory=dict)
    on_bound: Callable[[], None] = lambda: None  # a lease was granted or renewed
    ignored: int = 0  # malformed or forged requests
    _declined: set[IPv4Address] = field(default_factory=set)

    def handle(self, client_mac: bytes, payload: bytes, owner: object) -> Reply | None:
        """The answer to a client's message (None: no answer is due)."""
        msg = parse(payload)
        if msg is None or msg.mac != client_mac:
            self.ignored += 1
            return None
        if msg.kind == DISCOVER:
            lease = self._lease(msg.mac, msg.requested, owner)
            return None if lease is None else self._reply(msg, OFFER, lease.address)
        if msg.kind == REQUEST:
            return self._request(msg, owner)
        if msg.kind == INFORM:  # configured by hand, asking for the other parameters
            return self._reply(msg, ACK, None)
        if msg.kind == DECLINE:  # another station answers ARP for it: never hand it out
            lease = self.leases.get(msg.mac)
            if lease is not None and lease.address == msg.requested:
                self._declined.add(lease.address)
                del self.leases[msg.mac]
        return None  # RELEASE: the address stays this station's, as its lease says

    def _request(self, msg: Message, owner: object) -> Reply | None:
        server = msg.options.get(OPT_SERVER_ID)
        if server is not None and server != self.server.packed:
            return None  # it took another server's offer
        wanted = msg.requested or (msg.ciaddr if msg.ciaddr != ANY else None)
        lease = self._lease(msg.mac, wanted, owner) if wanted is not None else None
        if lease is None or lease.address != wanted:
            return self._reply(msg, NAK, None)
        lease.bound = time.time()
        self.on_bound()
        name = _HOSTNAME.match(msg.options.get(OPT_HOSTNAME, b""))
        lease.hostname = name.group().decode() if name else lease.hostname
        return self._reply(msg, ACK, lease.address)

    # -- addresses ------------------------------------------------------------------------
    def _lease(self, mac: bytes, wanted: IPv4Address | None, owner: object) -> Lease | None:
        """``mac``'s lease; a new one (``wanted`` if it is free) if it has none."""
        lease = self.leases.get(mac)
        if lease is not None:
            lease.owner = owner
            return lease
        if sum(1 for held in self.leases.values() if held.owner is owner) >= LEASES_PER_PORT:
            return None
        taken = {held.address for held in self.leases.values()}
        address = wanted if wanted is not None and self._free(wanted, taken) else \
            next((a for a in self._pool() if self._free(a, taken)), None)
        if address is None:
            address = self._reclaim()
        if address is None:
            return None
        lease = self.leases[mac] = Lease(mac, address, owner)
        return lease

    def _pool(self) -> Iterator[IPv4Address]:
        return (a for a in self.subnet.hosts() if a not in self.reserved)

    def _free(self, address: IPv4Address, taken: set[IPv4Address]) -> bool:
        return address in self.subnet and address not in taken and \
            address not in self.reserved and address not in self._declined and \
            address not in (self.subnet.network_address, self.subnet.broadcast_address)

    def _reclaim(self) -> IPv4Address | None:
        idle = [lease for lease in self.leases.values() if not self.attached(lease.mac)]
        if not idle:
            return None
        oldest = min(idle, key=lambda lease: lease.bound or 0.0)
        del self.leases[oldest.mac]
        return oldest.address

    def address_of(self, mac: bytes) -> IPv4Address | None:
        lease = self.leases.get(mac)
        return lease.address if lease is not None and lease.bound else None

    # -- replies --------------------------------------------------------------------------
    def _reply(self, msg: Message, kind: int, yiaddr: IPv4Address | None) -> Reply:
        options = [(OPT_MESSAGE_TYPE, bytes((kind,))), (OPT_SERVER_ID, self.server.packed)]
        if kind != NAK:
            if yiaddr is not None:
                options += [(OPT_LEASE_TIME, struct.pack("!I", LEASE_SECONDS)),
                            (OPT_RENEWAL_TIME, struct.pack("!I", LEASE_SECONDS // 2)),
                            (OPT_REBINDING_TIME, struct.pack("!I", LEASE_SECONDS * 7 // 8))]
            options += [(OPT_NETMASK, self.subnet.netmask.packed),
                        (OPT_BROADCAST, self.subnet.broadcast_address.packed),
                        (OPT_MTU, struct.pack("!H", MTU))]
            if self.router is not None:
                options.append((OPT_ROUTER, self.router.packed))
            if self.dns is not None:
                options.append((OPT_DNS, self.dns.packed))
        body = b"".join(bytes((code, len(value))) + value for code, value in options)
        ciaddr = msg.ciaddr if kind != NAK else ANY
        payload = _BOOTP.pack(BOOTREPLY, 1, 6, 0, msg.xid, 0, msg.flags, ciaddr.packed,
                              (yiaddr or ANY).packed, ANY.packed, msg.giaddr, msg.chaddr,
                              bytes(64), bytes(128), MAGIC) + body + bytes((OPT_END,))
        payload += bytes(max(0, MIN_MESSAGE - len(payload)))
        # RFC 2131 4.1: where the client can hear the answer
        if kind == NAK or (msg.ciaddr == ANY and msg.flags & BROADCAST_FLAG):
            return Reply(payload, LIMITED_BROADCAST, BROADCAST)
        if msg.ciaddr != ANY:
            return Reply(payload, msg.ciaddr, msg.mac)
        return Reply(payload, yiaddr or LIMITED_BROADCAST, msg.mac)

    def info(self) -> list[dict[str, Any]]:
        return [lease.info() for lease in sorted(self.leases.values(),
                                                 key=lambda lease: lease.address)]

    def restore(self, leases: list[dict[str, Any]]) -> None:
        """Bound leases as :meth:`info` listed them (a VMM before this one granted them:
        its guests still use the addresses)."""
        for lease in leases:
            if lease.get("bound"):
                mac = bytes.fromhex(lease["mac"].replace(":", ""))
                self.leases[mac] = Lease(mac, IPv4Address(lease["address"]), None,
                                         lease.get("hostname", ""), lease["bound"])

