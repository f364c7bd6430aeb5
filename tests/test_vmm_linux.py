"""The bundled Linux under the VMM: boot, use its shell and network, snapshot it, clone it.

One boot (tens of seconds); the restored clone is a second Linux that carries on from
the snapshot without booting: its shell answers at once, with the state it had, and its
web server through a NIC the VMM opened again.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from popek import images
from popek.api.client import Client
from tests.test_vmm_service import STOP_GUESTS
from tests.vmm_process import wait_listening

BOOT_PATIENCE = 300.0


async def _wait_for(client: Client, vm: str, pattern: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = await client.console_log(vm)
        if re.search(pattern, log):
            return log
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {pattern!r} from {vm}; console ends with {log[-500:]!r}")


async def _get(port: int) -> bytes:
    """A page from the guest's httpd, through its NIC's port forward."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session, \
            session.get(f"http://127.0.0.1:{port}/") as response:
        return await response.read()


async def _scenario(sock: Path, snap: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with Client(sock) as client:
        # A user NIC: the VMM runs passt and passes the worker its socket.
        vm = await client.create(kernel=str(images.KERNEL), initrd=str(images.INITRD),
                                 mem=128 << 20, nics=[{"type": "user", "hostfwd": [
                                     {"host_addr": "127.0.0.1", "host_port": port,
                                      "guest_port": 80}]}])
        log = await _wait_for(client, vm["id"], rb"popek guest: Linux", BOOT_PATIENCE)
        assert b"eth0: 10.0.2.15/24 via 10.0.2.2" in log  # the init's DHCP lease
        async with client.console(vm["id"], replay=False) as ws:
            await ws.send_bytes(b"mkdir /www; echo from-the-vm > /www/index.html; "
                                b"httpd -h /www -p 80; x=41; echo got-$((x+1))\n")
        await _wait_for(client, vm["id"], rb"got-42", 60)
        assert await _get(port) == b"from-the-vm\n"
        await client.action(vm["id"], "pause")
        saved = await client.snapshot(vm["id"], snap)
        assert saved["ram_bytes"] < 128 << 20
        await client.delete(vm["id"])

        clone = await client.restore(snap)
        start = time.monotonic()
        async with client.console(clone["id"], replay=False) as ws:
            await ws.send_bytes(b"echo clone-$((x+2))\n")  # x survived the snapshot
        await _wait_for(client, clone["id"], rb"clone-43", 60)
        assert time.monotonic() - start < 30  # no boot: the shell was already there
        assert await _get(port) == b"from-the-vm\n"  # its NIC was opened again, its httpd
        # still listens
        info = await client.info(clone["id"])
        assert info["state"] == "running" and info["traps"]


@pytest.mark.boots_linux
def test_linux_guest_snapshot_restores_into_a_live_shell(tmp_path: Path) -> None:
    sock = tmp_path / "vmm.sock"
    with open(tmp_path / "vmm.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                                  str(sock), "--state-dir", str(tmp_path / "state"),
                                  *STOP_GUESTS], stderr=log)
    try:
        wait_listening(sock, serve)
        asyncio.run(_scenario(sock, tmp_path / "linux.snap"))
    finally:
        serve.terminate()
        serve.wait(timeout=60)
