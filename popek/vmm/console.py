"""A guest console's recent history, and its live listeners on the VMM side.

Output is kept in a bounded ring (:class:`Scrollback`, the last :data:`SCROLLBACK`
bytes) twice: by the worker, which keeps it while no VMM is attached so that the next
VMM gets the history, and by the VMM, which hands it to every attached client through a
bounded queue. A client that does not keep up loses output (counted in ``dropped``)
instead of making the VMM buffer without limit, so a guest flooding its console costs
the VMM a copy per chunk and nothing more.
"""

from __future__ import annotations

import asyncio

SCROLLBACK = 256 << 10
QUEUE_CHUNKS = 256


class Scrollback:
    """The last :data:`SCROLLBACK` bytes of output, and how many there were in all."""

    def __init__(self, total: int = 0) -> None:
        self.data = bytearray()
        self.total = total  # bytes the guest printed since its VM was created

    def append(self, data: bytes) -> None:
        self.total += len(data)
        self.data += data
        if len(self.data) > SCROLLBACK:
            del self.data[:len(self.data) - SCROLLBACK]


class ConsoleBuffer(Scrollback):
    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0  # bytes some slow client did not get
        self.listeners: set[asyncio.Queue[bytes | None]] = set()

    def append(self, data: bytes) -> None:
        super().append(data)
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
