"""Fuzz target: a virtual switch and its gateway receiving whatever guests send
(``popek.net.switch``, ``popek.net.gateway``, ``popek.net.dhcp``, ``popek.net.packets``).

Three ports of one switch with a subnet (DHCP and the gateway's ARP; no NAT, which would
start passt), each a stream socket whose far end, the guest's side, the input drives:
frames of any content from any source address (the port's own, a neighbour's, the
gateway's, a group address), DHCP messages and ARP built around the input's bytes (so
the fuzzer reaches the parsers behind the headers), raw bytes that break the framing,
slow readers and hang-ups. Between records the event loop turns.

Bad input must end in the switch's own answers: a frame dropped and counted, a port
closed for a frame length over the maximum or a hang-up. So after every turn: nothing
escaped into the event loop; a port whose guest kept to the framing is still up; no
port learnt more than its share of addresses or holds more than its share of queued
bytes; DHCP leases stay unique, in the subnet and within each port's share; what the
switch sends a guest is whole frames of legal length, and its gateway's DHCP answers
are well-formed UDP; and the switch's description (what ``popek net info`` shows) is
JSON.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from popek.net import dhcp
from popek.net.backend import MAX_FRAME, MIN_FRAME
from popek.net.gateway import Gateway
from popek.net.packets import (
    BROADCAST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    Udp,
    ethernet,
    parse_udp,
    udp_frame,
)
from popek.net.stream import LENGTH
from popek.net.switch import MACS_PER_PORT, PORT_QUEUE, SOURCE_QUEUE, Port, Switch
from tests.fuzz.harness import Target, read_records

PORTS = 3
SUBNETS = ("192.168.50.0/24", "10.9.0.0/29")  # a /29 runs dry: leases are taken back
# Records: a byte picks one, a struct gives its fields, some take bytes after them.
FRAME = struct.Struct("<BBBH")  # port, source, destination, length: Ethernet + bytes
DHCP = struct.Struct("<BBBH")  # port, source, client address in chaddr, length: options
ARP = struct.Struct("<BBH4s4s")  # port, source, op, sender, target address
RAW = struct.Struct("<BH")  # port, length: bytes straight into the socket
READ = struct.Struct("<BI")  # port, bytes the guest reads (0: all)
HANG_UP = struct.Struct("<B")  # the guest goes; its station comes back on a new port
TURNS = struct.Struct("<B")  # turns of the event loop
RECORDS = (FRAME, DHCP, ARP, RAW, READ, HANG_UP, TURNS)
MAX_HANG_UPS = 8
_loop = asyncio.new_event_loop()
R = TypeVar("R")


def _in_loop(make: Callable[[], R]) -> R:
    """``make()`` run inside the event loop (ports belong to the loop they start in)."""
    async def run() -> R:
        return make()
    return _loop.run_until_complete(run())


class _Guest:
    """The guest's end of one port."""

    def __init__(self, switch: Switch, index: int) -> None:
        ours, self.sock = socket.socketpair()
        self.sock.setblocking(False)
        self.port: Port = switch.attach(ours, guest=index)
        self.mac = bytes((0x52, 0x54, 0, 0, 0, index))
        self.framed = True  # it kept to the framing and did not hang up
        self.wire = bytearray()

    def send(self, data: bytes, framed: bool = True) -> None:
        if self.sock.fileno() < 0:
            return
        if framed:
            data = LENGTH.pack(len(data)) + data
        else:
            self.framed = False
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = 0
        if sent != len(data):
            self.framed = False  # a cut frame: the stream is out of step from here

    def read(self, limit: int, gateway: Gateway) -> None:
        while self.sock.fileno() >= 0:
            try:
                data = self.sock.recv(limit or 1 << 20)
            except (BlockingIOError, ConnectionResetError):
                break
            if not data:
                break
            self.wire += data
            if limit:
                break
        while len(self.wire) >= LENGTH.size:
            size = LENGTH.unpack_from(self.wire)[0]
            assert MIN_FRAME <= size <= MAX_FRAME, f"the switch sent a frame of {size} bytes"
            if len(self.wire) < LENGTH.size + size:
                break
            frame = bytes(self.wire[LENGTH.size:LENGTH.size + size])
            del self.wire[:LENGTH.size + size]
            if frame[6:12] == gateway.mac and frame[12:14] == b"\x08\x00":
                reply = parse_udp(frame)
                assert reply is not None and reply.src_port == dhcp.SERVER_PORT, frame.hex()

    def hang_up(self) -> None:
        self.sock.close()
        self.framed = False


