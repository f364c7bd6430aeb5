"""The virtual switch with raw framed Ethernet frames: learning, flooding, isolation between
switches, and hostile ports (malformed framing, forged addresses, floods, a stuck peer).

Each station is the far end of a socket pair whose near end is a switch port, speaking
QEMU's stream framing, as a guest's worker does.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from net_stations import BROADCAST, Station, frame, mac, run

from popek.net import switch as switch_module
from popek.net.switch import MACS_PER_PORT, MAX_FRAME, SOURCE_QUEUE, Switch


def test_unknown_destinations_flood_and_learned_ones_go_to_one_port() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        a, b, c = (Station(sw, mac(n)) for n in (1, 2, 3))
        await a.send(frame(b.mac, a.mac, b"first"))  # b is unknown yet: flooded
        assert await b.receive(expect=1) == [frame(b.mac, a.mac, b"first")]
        assert await c.receive(expect=1) == [frame(b.mac, a.mac, b"first")]
        assert await a.receive(0.05) == []  # never back out of its own port
        await b.send(frame(a.mac, b.mac, b"reply"))  # a was learned: only a
        assert await a.receive(expect=1) == [frame(a.mac, b.mac, b"reply")]
        assert await c.receive(0.05) == []
        await a.send(frame(b.mac, a.mac, b"again"))  # b was learned from its reply
        assert await b.receive(expect=1) == [frame(b.mac, a.mac, b"again")]
        assert await c.receive(0.05) == []
        assert a.port.counters.frames_in == 2 and b.port.counters.frames_out == 2
        assert sw.flooded == 1
        await sw.close()

    run(scenario)


def test_switches_are_isolated_from_each_other() -> None:
    async def scenario() -> None:
        red, blue = Switch("red"), Switch("blue")
        a, b = Station(red, mac(1)), Station(red, mac(2))
        other = Station(blue, mac(3))
        await a.send(frame(BROADCAST, a.mac), frame(other.mac, a.mac))
        assert len(await b.receive(expect=2)) == 2
        assert await other.receive() == []
        await other.send(frame(BROADCAST, other.mac), frame(a.mac, other.mac))
        assert await a.receive() == [] and await b.receive(0.05) == []
        await red.close()
        await blue.close()

    run(scenario)


def test_learned_addresses_age_out_and_leave_with_their_port(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(switch_module, "MAC_AGE", 1.0)

    async def scenario() -> None:
        sw = Switch("lan")
        a, b, c = (Station(sw, mac(n)) for n in (1, 2, 3))
        await b.send(frame(BROADCAST, b.mac))
        assert len(await c.receive(expect=1)) == 1
        assert sw.port_of(b.mac) is b.port
        await asyncio.sleep(1.0)
        assert sw.port_of(b.mac) is None  # aged: frames for it flood again
        await a.send(frame(b.mac, a.mac))
        assert len(await c.receive()) == 1 and len(await b.receive(0.05)) == 1
        await c.send(frame(BROADCAST, c.mac))
        await asyncio.sleep(0.05)
        c.sock.close()  # the peer goes away: its address with it
        await asyncio.sleep(0.05)
        assert c.port.closed == "the peer hung up" and sw.port_of(c.mac) is None
        await sw.close()

    run(scenario)


def test_runts_and_group_source_addresses_are_dropped_and_counted() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        await a.send(b"\x01\x02\x03", b"", frame(BROADCAST, BROADCAST),
                     frame(b.mac, a.mac, b"fine"))
        assert await b.receive(expect=1) == [frame(b.mac, a.mac, b"fine")]
        assert a.port.counters.dropped_in == 3 and a.port.closed is None
        await sw.close()

    run(scenario)


def test_a_frame_split_across_many_writes_arrives_whole() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        a, b = Station(sw, mac(1)), Station(sw, mac(2))
        big = frame(b.mac, a.mac, bytes(range(256)) * 200)
        data = struct.pack(">I", len(big)) + big
        for i in range(0, len(data), 997):
            await a.send_raw(data[i:i + 997])
            await asyncio.sleep(0)
        assert await b.receive(expect=1) == [big]
        await sw.close()

    run(scenario)


def test_a_length_over_the_maximum_disconnects_only_that_port() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        hostile, a, b = (Station(sw, mac(n)) for n in (1, 2, 3))
        await hostile.send(frame(BROADCAST, hostile.mac, b"last good one"))
        await hostile.send_raw(struct.pack(">I", MAX_FRAME + 1) + bytes(64))
        assert len(await a.receive()) == 1  # what came before the bad length still counts
        assert len(await b.receive(0.05)) == 1
        assert "over the" in hostile.port.closed
        assert await hostile.receive() == []
        assert hostile.sock.recv(1) == b""  # the switch hung up on it
        await a.send(frame(b.mac, a.mac, b"still switching"))
        assert await b.receive(expect=1) == [frame(b.mac, a.mac, b"still switching")]
        assert sw.port_of(hostile.mac) is None
        await sw.close()

    run(scenario)


def test_a_stuck_port_loses_its_own_frames_and_blocks_nobody() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        a, b, stuck = (Station(sw, mac(n)) for n in (1, 2, 3))
        await stuck.send(frame(BROADCAST, stuck.mac))  # learned, then it never reads
        payload = bytes(1400)
        for _ in range(40):  # 4 MiB for the stuck peer: far beyond its queue and socket
            await a.send(*(frame(stuck.mac, a.mac, payload) for _ in range(75)))
            await asyncio.sleep(0)
        await a.send(frame(b.mac, a.mac, b"for b"))
        got = await b.receive()
        assert got[-1] == frame(b.mac, a.mac, b"for b")
        assert stuck.port.counters.dropped_out > 1000
        assert stuck.port.closed is None
        await sw.close()

    run(scenario)


def test_a_flooding_port_cannot_crowd_out_its_neighbours_at_a_slow_peer() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        flood, polite, slow = (Station(sw, mac(n)) for n in (1, 2, 3))
        await slow.send(frame(BROADCAST, slow.mac))
        await asyncio.sleep(0.05)
        junk = frame(slow.mac, flood.mac, bytes(1400))
        for _ in range(20):  # 2 MiB while the slow peer reads nothing
            await flood.send(*([junk] * 75))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        wanted = [frame(slow.mac, polite.mac, b"%d" % i) for i in range(20)]
        await polite.send(*wanted)
        got = await slow.receive()
        assert [f for f in got if f[6:12] == polite.mac] == wanted
        flooded = sum(1 for f in got if f == junk)
        assert slow.port.counters.dropped_out == 20 * 75 - flooded
        assert flooded * len(junk) <= SOURCE_QUEUE + (1 << 20)  # its share and a socket
        await sw.close()

    run(scenario)


def test_forged_source_addresses_cannot_push_others_out_of_the_table() -> None:
    async def scenario() -> None:
        sw = Switch("lan")
        forger, a, b = (Station(sw, mac(n)) for n in (1, 2, 3))
        await b.send(frame(BROADCAST, b.mac))
        await forger.send(*(frame(BROADCAST, bytes((2, 0, 0, 0, i >> 8, i & 255)))
                            for i in range(1000)))
        assert len(await b.receive(expect=1000)) == 1000
        assert len(forger.port.macs) == MACS_PER_PORT
        await a.receive()
        await a.send(frame(b.mac, a.mac, b"unicast"))
        assert await b.receive(expect=1) == [frame(b.mac, a.mac, b"unicast")]
        assert await forger.receive(0.05) == [frame(BROADCAST, b.mac)]
        await sw.close()

    run(scenario)
