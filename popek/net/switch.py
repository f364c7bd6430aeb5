"""A learning Ethernet switch in the VMM's event loop; its ports are framed stream sockets.

Each port is one end of a connected stream socket that carries QEMU's stream framing (a
4-byte big-endian length, then the frame): the other end is a guest's NIC in its worker,
or a NAT uplink's passt. The switch learns which port each source MAC address sits
behind, sends a frame for a known unicast address out of that port alone and floods
broadcast, multicast and unknown destinations to every other port of the same switch
(never back out of the port it came in on). Switches share nothing, so guests on
different switches never see each other's frames.

Every port is untrusted, and no port can hurt the switch or the other ports:

- a runt (shorter than an Ethernet header) is dropped and counted; a length over
  :data:`MAX_FRAME` means the peer does not speak the framing (a healthy NIC never sends
  one), so the port is disconnected rather than resynchronized on guesswork;
- the switch takes at most :data:`FRAMES_PER_TURN` frames from a port per turn of the
  event loop, so a port that floods gets its turn like every other one and no more;
- frames wait for a slow or stuck peer (a paused guest) in a bounded queue per port, and
  each source may fill only :data:`SOURCE_QUEUE` bytes of it: frames beyond that are
  dropped and counted, so a flooding port loses its own frames, not its neighbours', and
  the switch never blocks on a peer;
- a port may teach the switch at most :data:`MACS_PER_PORT` addresses, so forged source
  addresses cannot push every other guest out of the table, and a frame from a group
  address or from the services' own (the gateway's) is dropped and counted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from popek.net.backend import MAX_FRAME, MIN_FRAME
from popek.net.packets import is_multicast, mac_text
from popek.net.stream import StreamBackend

FRAMES_PER_TURN = 64  # frames taken from one port per turn of the event loop
SOURCE_QUEUE = 256 << 10  # bytes one source may have waiting for one port
PORT_QUEUE = 1 << 20  # bytes waiting for one port in all
MAC_AGE = 300.0  # seconds a learned address stays without traffic (as Linux bridges)
MACS_PER_PORT = 64


@dataclass
class PortCounters:
    """Frames and bytes seen at a port, from the switch's side: ``in`` came from the peer,
    ``out`` went to it. ``dropped_in`` were malformed; ``dropped_out`` found the port's
    queue full (a peer that does not keep up) or the port gone."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    dropped_in: int = 0
    dropped_out: int = 0


class Port:
    """One framed stream socket in the event loop (its framing is
    :class:`~popek.net.stream.StreamBackend`'s): frames from the peer go to ``on_frame``;
    :meth:`send` queues frames to it. ``label`` is what the API shows about the port."""

    def __init__(self, sock: socket.socket, on_frame: Callable[[Port, bytes], None],
                 on_close: Callable[[Port], None] | None = None, **label: Any) -> None:
        self.stream = StreamBackend(sock)
        self.label = label
        self.counters = PortCounters()
        self.closed: str | None = None  # why the port is down
        self.macs: set[bytes] = set()  # addresses the switch learned behind this port
        self._on_frame = on_frame
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._queue: deque[tuple[object, bytes]] = deque()  # (source, frame)
        self._held: dict[object, int] = {}  # queued bytes by source
        self._held_total = 0
        self._flush_due = False
        self._waiting = False  # for the socket to turn writable
        self._loop.add_reader(self._fd, self._readable)

    # -- receiving ------------------------------------------------------------------------
    def _readable(self) -> None:
        stream, counters = self.stream, self.counters
        for _ in range(FRAMES_PER_TURN):
            dropped = stream.dropped
            frame = stream.receive()
            if stream.dropped != dropped:
                counters.dropped_in += 1
                self.close(f"sent a frame length over the {MAX_FRAME}-byte maximum")
                return
            if frame is None:
                break
            if len(frame) < MIN_FRAME:
                counters.dropped_in += 1
                continue
            counters.frames_in += 1
            counters.bytes_in += len(frame)
            self._on_frame(self, frame)
            if self.closed:
                return
        else:  # its turn is over; frames it already sent wait for the next one
            self._loop.call_soon(self._readable)
            return
        if stream.hung_up:
            self.close("the peer hung up")

    # -- sending --------------------------------------------------------------------------
    def send(self, frame: bytes, source: object) -> bool:
        """Queue ``frame`` for the peer; False (dropped, counted) if ``source`` already has
        its share of the queue waiting, or the port is down."""
        size = len(frame)
        held = self._held.get(source, 0)
        if self.closed or held + size > SOURCE_QUEUE or \
                self._held_total + size > PORT_QUEUE:
            self.counters.dropped_out += 1
            return False
        self._held[source] = held + size
        self._held_total += size
        self._queue.append((source, frame))
        if not self._flush_due and not self._waiting:
            self._flush_due = True  # once this turn's frames are all queued
            self._loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_due = False
        stream, queue = self.stream, self._queue
        stream.flush()
        while queue and stream.ready_to_send() and not self.closed:
            source, frame = queue.popleft()
            self._release(source, len(frame))
            stream.send(frame)
            if stream.hung_up:
                self.counters.dropped_out += 1
                self.close("the peer hung up")
                return
            self.counters.frames_out += 1
            self.counters.bytes_out += len(frame)
        if self.closed:
            return
        if not stream.ready_to_send() and not self._waiting:
            self._waiting = True
            self._loop.add_writer(self._fd, self._flush)
        elif stream.ready_to_send() and self._waiting:
            self._waiting = False
            self._loop.remove_writer(self._fd)

    def _release(self, source: object, size: int) -> None:
        left = self._held[source] - size
        if left:
            self._held[source] = left
        else:
            del self._held[source]
        self._held_total -= size

    # -- the end --------------------------------------------------------------------------
    def close(self, reason: str = "closed") -> None:
        """Stop reading and writing; what was queued is lost (and counted)."""
        if self.closed:
            return
        self.closed = reason
        self._loop.remove_reader(self._fd)
        if self._waiting:
            self._waiting = False
            self._loop.remove_writer(self._fd)
        self.counters.dropped_out += len(self._queue)
        self._queue.clear()
        self._held.clear()
        self._held_total = 0
        self.stream.close()
        if self._on_close is not None:
            self._on_close(self)

    def info(self) -> dict[str, Any]:
        return {**self.label, "state": "up" if not self.closed else f"down: {self.closed}",
                "learned": sorted(mac_text(m) for m in self.macs),
                "counters": asdict(self.counters)}