class _Lan:
    def __init__(self, subnet: str) -> None:
        self.switch = Switch("fuzz")
        self.gateway = Gateway(ipaddress.IPv4Network(subnet), False, self.switch.port_of)
        self.switch.services = self.gateway
        self.guests = [_Guest(self.switch, i) for i in range(PORTS)]
        self.gone: list[_Guest] = []  # hung up
        self.errors: list[dict[str, Any]] = []
        _loop.set_exception_handler(lambda _, context: self.errors.append(context))

    def mac(self, choice: int, guest: _Guest) -> bytes:
        """A source or destination address: the guest's own, a neighbour's, the
        gateway's, broadcast, a group address or a made-up one."""
        others = [g.mac for g in self.guests]
        table = [guest.mac, *others, self.gateway.mac, BROADCAST, bytes((1, 0, 0x5E, 0, 0, 1)),
                 bytes((0x52, 0x54, 1, 0, 0, choice))]
        return table[choice % len(table)]

    def turn(self, count: int = 1) -> None:
        for _ in range(count):
            _loop.run_until_complete(asyncio.sleep(0))
        self.check()

    def check(self) -> None:
        assert not self.errors, self.errors[0].get("exception") or self.errors[0]
        for guest in self.guests:
            port = guest.port
            if guest.framed:
                assert not port.closed, f"a well-behaved guest's port closed: {port.closed}"
            assert len(port.macs) <= MACS_PER_PORT
            assert port._held_total <= PORT_QUEUE
            assert all(held <= SOURCE_QUEUE for held in port._held.values())
        leases = self.gateway.dhcp.leases.values()
        addresses = [lease.address for lease in leases]
        assert len(set(addresses)) == len(addresses), "one address leased twice"
        for lease in leases:
            assert lease.address in self.gateway.subnet and \
                lease.address not in self.gateway.addresses, lease
        for guest in self.guests:
            held = sum(1 for lease in leases if lease.owner is guest.port)
            assert held <= dhcp.LEASES_PER_PORT, held
        json.dumps(self.switch.info())

    def close(self) -> None:
        for guest in self.guests + self.gone:
            guest.sock.close()
        _loop.run_until_complete(self.switch.close())


def _dhcp_message(chaddr: bytes, options: bytes) -> bytes:
    """A BOOTREQUEST whose options (and all after them) are the input's bytes."""
    return struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", dhcp.BOOTREQUEST, 1, 6, 0, 0x1234,
                       0, 0, bytes(4), bytes(4), bytes(4), bytes(4), chaddr.ljust(16, b"\0"),
                       bytes(64), bytes(128), dhcp.MAGIC) + options


