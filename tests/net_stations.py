"""Stations for switch tests: the far ends of switch ports, sending and receiving raw
Ethernet frames in QEMU's stream framing, as a guest's worker does."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

from popek.net.switch import Switch

BROADCAST = b"\xff" * 6
PATIENCE = 0.3  # seconds to wait for frames that should arrive (or to be sure none do)


def mac(n: int) -> bytes:
    return bytes((0x52, 0x54, 0, 0, 0, n))


def frame(dst: bytes, src: bytes, payload: bytes = b"hello", kind: int = 0x88B5) -> bytes:
    """0x88B5: the IEEE's ethertype for local experiments."""
    return dst + src + struct.pack("!H", kind) + payload


class Station:
    """A peer plugged into a switch port: sends and receives framed frames."""

    def __init__(self, switch: Switch, address: bytes, **label: object) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.port = switch.attach(theirs, **label)
        self.mac = address
        self._in = bytearray()

    async def send_raw(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def send(self, *frames: bytes) -> None:
        await self.send_raw(b"".join(struct.pack(">I", len(f)) + f for f in frames))

    async def receive(self, patience: float = PATIENCE, expect: int | None = None) -> list[bytes]:
        """The frames that arrive until ``expect`` of them have, or ``patience`` seconds
        pass without one."""
        loop = asyncio.get_running_loop()
        frames: list[bytes] = []
        while True:
            while len(self._in) >= 4:
                size = struct.unpack_from(">I", self._in)[0]
                if len(self._in) < 4 + size:
                    break
                frames.append(bytes(self._in[4:4 + size]))
                del self._in[:4 + size]
            if expect is not None and len(frames) >= expect:
                return frames
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), patience)
            except TimeoutError:
                return frames
            if not data:
                return frames
            self._in += data


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())