class Services(Protocol):
    """What a switch with addresses of its own (see :mod:`popek.net.gateway`) does with
    frames before they are switched: it answers for its addresses and keeps guests from
    forging them."""

    mac: bytes  # the services' station address: no port may send from it

    def intercept(self, port: Port, frame: bytes) -> bool:
        """True if the frame was for the services (consumed) or refused (dropped)."""

    def port_closed(self, port: Port) -> None: ...

    def info(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class Switch:
    """One virtual switch: ports, the table of learned addresses, optional services."""

    def __init__(self, name: str, services: Services | None = None) -> None:
        self.name = name
        self.services = services
        self.ports: list[Port] = []
        self.flooded = 0  # frames sent to every other port (broadcast or unknown)
        self._macs: dict[bytes, tuple[Port, float]] = {}

    def attach(self, sock: socket.socket, **label: Any) -> Port:
        """A new port on the switch's end of ``sock`` (call from the event loop)."""
        port = Port(sock, self._frame, self._port_closed, **label)
        self.ports.append(port)
        return port

    def detach(self, port: Port) -> None:
        port.close("detached")
        self.ports.remove(port)

    def _port_closed(self, port: Port) -> None:
        for mac in port.macs:
            self._macs.pop(mac, None)
        port.macs.clear()
        if self.services is not None:
            self.services.port_closed(port)

    def _frame(self, port: Port, frame: bytes) -> None:
        now = time.monotonic()
        src = frame[6:12]
        if is_multicast(src) or (self.services is not None and src == self.services.mac):
            # No station sends from a group address, and none but the services from theirs
            # (the switch would learn it behind the forger's port).
            port.counters.dropped_in += 1
            return
        self._learn(port, src, now)
        if self.services is not None and self.services.intercept(port, frame):
            return
        dst = frame[:6]
        if not is_multicast(dst):
            entry = self._macs.get(dst)
            if entry is not None and now - entry[1] <= MAC_AGE:
                if entry[0] is not port:
                    entry[0].send(frame, port)
                return  # a peer behind the same port already has it
        self.flooded += 1
        for other in self.ports:
            if other is not port and not other.closed:
                other.send(frame, port)

    def _learn(self, port: Port, mac: bytes, now: float) -> None:
        entry = self._macs.get(mac)
        if entry is not None and entry[0] is port:
            self._macs[mac] = (port, now)
            return
        if len(port.macs) >= MACS_PER_PORT:
            for stale in [m for m in port.macs if now - self._macs[m][1] > MAC_AGE]:
                port.macs.discard(stale)
                del self._macs[stale]
            if len(port.macs) >= MACS_PER_PORT:
                return
        if entry is not None:
            entry[0].macs.discard(mac)  # the station moved (a migrated guest announces it)
        self._macs[mac] = (port, now)
        port.macs.add(mac)

    def port_of(self, mac: bytes) -> Port | None:
        """The port ``mac`` was last seen behind, if it is still fresh."""
        entry = self._macs.get(mac)
        return entry[0] if entry is not None and \
            time.monotonic() - entry[1] <= MAC_AGE else None

    async def close(self) -> None:
        for port in list(self.ports):
            self.detach(port)
        if self.services is not None:
            await self.services.close()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "ports": [p.info() for p in self.ports],
                "flooded": self.flooded,
                **(self.services.info() if self.services is not None else {})}
