"""``popek serve``: the VMM behind its REST API, on a Unix socket (and TCP, with a token).

The socket is created owner-only: the API can read and write host files as the VMM's
user (images, disks, snapshots), so the socket's permissions are its access control.
TCP has none of its own: there the API token and the path policy stand in
(:mod:`popek.api.access`).

Guests outlive the VMM, as libvirt's outlive ``libvirtd``. The VMM starts by adopting
every guest its state directory records (:mod:`popek.vmm.manager`). SIGTERM or SIGINT
ends it within a few seconds and leaves the guests running: the API stops listening,
console sessions are closed, a request still running after :data:`SHUTDOWN_GRACE`
seconds is cancelled, and each worker's channel is closed (the worker waits for the next
VMM). With ``--stop-guests`` the VMM powers the guests off first, as ``popek vm stop``
would; a second signal stops that wait and leaves the rest running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Awaitable
from pathlib import Path

from aiohttp import web

from popek import images
from popek.api import token
from popek.api.access import Access
from popek.api.endpoint import default_token_file
from popek.api.server import make_app
from popek.vmm import pagesharing, records, statedir, workerprocess
from popek.vmm.manager import Vmm
from popek.vmm.paths import PathPolicy

SHUTDOWN_GRACE = 2.0  # seconds a request may still run once the VMM is told to stop


class ServeError(Exception):
    """``popek serve`` cannot start; the message says why, in one line."""


def prepare_access(state_dir: Path, *, tcp: bool, token_file: Path | None, allow: list[Path],
                   restrict_unix: bool) -> Access:
    """Who may call and what they may name, settled before the VMM listens: prepares the
    state directory and (for ``tcp``) the token file. Raises StateDirError or TokenError."""
    statedir.prepare(state_dir)
    records.check_room(state_dir)
    secret = token.load_or_create(token_file or default_token_file(state_dir)) if tcp else None
    roots = [images.IMAGES, statedir.storage(state_dir), *allow]
    return Access(secret, PathPolicy(roots), restrict_unix)


async def serve(socket_path: Path, tcp: tuple[str, int] | None, access: Access,
                state_dir: Path, stop_guests: float | None = None, *,
                page_sharing: bool = True, mem_limit: int | None = None) -> int:
    """Serve until SIGINT or SIGTERM; then leave the guests running, or with
    ``stop_guests`` (seconds each may take) power them off first. ServeError if another
    VMM listens on ``socket_path``."""
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    workerprocess.become_subreaper()
    await _claim(socket_path)
    if page_sharing:
        print(f"popek VMM: {pagesharing.start_ksm()}", file=sys.stderr, flush=True)
    limit = {} if mem_limit is None else {"mem_limit": mem_limit}
    async with Vmm(state_dir, page_sharing=page_sharing, **limit) as vmm:
        _report_adopted(vmm)
        runner = web.AppRunner(make_app(vmm, access), handle_signals=False,
                               shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
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
        await signals.get()
        if stop_guests is not None:
            print("popek VMM stopping: powering every guest off", file=sys.stderr, flush=True)
            await _until_signal(vmm.stop_guests(stop_guests), signals)
        running = sum(vm.alive for vm in vmm.vms.values())
        print(f"popek VMM stopping; {running} guest(s) left running", file=sys.stderr,
              flush=True)
        await runner.cleanup()
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    return 0


async def _claim(socket_path: Path) -> None:
    """Take the API's socket over from a VMM that has ended (a stale socket file), but
    never from one that still answers there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(probe, str(socket_path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        return
    finally:
        probe.close()
    raise ServeError(f"another VMM is listening on {socket_path}")


async def _until_signal(work: Awaitable[None], signals: asyncio.Queue[int]) -> None:
    """Await ``work`` unless a signal comes first (then it is cancelled)."""
    task = asyncio.ensure_future(work)
    interrupt = asyncio.create_task(signals.get())
    await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, interrupt):
        pending.cancel()


def _report_adopted(vmm: Vmm) -> None:
    for vm in vmm.vms.values():
        how = vm.state if vm.alive else f"{vm.state}: {vm.failure or vm.exit}"
        print(f"popek VMM: adopted {vm.name} ({vm.id}), {how}", file=sys.stderr, flush=True)
