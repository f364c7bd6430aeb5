"""Many workers starting at once: each start succeeds, and none outlives a VMM that stops
its guests, not even one whose creation was still under way.

Guests are the tiny bare-metal programs of tests/vmm_guests.py; each boots in
milliseconds, so dozens start within a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from popek.api.client import ApiError, Client
from popek.vmm import workerprocess
from tests.test_vmm_service import MEM, PATIENCE
from tests.vmm_guests import guest
from tests.vmm_process import STOP_GUESTS, popek_serve, wait_listening

STARTS = 300


def test_hundreds_of_concurrent_worker_starts_all_succeed() -> None:
    """Each start polls the earlier children; a join polling the same one in another
    thread lost its exit status to it (read 255: "the worker did not start"). A busy
    thread holds the GIL as the VMM's event loop does, which widens that window."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    async def start_all() -> list[BaseException]:
        # Workers that end at once, some a few milliseconds later than others, so that
        # their ends and the next starts interleave (a builtin: the fork server's children
        # import nothing to run it).
        results = await asyncio.gather(
            *(workerprocess.start(time.sleep, (i % 7 * 0.003,), f"popek-test-{i}")
              for i in range(STARTS)), return_exceptions=True)
        return [r for r in results if isinstance(r, BaseException)]

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        failures = asyncio.run(start_all())
    finally:
        stop.set()
        thread.join()
    assert failures == []


def test_fifty_guests_created_at_once_all_run(tmp_path: Path) -> None:
    async def create_all(sock: Path) -> list[dict]:
        async with Client(sock) as client:
            vms = await asyncio.gather(*(client.create(kernel=str(guest("idle")), mem=MEM)
                                         for _ in range(50)))
            listed = {vm["id"]: vm["state"] for vm in await client.list()}
            for vm in vms:
                await client.delete(vm["id"])
            return [listed[vm["id"]] for vm in vms]

    with popek_serve(tmp_path) as sock:
        assert asyncio.run(create_all(sock)) == ["running"] * 50


def _workers(state: Path, vmm: int) -> set[int]:
    """Processes other than the VMM ``vmm`` with a file of a VM in the state directory
    ``state`` open (a worker holds its log)."""
    directory = state / "vms"
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == vmm:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{directory}/")
                   for fd in fds):
                found.add(int(pid))
        except OSError:
            continue
    return found


def test_stop_guests_ends_the_workers_of_guests_still_being_created(tmp_path: Path) -> None:
    """SIGTERM while 30 creations are under way: the VMM waits for them, stops their
    guests with the rest and refuses new ones; no worker is left waiting for a VMM."""
    sock, state = tmp_path / "vmm.sock", tmp_path / "state"
    with open(tmp_path / "vmm.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                                 str(sock), "--state-dir", str(state), *STOP_GUESTS],
                                stderr=log)

    async def create_then_stop() -> list[BaseException | dict]:
        async with Client(sock) as client:
            creating = [asyncio.ensure_future(client.create(kernel=str(guest("idle")), mem=MEM))
                        for _ in range(30)]
            deadline = time.monotonic() + PATIENCE
            while not _workers(state, proc.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # until the first workers run
            proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*creating, return_exceptions=True)

    try:
        wait_listening(sock, proc, PATIENCE)
        results = asyncio.run(create_then_stop())
        assert proc.wait(timeout=PATIENCE) == 0, (tmp_path / "vmm.log").read_text()
    finally:
        proc.kill()
    assert all(isinstance(r, dict | ApiError | OSError) for r in results), results
    deadline = time.monotonic() + 10
    while _workers(state, proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers(state, proc.pid) == set(), (tmp_path / "vmm.log").read_text()
