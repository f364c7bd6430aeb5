"""The bundled Linux's virtio-balloon driver against popek's device, under the VMM.

One boot (tens of seconds) of a 256 MiB guest with a balloon. ``popek vm update
--balloon 32M`` has its driver take about all its free memory: the host drops those
pages, so the guest RAM it holds does not grow by them (a guest that wrote and freed
memory keeps most of those pages among the last it gives, so this test does not claim
that the resident set falls; the device tests show dropped pages leave it). Given
everything back, the guest's shell still answers, and its own memory statistics and
free page reports reach ``popek vm info``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from popek import images
from tests.test_vmm_page_sharing import _type, _vmm
from tests.test_vmm_service import Api
from tests.vmm_guests import guest as bare_metal

MIB = 1 << 20
GUEST_RAM = 256 * MIB  # Linux reports free 4 MiB blocks only with 128 MiB free
BOOT_PATIENCE = 300.0


@pytest.fixture(scope="class")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, Any]]]:
    # Without page sharing, which would fold the zeros the guest writes into the host's
    # zero page before the balloon could.
    with _vmm(tmp_path_factory.mktemp("balloon"), "--page-sharing", "off") as api:
        vm = api("create", kernel=str(images.KERNEL), initrd=str(images.INITRD),
                 mem=GUEST_RAM, balloon=True)
        deadline = time.monotonic() + BOOT_PATIENCE
        while b"popek guest: Linux" not in api.log(vm):
            assert time.monotonic() < deadline, f"no shell; console: {api.log(vm)[-500:]!r}"
            time.sleep(0.5)
        yield api, vm


def _wait(api: Api, vm: dict[str, Any], pattern: bytes) -> None:
    """Wait longer than Api.wait: writing megabytes is slow work for an emulated guest."""
    deadline = time.monotonic() + BOOT_PATIENCE
    while pattern not in api.log(vm):
        assert time.monotonic() < deadline, f"no {pattern!r}; console: {api.log(vm)[-300:]!r}"
        time.sleep(0.5)


def _balloon(api: Api, vm: dict[str, Any]) -> dict[str, Any]:
    return api.info(vm)["balloon"]


@pytest.mark.boots_linux
class TestBalloonWithLinux:
    def test_inflate_drops_guest_ram_and_deflate_gives_it_back(
            self, guest: tuple[Api, dict[str, Any]]) -> None:
        api, vm = guest
        touched = api.info(vm)["memory"]["guest_touched_bytes"]
        api("update", vm["id"], balloon=32 * MIB)
        api.wait("the balloon to inflate", lambda: _balloon(api, vm)["actual_bytes"]
                 >= 60 * MIB)
        balloon = _balloon(api, vm)
        assert balloon["target_bytes"] == GUEST_RAM - 32 * MIB
        assert balloon["inflated_bytes"] >= 60 * MIB
        # The pages handed over are not held by the host: were they, the guest RAM it
        # holds would have grown by as much (Linux may zero a page it allocates).
        after = api.info(vm)["memory"]["guest_touched_bytes"]
        assert after < touched + 4 * MIB and after + balloon["inflated_bytes"] <= GUEST_RAM
        api("update", vm["id"], balloon=GUEST_RAM)
        api.wait("the balloon to deflate", lambda: _balloon(api, vm)["actual_bytes"] == 0)
        _type(api, vm, b"echo alive-$((2+3))\n")
        api.wait_log(vm, rb"alive-5")
        assert _balloon(api, vm)["inflated_bytes"] == 0

    def test_guest_memory_statistics_reach_vm_info(
            self, guest: tuple[Api, dict[str, Any]]) -> None:
        api, vm = guest
        stats = api.wait("the guest's statistics", lambda: _balloon(api, vm)["guest"])
        assert 0 < stats["free_memory"] <= stats["total_memory"] <= GUEST_RAM
        # Free page reporting: the guest's free blocks were dropped without any target.
        assert _balloon(api, vm)["reported_bytes"] >= 4 * MIB
        shown = subprocess.run([sys.executable, "-m", "popek", "vm", "--socket",
                                str(api.socket_path), "info", vm["id"]],
                               capture_output=True, text=True, check=True).stdout
        assert "balloon" in shown and "free memory" in shown

    def test_a_guest_without_a_balloon_refuses_a_target(
            self, guest: tuple[Api, dict[str, Any]]) -> None:
        api, _ = guest
        other = api("create", kernel=str(bare_metal("idle")), mem=32 * MIB)
        with pytest.raises(Exception, match="no balloon device"):
            api("update", other["id"], balloon=16 * MIB)
        api("delete", other["id"])
