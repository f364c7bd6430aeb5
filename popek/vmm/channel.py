"""Frames between the VMM and a worker process over one Unix stream socket.

A frame is a 4-byte little-endian length, a 1-byte tag and the payload: ``J`` a JSON
object (commands, replies, events), ``O`` guest console output, ``I`` console input.
Console bytes travel raw, so a guest flooding its console costs a memcpy, not an
encoding. The VMM refuses frames over :data:`MAX_FRAME`, so a misbehaving worker
cannot make it allocate without bound.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

JSON = b"J"
OUTPUT = b"O"
INPUT = b"I"
MAX_FRAME = 4 << 20
_LEN = struct.Struct("<I")

Message = tuple[bytes, Any]  # (tag, decoded JSON object or raw bytes)


class ChannelClosed(Exception):
    """The other end went away (worker died, or the VMM closed the channel)."""


class ProtocolError(Exception):
    """The other end sent something that is not a frame of this protocol."""


def encode(tag: bytes, payload: Any) -> bytes:
    data = json.dumps(payload, separators=(",", ":")).encode() if tag == JSON else bytes(payload)
    return _LEN.pack(len(data) + 1) + tag + data


def _decode(tag: bytes, data: bytes) -> Message:
    if tag == JSON:
        try:
            obj = json.loads(data)
        except ValueError:
            raise ProtocolError("a JSON frame that is not JSON") from None
        if not isinstance(obj, dict):
            raise ProtocolError("a JSON frame that is not an object")
        return tag, obj
    if tag in (OUTPUT, INPUT):
        return tag, data
    raise ProtocolError(f"unknown frame tag {tag!r}")


class WorkerEnd:
    """The worker's side: blocking sends, and reads when the machine runner finds the
    socket readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._buf = bytearray()

    def send(self, tag: bytes, payload: Any) -> None:
        """Blocks while the VMM is behind: a flooding guest slows only itself."""
        try:
            self.sock.sendall(encode(tag, payload))
        except OSError:
            raise ChannelClosed from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[Message]:
        """Every complete frame, after one read of the (readable) socket."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            raise ChannelClosed
        self._buf += data
        messages = []
        while len(self._buf) >= 4:
            size = _LEN.unpack_from(self._buf)[0]
            if len(self._buf) < 4 + size:
                break
            tag, data = bytes(self._buf[4:5]), bytes(self._buf[5:4 + size])
            del self._buf[:4 + size]
            messages.append(_decode(tag, data))
        return messages


class VmmEnd:
    """The VMM's side, on asyncio streams: reading never blocks the event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> VmmEnd:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME + 5)
        return cls(reader, writer)

    async def receive(self) -> Message:
        try:
            size = _LEN.unpack(await self.reader.readexactly(4))[0]
            if not 1 <= size <= MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes")
            frame = await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ChannelClosed from None
        return _decode(frame[:1], frame[1:])

    def send(self, tag: bytes, payload: Any) -> bool:
        """Queue a frame; False (dropped) if the worker is gone or has not read the last
        :data:`MAX_FRAME` bytes, so a stopped worker cannot make the VMM buffer forever."""
        if self.writer.is_closing() or \
                self.writer.transport.get_write_buffer_size() > MAX_FRAME:
            return False
        self.writer.write(encode(tag, payload))
        return True

    def close(self) -> None:
        self.writer.close()
