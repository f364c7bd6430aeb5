"""The few packet formats a switch's own services read and write: Ethernet, ARP, IPv4, UDP.

The switch forwards frames without looking past the Ethernet header; only its gateway
(ARP replies for its addresses, the DHCP server, the NAT uplink's choice of frames) reads
further. Every parser takes untrusted bytes and answers None for anything malformed or
not of its kind, never raising: a guest decides what these functions see.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from popek.net.backend import ETH_HEADER

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
BROADCAST = b"\xff" * 6
IPPROTO_UDP = 17
ARP_REQUEST = 1
ARP_REPLY = 2

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # Ethernet/IPv4 ARP only
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def is_multicast(mac: bytes) -> bool:
    """Broadcast included: the group bit of the first byte."""
    return bool(mac[0] & 1)


def ethertype(frame: bytes) -> int:
    return (frame[12] << 8) | frame[13]


def ethernet(dst: bytes, src: bytes, kind: int, payload: bytes) -> bytes:
    return _ETH.pack(dst, src, kind) + payload


@dataclass(frozen=True)
class Arp:
    """An Ethernet/IPv4 ARP message."""

    op: int
    sender_mac: bytes
    sender_ip: ipaddress.IPv4Address
    target_mac: bytes
    target_ip: ipaddress.IPv4Address


def parse_arp(frame: bytes) -> Arp | None:
    if len(frame) < ETH_HEADER + _ARP.size or ethertype(frame) != ETHERTYPE_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_HEADER)
    if (htype, ptype, hlen, plen) != (1, ETHERTYPE_IPV4, 6, 4):
        return None
    return Arp(op, sha, ipaddress.IPv4Address(spa), tha, ipaddress.IPv4Address(tpa))


def arp_reply(request: Arp, mac: bytes) -> bytes:
    """``mac`` answers that it has the address ``request`` asked for."""
    body = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, ARP_REPLY, mac, request.target_ip.packed,
                     request.sender_mac, request.sender_ip.packed)
    return ethernet(request.sender_mac, mac, ETHERTYPE_ARP, body)


@dataclass(frozen=True)
class Udp:
    """A UDP datagram in an unfragmented IPv4 packet."""

    src_ip: ipaddress.IPv4Address
    dst_ip: ipaddress.IPv4Address
    src_port: int
    dst_port: int
    payload: bytes


def udp_ports(frame: bytes) -> tuple[int, int] | None:
    """(source, destination) port of an IPv4 UDP frame, reading no more than that needs
    (the switch asks this of every IPv4 frame it guards)."""
    if len(frame) < ETH_HEADER + _IPV4.size or ethertype(frame) != ETHERTYPE_IPV4:
        return None
    ihl = (frame[ETH_HEADER] & 0x0F) * 4
    start = ETH_HEADER + ihl
    if frame[ETH_HEADER + 9] != IPPROTO_UDP or ihl < _IPV4.size or \
            len(frame) < start + _UDP.size or _fragment(frame):
        return None
    return (frame[start] << 8) | frame[start + 1], (frame[start + 2] << 8) | frame[start + 3]


def _fragment(frame: bytes) -> bool:
    """A fragment (more-fragments set or an offset): only a whole datagram is read."""
    flags = (frame[ETH_HEADER + 6] << 8) | frame[ETH_HEADER + 7]
    return bool(flags & 0x3FFF)


def parse_udp(frame: bytes) -> Udp | None:
    if udp_ports(frame) is None:
        return None
    version_ihl, _, total, _, _, _, _, _, src, dst = _IPV4.unpack_from(frame, ETH_HEADER)
    ihl = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or total < ihl + _UDP.size or ETH_HEADER + total > len(frame):
        return None
    sport, dport, length, _ = _UDP.unpack_from(frame, ETH_HEADER + ihl)
    if length < _UDP.size or ihl + length > total:
        return None
    start = ETH_HEADER + ihl + _UDP.size
    return Udp(ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst), sport, dport,
               bytes(frame[start:start + length - _UDP.size]))


def udp_frame(dst_mac: bytes, src_mac: bytes, datagram: Udp, ttl: int = 64) -> bytes:
    """An Ethernet frame carrying ``datagram`` (checksums computed)."""
    length = _UDP.size + len(datagram.payload)
    src, dst = datagram.src_ip.packed, datagram.dst_ip.packed
    pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    udp = _UDP.pack(datagram.src_port, datagram.dst_port, length, 0) + datagram.payload
    checksum = internet_checksum(pseudo + udp) or 0xFFFF  # 0 would mean "none"
    udp = udp[:6] + struct.pack("!H", checksum) + udp[8:]
    header = _IPV4.pack(0x45, 0, _IPV4.size + length, 0, 0, ttl, IPPROTO_UDP, 0, src, dst)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, header + udp)


def internet_checksum(data: bytes) -> int:
    """RFC 1071: the ones' complement of the ones' complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
