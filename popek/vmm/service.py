"""``popek serve``: the VMM behind its REST API, on a Unix socket (and loopback TCP).

The socket is created owner-only: the API can read and write host files as the VMM's
user (images, disks, snapshots), so the socket's permissions are its access control.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from popek.api.server import make_app
from popek.vmm.manager import Vmm


async def serve(socket_path: Path, tcp: tuple[str, int] | None) -> int:
    """Serve until SIGINT or SIGTERM; then every guest is killed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Vmm() as vmm:
        runner = web.AppRunner(make_app(vmm), handle_signals=False)
        await runner.setup()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        old_mask = os.umask(0o077)  # the socket is the only access control: owner only
        try:
            await web.UnixSite(runner, str(socket_path)).start()
        finally:
            os.umask(old_mask)
        where = f"unix:{socket_path}"
        if tcp is not None:
            await web.TCPSite(runner, *tcp).start()
            where += f" and http://{tcp[0]}:{tcp[1]}"
        print(f"popek VMM listening on {where}", file=sys.stderr, flush=True)
        await stop.wait()
        print("popek VMM stopping: killing every guest", file=sys.stderr, flush=True)
        await vmm.close()  # first, so that attached consoles end
        await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    return 0
