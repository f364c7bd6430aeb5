"""Fuzz target: the network backends' framing readers and writers (``popek.net.stream``:
QEMU's stream framing, on a connected socket and behind a listening one;
``popek.net.dgram``: one frame per datagram).

The peer on the other end of the socket is the attacker: it writes any bytes, in any
pieces (lengths beyond the maximum, frames cut anywhere, datagrams of any size), hangs
up, reconnects, and reads what the backend sends only when it pleases. The backend must
answer exactly what an independent reading of the same bytes gives (here:
:class:`_Reference`), frame for frame; drop and count each oversized frame; hold no more
than one frame plus one read; and deliver every frame it was asked to send, whole and
in order, to a peer that reads, holding back (never losing) what a full socket refuses.

The first byte picks the backend; the rest is a list of records: the peer writes (raw
bytes, or one frame of a given size), the backend receives, sends or flushes, the peer
reads, hangs up or (listening backend) connects anew.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from popek.net.backend import MAX_FRAME
from popek.net.dgram import RECEIVE_BATCH, DgramBackend
from popek.net.stream import LENGTH, RECV_CHUNK, StreamBackend, StreamListener
from tests.fuzz.harness import Target, read_records

KINDS = ("stream", "listen", "dgram")
# Records: a byte picks one, a struct gives its fields.
PEER_WRITE = struct.Struct("<BH")  # 1: raw bytes, else one frame; length; then the bytes
BIG_FRAME = struct.Struct("<I")  # one frame of this size (of zeros), framed or a datagram
RECEIVE = struct.Struct("<B")  # calls of receive()
SEND = struct.Struct("<I")  # the backend sends a frame of this size (modulo MAX_FRAME + 1)
PEER_READ = struct.Struct("<I")  # the peer reads up to this many bytes (0: all it can)
FLUSH = struct.Struct("")
HANG_UP = struct.Struct("")  # the peer closes; a listening backend's next peer connects
RECORDS = (PEER_WRITE, BIG_FRAME, RECEIVE, SEND, PEER_READ, FLUSH, HANG_UP)
MAX_PEERS = 8  # a listening backend's peers, one after another


class _Reference:
    """What the peer's bytes mean, read the plain way: the frames, and the oversized
    lengths (each a frame dropped, its bytes skipped)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.skip = 0
        self.frames: list[bytes] = []
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        self.data += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.data) - self.pos)
                self.pos += n
                self.skip -= n
                if self.skip:
                    return
            if len(self.data) - self.pos < 4:
                return
            size = int.from_bytes(self.data[self.pos:self.pos + 4], "big")
            if size > MAX_FRAME:
                self.dropped += 1
                self.skip = size
                self.pos += 4
                continue
            if len(self.data) - self.pos - 4 < size:
                return
            self.frames.append(bytes(self.data[self.pos + 4:self.pos + 4 + size]))
            self.pos += 4 + size
            del self.data[:self.pos]
            self.pos = 0


@dataclass
class _Connection:
    """One peer and what each side should see of it."""

    sock: socket.socket
    reference: _Reference = field(default_factory=_Reference)  # what it wrote, read plainly
    got: list[bytes] = field(default_factory=list)  # what the backend received from it
    sent: list[bytes] = field(default_factory=list)  # what the backend sent it
    received: list[bytes] = field(default_factory=list)  # the frames it read
    wire: bytearray = field(default_factory=bytearray)  # stream bytes it read, unframed


