"""``popek vm console`` in a script: send what stdin holds, show what the guest answers,
and exit once its output has settled, as ``expect``-less shell scripts need::

    echo 'uname -a' | popek vm console web --wait 2

Output printed before the input is sent is not shown (``popek vm logs`` has the history);
the command ends when nothing more has come for ``wait`` seconds, or when the guest stops.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO

from aiohttp import WSMsgType

from popek.api.client import Client


async def send_and_settle(client: Client, vm: str, data: bytes, wait: float,
                          out: BinaryIO) -> None:
    """Type ``data`` on ``vm``'s console, copy its output to ``out`` until it has been
    quiet for ``wait`` seconds (or the console closes)."""
    async with client.console(vm, replay=False) as ws:
        if data:
            await ws.send_bytes(data)
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), wait)
            except TimeoutError:
                return
            if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return  # closed: the guest stopped, or the VMM did
            out.write(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
            out.flush()
