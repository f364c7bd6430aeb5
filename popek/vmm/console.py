"""A guest console on the VMM side: scrollback plus live listeners.

Output is kept in a bounded ring (the last :data:`SCROLLBACK` bytes) and handed to
every attached client through a bounded queue. A client that does not keep up loses
output (counted in ``dropped``) instead of making the VMM buffer without limit, so a
guest flooding its console costs the VMM a copy per chunk and nothing more.
"""

from __future__ import annotations

import asyncio

SCROLLBACK = 256 << 10
QUEUE_CHUNKS = 256


class ConsoleBuffer:
    def __init__(self) -> None:
        self.scrollback = bytearray()
        self.total = 0  # bytes the guest printed since this VM was created
        self.dropped = 0  # bytes some slow client did not get
        self.listeners: set[asyncio.Queue[bytes | None]] = set()

    def append(self, data: bytes) -> None:
        self.total += len(data)
        self.scrollback += data
        if len(self.scrollback) > SCROLLBACK:
            del self.scrollback[:len(self.scrollback) - SCROLLBACK]
        for queue in self.listeners:
            if queue.qsize() < QUEUE_CHUNKS:
                queue.put_nowait(data)
            else:
                self.dropped += len(data)

    def attach(self) -> asyncio.Queue[bytes | None]:
        """A queue of output chunks from now on; None in it means the guest is gone."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.listeners.add(queue)
        return queue

    def detach(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.listeners.discard(queue)

    def close(self) -> None:
        for queue in self.listeners:
            queue.put_nowait(None)
