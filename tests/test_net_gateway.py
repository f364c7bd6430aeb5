"""A switch's own services with raw frames: DHCP, ARP for the gateway, guards against
guests that impersonate it, and the NAT uplink through passt.

Requests are built and replies decoded with scapy, a packet library no one here wrote,
so the switch's DHCP, ARP, IPv4 and UDP encoders are checked against an independent one
(checksums included).
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Network

from net_guests import running
from net_stations import Station, frame, mac, run
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from popek.net.dhcp import LEASES_PER_PORT
from popek.net.gateway import Gateway
from popek.net.packets import BROADCAST, mac_text
from popek.net.switch import Switch

SUBNET = "192.168.50.0/24"


def lan(nat: bool = False, subnet: str = SUBNET) -> Switch:
    switch = Switch("lan")
    switch.services = Gateway(IPv4Network(subnet), nat, switch.port_of)
    return switch


def dhcp_request(station: Station, kind: str, xid: int = 7, chaddr: bytes | None = None,
                 src: bytes | None = None, **options: object) -> bytes:
    return bytes(Ether(src=mac_text(src or station.mac), dst="ff:ff:ff:ff:ff:ff")
                 / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
                 / BOOTP(chaddr=chaddr or station.mac, xid=xid)
                 / DHCP(options=[("message-type", kind), *options.items(), "end"]))


def decoded(raw: bytes) -> Ether:
    """The frame as scapy reads it, after checking its IPv4 and UDP checksums."""
    packet = Ether(raw)
    if IP in packet:
        copy = packet.copy()
        del copy[IP].chksum
        if UDP in copy:
            del copy[UDP].chksum
        rebuilt = Ether(bytes(copy))
        assert rebuilt[IP].chksum == packet[IP].chksum
        if UDP in packet and packet[UDP].chksum:  # 0: the sender computed none (passt)
            assert rebuilt[UDP].chksum == packet[UDP].chksum
    return packet


def options(packet: Ether) -> dict[str, object]:
    return {opt[0]: opt[1] for opt in packet[DHCP].options if isinstance(opt, tuple)}


async def lease(station: Station, xid: int = 7) -> str:
    """DISCOVER, OFFER, REQUEST, ACK: the address the switch gave ``station``."""
    await station.send(dhcp_request(station, "discover", xid))
    (offer,) = [decoded(f) for f in await station.receive(expect=1)]
    address = offer[BOOTP].yiaddr
    await station.send(dhcp_request(station, "request", xid, requested_addr=address,
                                    server_id="192.168.50.1", hostname=b"guest"))
    (ack,) = [decoded(f) for f in await station.receive(expect=1)]
    assert options(ack)["message-type"] == 5 and ack[BOOTP].yiaddr == address
    return address


def test_dhcp_gives_each_guest_its_own_address_and_keeps_it() -> None:
    async def scenario() -> None:
        sw = lan(nat=True)
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        await a.send(dhcp_request(a, "discover", 0x1234))
        (offer,) = [decoded(f) for f in await a.receive(expect=1)]
        assert await b.receive(0.05) == []  # the answer goes to the asking port only
        opts = options(offer)
        assert opts["message-type"] == 2 and offer[BOOTP].xid == 0x1234
        assert offer[Ether].dst == mac_text(a.mac) and offer[IP].src == "192.168.50.1"
        assert offer[BOOTP].yiaddr == "192.168.50.3"  # .1 gateway, .2 DNS
        assert opts["server_id"] == "192.168.50.1" and opts["router"] == "192.168.50.1"
        assert opts["name_server"] == "192.168.50.2"
        assert opts["subnet_mask"] == "255.255.255.0" and opts["lease_time"] > 0
        assert opts["interface-mtu"] == 65520
        assert await lease(a) == "192.168.50.3"
        assert await lease(b, xid=9) == "192.168.50.4"
        assert await lease(a, xid=11) == "192.168.50.3"  # the same one again
        info = sw.info()
        assert [(x["mac"], x["address"], x["state"], x["hostname"]) for x in info["leases"]] \
            == [(mac_text(a.mac), "192.168.50.3", "bound", "guest"),
                (mac_text(b.mac), "192.168.50.4", "bound", "guest")]
        await sw.close()

    run(scenario)


def test_a_plain_dhcp_switch_names_no_router_and_naks_foreign_addresses() -> None:
    async def scenario() -> None:
        sw = lan(nat=False)
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        assert await lease(a) == "192.168.50.2"  # no DNS address is kept without NAT
        await b.send(dhcp_request(b, "request", requested_addr="192.168.50.2"))
        (nak,) = [decoded(f) for f in await b.receive(expect=1)]
        assert options(nak)["message-type"] == 6 and nak[Ether].dst == "ff:ff:ff:ff:ff:ff"
        await b.send(dhcp_request(b, "request", requested_addr="10.1.2.3"))
        assert options(decoded((await b.receive(expect=1))[0]))["message-type"] == 6
        await b.send(dhcp_request(b, "discover"))
        opts = options(decoded((await b.receive(expect=1))[0]))
        assert "router" not in opts and "name_server" not in opts
        await sw.close()

    run(scenario)


def test_forged_and_malformed_dhcp_requests_are_ignored() -> None:
    async def scenario() -> None:
        sw = lan()
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        await a.send(dhcp_request(a, "discover", chaddr=mac(9)))  # not its own address
        good = dhcp_request(a, "discover")
        await a.send(good[:14 + 20 + 8 + 100], good[:-20] + b"\x35\x05\x01", good[:-4])
        assert await a.receive() == [] and await b.receive(0.05) == []
        assert sw.services.dhcp.ignored >= 3
        assert await lease(a) == "192.168.50.2"  # and it still serves
        await sw.close()

    run(scenario)


def test_one_port_cannot_drain_the_pool() -> None:
    async def scenario() -> None:
        sw = lan(subnet="192.168.50.0/28")
        forger, honest = Station(sw, mac(1)), Station(sw, mac(2))
        forged = [bytes((2, 0, 0, 0, 0, n)) for n in range(12)]
        await forger.send(*(dhcp_request(forger, "discover", src=m, chaddr=m) for m in forged))
        offers = await forger.receive()
        assert len(offers) == LEASES_PER_PORT
        assert await lease(honest) not in {decoded(f)[BOOTP].yiaddr for f in offers}
        await sw.close()

    run(scenario)


def test_the_gateway_answers_arp_for_its_address_and_nobody_may_claim_it() -> None:
    async def scenario() -> None:
        sw = lan(nat=True)
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        gateway_mac = sw.info()["gateway_mac"]

        def who_has(target: str, sender: Station, claim: str = "192.168.50.3") -> bytes:
            return bytes(Ether(src=mac_text(sender.mac), dst="ff:ff:ff:ff:ff:ff")
                         / ARP(op=1, hwsrc=mac_text(sender.mac), psrc=claim, pdst=target))

        for target in ("192.168.50.1", "192.168.50.2"):
            await a.send(who_has(target, a))
            (reply,) = [Ether(f) for f in await a.receive(expect=1)]
            assert reply[ARP].op == 2 and reply[ARP].hwsrc == gateway_mac
            assert reply[ARP].psrc == target and reply[Ether].dst == mac_text(a.mac)
        assert await b.receive(0.05) == []
        await a.send(who_has("192.168.50.4", a))  # a neighbour's address: its business
        assert len(await b.receive()) == 1 and await a.receive(0.05) == []
        await b.send(who_has("192.168.50.3", b, claim="192.168.50.1"),  # forged
                     bytes(Ether(src=mac_text(b.mac), dst="ff:ff:ff:ff:ff:ff")
                           / IP(src="192.168.50.4", dst="255.255.255.255")
                           / UDP(sport=67, dport=68) / BOOTP(op=2)
                           / DHCP(options=[("message-type", "offer"), "end"])))
        assert await a.receive() == []
        assert sw.info()["gateway_counters"]["refused"] == 2
        await sw.close()

    run(scenario)


def test_no_guest_may_send_from_the_gateways_mac() -> None:
    """Found by the switch fuzz target: such frames reached the other guests, and the
    switch learned the gateway's MAC behind the forger's port."""
    async def scenario() -> None:
        sw = lan()
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        gateway_mac = bytes.fromhex(sw.info()["gateway_mac"].replace(":", ""))
        await b.send(frame(mac(2), mac(2)))  # b is known behind its port
        await a.send(frame(mac(2), gateway_mac), frame(BROADCAST, gateway_mac))
        assert await b.receive(0.1) == []
        assert sw.port_of(gateway_mac) is None and a.port.counters.dropped_in == 2
        await sw.close()

    run(scenario)



def test_nat_takes_each_guest_to_the_host_through_a_passt_of_its_own() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        host.bind(("127.0.0.1", 0))
        host.setblocking(False)
        port = host.getsockname()[1]
        sw = lan(nat=True)
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        addresses = {a: await lease(a), b: await lease(b, xid=8)}
        gateway_mac = sw.info()["gateway_mac"]

        def datagram(station: Station, payload: bytes) -> bytes:
            return bytes(Ether(src=mac_text(station.mac), dst=gateway_mac)
                         / IP(src=addresses[station], dst="192.168.50.1")
                         / UDP(sport=40000, dport=port) / payload)

        for station in (a, b):
            await station.send(datagram(station, b"from " + mac_text(station.mac).encode()))
            data, sender = await asyncio.wait_for(loop.sock_recvfrom(host, 100), 10)
            assert data == b"from " + mac_text(station.mac).encode()
            await loop.sock_sendto(host, b"back to " + data[5:], sender)
            (reply,) = [decoded(f) for f in await station.receive(1.0)]
            assert reply[Ether].src == gateway_mac and reply[IP].src == "192.168.50.1"
            assert reply[IP].dst == addresses[station] and reply[UDP].dport == 40000
            assert bytes(reply[UDP].payload) == b"back to " + data[5:]
        assert await a.receive(0.05) == [] and await b.receive(0.05) == []
        uplinks = {u["mac"]: u for u in sw.info()["uplinks"]}
        assert set(uplinks) == {mac_text(a.mac), mac_text(b.mac)}
        pids = {u["pid"] for u in uplinks.values()}
        assert len(pids) == 2 and all(running(pid) for pid in pids)

        a.sock.close()  # a's guest goes away: so does its passt
        await asyncio.sleep(0.5)
        assert not running(uplinks[mac_text(a.mac)]["pid"])
        assert [u["mac"] for u in sw.info()["uplinks"]] == [mac_text(b.mac)]
        await sw.close()
        assert not any(running(pid) for pid in pids)
        host.close()

    run(scenario)