class _Wire:
    """One backend and its peers (a listening backend has one after another)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.listener: socket.socket | None = None
        self.connections: list[_Connection] = []
        self.accepted: list[object] = []  # the listening backend's peers, as it took them
        if kind == "listen":
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(f"\0popek-fuzz-net-{os.getpid()}")  # abstract: no file
            self.listener.listen(8)
            self.backend: Any = StreamListener(self.listener)
            self._connect()
        else:
            ours, peer = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_STREAM)
            self.backend = DgramBackend(ours) if kind == "dgram" else StreamBackend(ours)
            self._add(peer)

    def _add(self, peer: socket.socket) -> None:
        peer.setblocking(False)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
        self.connections.append(_Connection(peer))

    def _connect(self) -> None:
        if len(self.connections) < MAX_PEERS:
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(self.listener.getsockname())
            self._add(peer)

    def _track(self) -> None:
        """Note a peer the listening backend took (one per call at most): peers are taken
        in the order they connected."""
        peer = getattr(self.backend, "peer", None)
        if peer is not None and (not self.accepted or self.accepted[-1] is not peer):
            self.accepted.append(peer)

    def _backend_side(self) -> _Connection | None:
        """The connection the backend is on now (the listening one's latest peer)."""
        if self.kind != "listen":
            return self.connections[0]
        if not self.backend._connected():
            return None
        return self.connections[len(self.accepted) - 1]

    # -- the peer -------------------------------------------------------------------------
    def peer_write(self, data: bytes) -> None:
        conn = self.connections[-1]
        if conn.sock.fileno() < 0:
            return  # it hung up
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            return
        except OSError as err:  # a datagram too large for the socket
            assert self.kind == "dgram", err
            return
        if self.kind != "dgram":
            conn.reference.feed(data[:sent])
        elif len(data) <= MAX_FRAME:
            conn.reference.frames.append(data)
        else:
            conn.reference.dropped += 1

    def peer_frame(self, frame: bytes) -> None:
        self.peer_write(frame if self.kind == "dgram" else LENGTH.pack(len(frame)) + frame)

    def peer_read(self, limit: int) -> None:
        conn = self.connections[-1]
        while conn.sock.fileno() >= 0:
            try:
                # (a datagram is read whole: a shorter read would cut it)
                data = conn.sock.recv(limit if limit and self.kind != "dgram" else 1 << 22)
            except (BlockingIOError, ConnectionResetError):
                break
            if self.kind == "dgram":  # (an empty datagram is a frame, not an end)
                conn.received.append(data)
            elif not data:
                break
            else:
                conn.wire += data
            if limit:
                break
        _unframe(conn)
        assert conn.received == conn.sent[:len(conn.received)], \
            "the peer got other frames than were sent"

    def hang_up(self) -> None:
        """The peer goes; a listening backend gets a new one, as QEMU's listen= does."""
        if self.kind == "dgram":
            return  # datagram sockets have no peer to lose
        self.peer_read(0)
        self.connections[-1].sock.close()
        if self.kind == "listen":
            self._connect()

    # -- the backend ----------------------------------------------------------------------
    def receive(self, calls: int) -> None:
        for _ in range(calls):
            frame = self.backend.receive()
            self._track()
            if frame is None:
                return
            assert len(frame) <= MAX_FRAME, len(frame)
            conn = self._backend_side()
            conn.got.append(frame)
            expected = conn.reference.frames
            assert conn.got == expected[:len(conn.got)], "frames differ from the peer's bytes"
            held = (self.backend.peer if self.kind == "listen" else self.backend)._in \
                if self.kind != "dgram" else b""
            assert len(held) <= MAX_FRAME + LENGTH.size + RECV_CHUNK, len(held)

    def send(self, size: int) -> None:
        if not self.backend.ready_to_send():
            return  # the caller waits for writability, as virtio-net does
        conn = self._backend_side()
        frame = bytes([len(conn.sent) & 0xFF if conn else 0]) * size
        self.backend.send(frame)
        if conn is not None:
            conn.sent.append(frame)

    def close(self) -> None:
        self.backend.close()
        for conn in self.connections:
            conn.sock.close()


def _unframe(conn: _Connection) -> None:
    while len(conn.wire) >= LENGTH.size:
        size = LENGTH.unpack_from(conn.wire)[0]
        if len(conn.wire) < LENGTH.size + size:
            return
        conn.received.append(bytes(conn.wire[LENGTH.size:LENGTH.size + size]))
        del conn.wire[:LENGTH.size + size]


def one(data: bytes) -> None:
    if not data:
        return
    wire = _Wire(KINDS[data[0] % len(KINDS)])
    try:
        for record, fields, chunk in read_records(data[1:], RECORDS, (PEER_WRITE,)):
            if record is PEER_WRITE:
                if fields[0] & 1:
                    wire.peer_write(chunk)
                else:
                    wire.peer_frame(chunk)
            elif record is BIG_FRAME:
                wire.peer_frame(bytes(fields[0] % (4 * MAX_FRAME)))
            elif record is RECEIVE:
                wire.receive(fields[0] % (RECEIVE_BATCH + 1))
            elif record is SEND:
                wire.send(fields[0] % (MAX_FRAME + 1))
            elif record is PEER_READ:
                wire.peer_read(fields[0])
            elif record is FLUSH:
                wire.backend.flush()
            else:
                wire.hang_up()
        wire.receive(RECEIVE_BATCH)
        wire.peer_read(0)
    finally:
        wire.close()


# -- seeds ------------------------------------------------------------------------------
def _rec(record: struct.Struct, *fields: int, tail: bytes = b"") -> bytes:
    return bytes([RECORDS.index(record)]) + record.pack(*fields) + tail


def seeds() -> dict[str, bytes]:
    frame = bytes(range(60))
    both_ways = (_rec(PEER_WRITE, 0, len(frame), tail=frame) + _rec(RECEIVE, 4)
                 + _rec(SEND, 1500) + _rec(PEER_READ, 0))
    cut = LENGTH.pack(len(frame)) + frame
    return {
        **{f"{kind}-both-ways": bytes([i]) + both_ways for i, kind in enumerate(KINDS)},
        "stream-cut-frames": bytes([0]) + _rec(PEER_WRITE, 1, 10, tail=cut[:10])
        + _rec(RECEIVE, 2) + _rec(PEER_WRITE, 1, len(cut) - 10, tail=cut[10:])
        + _rec(RECEIVE, 2),
        "stream-oversized": bytes([0]) + _rec(BIG_FRAME, MAX_FRAME + 1) + _rec(RECEIVE, 8)
        + _rec(PEER_WRITE, 0, len(frame), tail=frame) + _rec(RECEIVE, 8),
        "stream-full-socket": bytes([0]) + _rec(SEND, MAX_FRAME) * 8 + _rec(FLUSH)
        + _rec(PEER_READ, 0) + _rec(FLUSH) + _rec(PEER_READ, 0),
        "listen-new-peer": bytes([1]) + both_ways + _rec(HANG_UP) + both_ways,
        "dgram-oversized": bytes([2]) + _rec(BIG_FRAME, MAX_FRAME + 1) + _rec(RECEIVE, 2),
    }


TARGET = Target(one=one, ci_runs=1_500, max_len=2048, seeds=seeds)
