"""``popek serve``: the VMM behind its REST API, on a Unix socket (and TCP, with a token).

The socket is created owner-only: the API can read and write host files as the VMM's
user (images, disks, snapshots), so the socket's permissions are its access control.
TCP has none of its own: there the API token and the path policy stand in
(:mod:`popek.api.access`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from aiohttp import web

from popek import images
from popek.api import token
from popek.api.access import Access
from popek.api.endpoint import default_token_file
from popek.api.server import make_app
from popek.vmm import statedir
from popek.vmm.manager import Vmm
from popek.vmm.paths import PathPolicy


def prepare_access(state_dir: Path, *, tcp: bool, token_file: Path | None, allow: list[Path],
           restrict_unix: bool) -> Access:
    """Who may call and what they may name, settled before the VMM listens: prepares the
    state directory and (for ``tcp``) the token file. Raises StateDirError or TokenError."""
    statedir.prepare(state_dir)
    secret = token.load_or_create(token_file or default_token_file(state_dir)) if tcp else None
    roots = [images.IMAGES, statedir.storage(state_dir), *allow]
    return Access(secret, PathPolicy(roots), restrict_unix)


async def serve(socket_path: Path, tcp: tuple[str, int] | None, access: Access) -> int:
    """Serve until SIGINT or SIGTERM; then every guest is killed."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Vmm() as vmm:
        runner = web.AppRunner(make_app(vmm, access), handle_signals=False)
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
            host, port = runner.addresses[-1][:2]  # the port chosen, if 0 was asked for
            where += f" and http://{f'[{host}]' if ':' in host else host}:{port} (with a token)"
        print(f"popek VMM listening on {where}", file=sys.stderr, flush=True)
        await stop.wait()
        print("popek VMM stopping: killing every guest", file=sys.stderr, flush=True)
        await vmm.close()  # first, so that attached consoles end
        await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    return 0
