"""Guests of the same images share identical pages through the host's KSM, and a guest
that writes to a shared page gets its own copy.

Four bare-metal guests fill 2 MiB of RAM with the same pattern (tests/vmm_guests.py,
"sharer"). Under ``popek serve`` (page sharing on by default) the host merges their
copies: each VM reports merged guest RAM, ``GET /v1/host`` reports KSM's savings, and the
guests' private guest RAM and PSS are below those of the same four guests under
``popek serve --page-sharing off``. Then one guest writes a word of a shared page: its
checksum changes and the other three still see the pattern.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.api.client import Client
from popek.vmm import pagesharing
from tests.test_vmm_service import STOP_GUESTS, Api
from tests.vmm_process import wait_listening

GUESTS = 4
AREA = 2 << 20  # bytes each sharer fills with the common pattern


@contextlib.contextmanager
def _vmm(tmp: Path, *extra: str, **popen: Any) -> Iterator[Api]:
    """``popek serve`` with ``extra`` arguments (and ``popen``'s for subprocess.Popen)."""
    sock = tmp / "vmm.sock"
    log = tmp / "vmm.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                                 "--state-dir", str(tmp / "state"), *STOP_GUESTS, *extra],
                                stderr=stderr, **popen)
    api = Api(sock)
    try:
        wait_listening(sock, proc)
        yield api
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


def _sharers(api: Api) -> list[dict[str, Any]]:
    vms = [api.create("sharer") for _ in range(GUESTS)]
    for vm in vms:
        api.wait_log(vm, rb"sharer ready\n")
    return vms


def _type(api: Api, vm: dict[str, Any], keys: bytes) -> None:
    async def send() -> None:
        async with Client(api.socket_path) as client, \
                client.console(vm["id"], replay=False) as ws:
            await ws.send_bytes(keys)
    asyncio.run(send())


def _checksum(api: Api, vm: dict[str, Any]) -> int:
    before = len(re.findall(rb"sum \d+\n", api.log(vm)))
    _type(api, vm, b"s")
    sums = api.wait(f"a checksum from {vm['name']}", lambda: len(
        found := re.findall(rb"sum (\d+)\n", api.log(vm))) > before and found)
    return int(sums[-1])


def _memory(api: Api, vms: list[dict[str, Any]]) -> tuple[int, int]:
    """The guests' private guest RAM and their workers' anonymous PSS (guest RAM and
    heap: shared libraries' PSS depends on how many other processes map them), summed."""
    infos = [api.info(vm)["memory"] for vm in vms]
    return (sum(m["guest_private_bytes"] for m in infos),
            sum(m["pss_anon_bytes"] for m in infos))


@pytest.fixture(scope="module")
def unshared(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, int]:
    """Private guest RAM and PSS of the four guests without page sharing."""
    with _vmm(tmp_path_factory.mktemp("unshared"), "--page-sharing", "off") as api:
        vms = _sharers(api)
        assert all(api.info(vm)["memory"]["guest_merged_bytes"] == 0 for vm in vms)
        assert api("host")["page_sharing"] is False
        return _memory(api, vms)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, list[dict[str, Any]]]]:
    with _vmm(tmp_path_factory.mktemp("shared")) as api:
        ksm = api("host")["ksm"]
        assert ksm["available"] and ksm["running"], (
            "page sharing needs the host's KSM running (/sys/kernel/mm/ksm/run = 1; popek "
            f"serve starts it as root): {ksm} ({pagesharing.start_ksm()})")
        vms = _sharers(api)
        for vm in vms:  # KSM's scans take a few seconds to find and merge the copies
            api.wait(f"{vm['name']}'s pages merged", lambda vm=vm: api.info(vm)["memory"][
                "guest_merged_bytes"] >= AREA // 2)
        yield api, vms


def test_guests_from_the_same_image_share_pages(shared: tuple[Api, list[dict[str, Any]]],
                                                unshared: tuple[int, int]) -> None:
    api, vms = shared
    host = api("host")
    assert host["page_sharing"] is True
    assert host["ksm"]["pages_sharing"] > 0 and host["ksm"]["saved_bytes"] > 0
    assert host["guests"]["count"] == GUESTS
    assert host["guests"]["guest_merged_bytes"] >= GUESTS * AREA // 2
    private, pss = _memory(api, vms)
    unshared_private, unshared_pss = unshared
    # Of four copies of 2 MiB, one is kept: about 6 MiB less private guest RAM.
    assert private < unshared_private - (GUESTS - 1) * AREA // 2, (private, unshared_private)
    assert pss < unshared_pss, (pss, unshared_pss)


def test_a_guest_writing_a_shared_page_gets_its_own_copy(
        shared: tuple[Api, list[dict[str, Any]]]) -> None:
    api, vms = shared
    pattern = {_checksum(api, vm) for vm in vms}
    assert len(pattern) == 1
    _type(api, vms[0], b"w")
    api.wait_log(vms[0], rb"wrote\n")
    assert _checksum(api, vms[0]) not in pattern
    assert [_checksum(api, vm) for vm in vms[1:]] == [*pattern] * (GUESTS - 1)
