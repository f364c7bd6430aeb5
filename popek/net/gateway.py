"""A switch's own station on its subnet: the gateway address, DHCP and the NAT uplink.

A switch created with a subnet owns its first host address (the gateway, as libvirt's
networks do: 192.168.122.1 on 192.168.122.0/24) and, with NAT, the second one for DNS. It
answers ARP for them itself with one MAC of its own, serves DHCP (:mod:`popek.net.dhcp`),
and hands every other frame a guest sends to that MAC to the guest's NAT uplink
(:mod:`popek.net.nat`), or drops it when the switch has no NAT.

It also keeps guests from impersonating it: an ARP message claiming one of its addresses
and a DHCP server's reply coming from a guest are dropped (and the switch drops frames
from its MAC, see :class:`~popek.net.switch.Services`), so a hostile guest can neither
steal the gateway's traffic nor hand its neighbours addresses.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from popek.net.dhcp import SERVER_PORT, DhcpServer
from popek.net.nat import Nat
from popek.net.packets import (
    ARP_REQUEST,
    BROADCAST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    Udp,
    arp_reply,
    ethertype,
    mac_text,
    parse_arp,
    parse_udp,
    udp_frame,
    udp_ports,
)
from popek.net.switch import Port

MIN_PREFIX = 16  # the largest subnet: 65,000 guests is plenty for one switch
MAX_PREFIX = 29  # the smallest: gateway, DNS and a few guests


def random_mac() -> bytes:
    """A locally administered unicast address; guests' NICs have 52:54:..., this 52:55:..."""
    return bytes((0x52, 0x55)) + secrets.token_bytes(4)


class Gateway:
    """The services of a switch with a subnet (see :class:`popek.net.switch.Services`).
    ``attached(mac)`` tells whether a station is on the switch now."""

    def __init__(self, subnet: IPv4Network, nat: bool,
                 attached: Callable[[bytes], bool], mac: bytes | None = None) -> None:
        self.subnet = subnet
        self.mac = mac or random_mac()
        self.address = subnet.network_address + 1
        self.dns = subnet.network_address + 2 if nat else None
        self.addresses = frozenset(a for a in (self.address, self.dns) if a is not None)
        self.dhcp = DhcpServer(subnet, self.address, self.addresses, attached,
                               router=self.address if nat else None, dns=self.dns)
        self.nat = Nat(subnet, self.address, self.mac, self.dns, self.dhcp.address_of) \
            if nat else None
        self.arp_replies = 0
        self.refused = 0  # forged gateway ARP, rogue DHCP servers
        self.unrouted = 0  # frames for the gateway on a switch without NAT

    def intercept(self, port: Port, frame: bytes) -> bool:
        kind = ethertype(frame)
        if kind == ETHERTYPE_ARP:
            return self._arp(port, frame)
        if kind == ETHERTYPE_IPV4:
            ports = udp_ports(frame)
            if ports is not None and ports[1] == SERVER_PORT and \
                    frame[:6] in (self.mac, BROADCAST):
                self._dhcp(port, frame)
                return True
            if ports is not None and ports[0] == SERVER_PORT:
                self.refused += 1  # only the switch serves DHCP on its subnet
                return True
        if frame[:6] != self.mac:
            return False
        if self.nat is not None:
            self.nat.forward(port, frame)
        else:
            self.unrouted += 1
        return True

    def _arp(self, port: Port, frame: bytes) -> bool:
        arp = parse_arp(frame)
        if arp is None:
            return False
        if arp.sender_ip in self.addresses:
            self.refused += 1
            return True
        if arp.op == ARP_REQUEST and arp.target_ip in self.addresses:
            port.send(arp_reply(arp, self.mac), self)
            self.arp_replies += 1
            return True
        return frame[:6] == self.mac  # a reply to the gateway: it asked nothing

    def _dhcp(self, port: Port, frame: bytes) -> None:
        request = parse_udp(frame)
        if request is None:
            self.dhcp.ignored += 1
            return
        reply = self.dhcp.handle(frame[6:12], request.payload, port)
        if reply is not None:
            datagram = Udp(self.address, reply.dst_ip, SERVER_PORT, SERVER_PORT + 1,
                           reply.payload)
            port.send(udp_frame(reply.dst_mac, self.mac, datagram), self)

    def port_closed(self, port: Port) -> None:
        if self.nat is not None:
            self.nat.port_closed(port)

    async def close(self) -> None:
        if self.nat is not None:
            await self.nat.close()

    def info(self) -> dict[str, Any]:
        return {"subnet": str(self.subnet), "gateway": str(self.address),
                "gateway_mac": mac_text(self.mac),
                "dns": str(self.dns) if self.dns is not None else None,
                "nat": self.nat is not None, "leases": self.dhcp.info(),
                "uplinks": self.nat.info() if self.nat is not None else [],
                "gateway_counters": {
                    "arp_replies": self.arp_replies, "refused": self.refused,
                    "dhcp_ignored": self.dhcp.ignored,
                    "unrouted": self.unrouted + (self.nat.unrouted if self.nat else 0)}}


def check_subnet(text: str) -> IPv4Network:
    """``text`` as a switch's subnet; ValueError saying why it cannot be one."""
    try:
        subnet = IPv4Network(text)
    except ValueError as err:
        raise ValueError(f"subnet {text!r}: {err} (use a CIDR such as 192.168.122.0/24)") \
            from None
    if not MIN_PREFIX <= subnet.prefixlen <= MAX_PREFIX:
        raise ValueError(f"subnet {text}: use a prefix from /{MIN_PREFIX} to /{MAX_PREFIX}")
    return subnet