def one(data: bytes) -> None:
    if not data:
        return
    lan = _in_loop(lambda: _Lan(SUBNETS[data[0] % len(SUBNETS)]))
    try:
        for record, fields, body in read_records(data[1:], RECORDS, (FRAME, DHCP, RAW)):
            guest = lan.guests[fields[0] % PORTS]
            if record is FRAME:
                _, src, dst, _ = fields
                guest.send(lan.mac(dst, guest) + lan.mac(src, guest) + body)
            elif record is DHCP:
                _, src, client, _ = fields
                source = lan.mac(src, guest)
                datagram = Udp(ipaddress.IPv4Address(0), dhcp.LIMITED_BROADCAST,
                               dhcp.CLIENT_PORT, dhcp.SERVER_PORT,
                               _dhcp_message(lan.mac(client, guest), body))
                guest.send(udp_frame(BROADCAST, source, datagram))
            elif record is ARP:
                _, src, op, sender, target = fields
                source = lan.mac(src, guest)
                arp = struct.pack("!HHBBH6s4s6s4s", 1, ETHERTYPE_IPV4, 6, 4, op % 3,
                                  source, sender, bytes(6), target)
                guest.send(ethernet(BROADCAST, source, ETHERTYPE_ARP, arp))
            elif record is RAW:
                guest.send(body, framed=False)
            elif record is READ:
                guest.read(fields[1], lan.gateway)
            elif record is HANG_UP and len(lan.gone) < MAX_HANG_UPS:
                guest.hang_up()
                lan.gone.append(guest)  # its station comes back on a new port
                lan.guests[lan.guests.index(guest)] = _in_loop(
                    lambda: _Guest(lan.switch, guest.mac[-1]))  # noqa: B023 (called at once)
            lan.turn(fields[0] % 4 + 1 if record is TURNS else 1)
        lan.turn(4)
        for guest in lan.guests:
            guest.read(0, lan.gateway)
    finally:
        lan.close()


# -- seeds ------------------------------------------------------------------------------
def _rec(record: struct.Struct, *fields: Any, tail: bytes = b"") -> bytes:
    return bytes([RECORDS.index(record)]) + record.pack(*fields) + tail


def _options(*pairs: tuple[int, bytes]) -> bytes:
    return b"".join(bytes((code, len(value))) + value for code, value in pairs) + b"\xff"


def seeds() -> dict[str, bytes]:
    discover = _options((dhcp.OPT_MESSAGE_TYPE, bytes((dhcp.DISCOVER,))))
    request = _options((dhcp.OPT_MESSAGE_TYPE, bytes((dhcp.REQUEST,))),
                       (dhcp.OPT_REQUESTED_IP, bytes((192, 168, 50, 2))),
                       (dhcp.OPT_HOSTNAME, b"guest"))
    ipv4 = struct.pack("!HBB", ETHERTYPE_IPV4, 0x45, 0) + bytes(60)
    return {
        "dhcp-lease": bytes([0]) + _rec(DHCP, 0, 0, 0, len(discover), tail=discover)
        + _rec(READ, 0, 0) + _rec(DHCP, 0, 0, 0, len(request), tail=request)
        + _rec(READ, 0, 0),
        "dhcp-forged-client": bytes([1]) + _rec(DHCP, 1, 0, 2, len(discover), tail=discover)
        + _rec(READ, 1, 0),
        "arp-gateway": bytes([0]) + _rec(ARP, 0, 0, 1, bytes((192, 168, 50, 2)),
                                         bytes((192, 168, 50, 1))) + _rec(READ, 0, 0),
        "arp-impersonating-gateway": bytes([0]) + _rec(ARP, 1, 1, 2, bytes((192, 168, 50, 1)),
                                                       bytes((192, 168, 50, 3))),
        "unicast-learned": bytes([0]) + _rec(FRAME, 1, 0, 5, len(ipv4), tail=ipv4)
        + _rec(FRAME, 0, 0, 2, len(ipv4), tail=ipv4) + _rec(READ, 1, 0),
        "oversized-length": bytes([0]) + _rec(RAW, 2, 4, tail=b"\xff\xff\xff\xff")
        + _rec(FRAME, 0, 0, 4, len(ipv4), tail=ipv4) + _rec(READ, 1, 0),
        "slow-reader-flood": bytes([0]) + (_rec(FRAME, 0, 0, 5, 1400, tail=bytes(1400))
                                           + _rec(TURNS, 3)) * 2 + _rec(HANG_UP, 2),
    }


TARGET = Target(one=one, ci_runs=1_000, max_len=4096, seeds=seeds)
