"""The bundled Linux under the VMM: boot, use its shell, snapshot it, and clone it.

One boot (tens of seconds); the restored clone is a second Linux that carries on from
the snapshot without booting: its shell answers at once, with the state it had.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popek import images
from popek.api.client import Client

BOOT_PATIENCE = 300.0


async def _wait_for(client: Client, vm: str, pattern: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = await client.console_log(vm)
        if re.search(pattern, log):
            return log
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {pattern!r} from {vm}; console ends with {log[-500:]!r}")


async def _scenario(sock: Path, snap: Path) -> None:
    async with Client(sock) as client:
        vm = await client.create(kernel=str(images.KERNEL), initrd=str(images.INITRD),
                                 mem=128 << 20)
        await _wait_for(client, vm["id"], rb"popek guest: Linux", BOOT_PATIENCE)
        async with client.console(vm["id"], replay=False) as ws:
            await ws.send_bytes(b"x=41; echo got-$((x+1))\n")
        await _wait_for(client, vm["id"], rb"got-42", 60)
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
        info = await client.info(clone["id"])
        assert info["state"] == "running" and info["traps"]


@pytest.mark.boots_linux
def test_linux_guest_snapshot_restores_into_a_live_shell(tmp_path: Path) -> None:
    sock = tmp_path / "vmm.sock"
    with open(tmp_path / "vmm.log", "wb") as log:
        serve = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                                  str(sock), "--state-dir", str(tmp_path / "state")], stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline, "the VMM did not start"
            time.sleep(0.05)
        asyncio.run(_scenario(sock, tmp_path / "linux.snap"))
    finally:
        serve.terminate()
        serve.wait(timeout=60)
