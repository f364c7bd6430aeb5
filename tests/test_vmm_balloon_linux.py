"""The bundled Linux's virtio-balloon driver against popek's device, under the VMM, and
the same guest swapped out and in.

One boot (tens of seconds) of a 256 MiB guest with a balloon and a 64 MiB disk. The
guest first reads the whole disk, which fills its page cache, so the host holds that
much more of its RAM; ``popek vm update --balloon 32M`` then has its driver take about
all its memory, reclaiming that cache: the host drops the pages it hands over (and those
the guest reports free on the way), and the guest RAM the host holds falls. Given
everything back, the guest's shell still answers, and its own memory statistics and free
page reports reach ``popek vm info``.

Swapped out (``popek vm swap-out``), paused, the guest's RAM leaves the host and comes
back whole (a snapshot before and after holds the same RAM); swapped out while it runs,
its shell answers within seconds, fetching what it touches from the swap file.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek import images
from popek.vmm import snapshot
from tests.test_vmm_page_sharing import _type, _vmm
from tests.test_vmm_service import Api
from tests.vmm_guests import guest as bare_metal

MIB = 1 << 20
GUEST_RAM = 256 * MIB  # Linux reports free 4 MiB blocks only with 128 MiB free
DISK = 64 * MIB
BOOT_PATIENCE = 300.0


@pytest.fixture(scope="class")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, dict[str, Any]]]:
    # Without page sharing, which would fold the zeros the guest writes into the host's
    # zero page before the balloon could.
    tmp = tmp_path_factory.mktemp("balloon")
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK)
    with _vmm(tmp, "--page-sharing", "off") as api:
        vm = api("create", kernel=str(images.KERNEL), initrd=str(images.INITRD),
                 mem=GUEST_RAM, balloon=True, disks=[{"path": str(disk), "readonly": True}])
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
        _type(api, vm, b"cat /dev/vda > /dev/null; echo cached-$((1+1))\n")
        _wait(api, vm, b"cached-2")
        touched = api.info(vm)["memory"]["guest_touched_bytes"]
        assert touched >= DISK  # the disk in the guest's page cache, in the host's RAM
        api("update", vm["id"], balloon=32 * MIB)
        api.wait("the balloon to inflate", lambda: _balloon(api, vm)["inflated_bytes"] >= DISK)
        assert _balloon(api, vm)["target_bytes"] == GUEST_RAM - 32 * MIB
        # The guest reclaimed its cache for the balloon (and reported what it freed), and
        # the host dropped those pages.
        api.wait("the guest RAM the host holds to fall", lambda: api.info(vm)["memory"][
            "guest_touched_bytes"] < touched - DISK // 2)
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
        # Free page reporting: the guest's free blocks are dropped without any target (Linux
        # reports them 2 s after they were freed, so possibly after the first statistics).
        api.wait("free page reporting", lambda: _balloon(api, vm)["reported_bytes"] >= 4 * MIB)
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

    def test_swap_out_and_in_keeps_memory_and_console(
            self, guest: tuple[Api, dict[str, Any]], tmp_path: Path) -> None:
        api, vm = guest
        api("pause", vm["id"])
        api("snapshot", vm["id"], tmp_path / "before")
        memory = api("swap_out", vm["id"])["memory"]
        assert memory["swapped_bytes"] >= 8 * MIB  # the kernel, its data, the shell
        assert memory["guest_touched_bytes"] < MIB  # paused: nothing came back
        assert api("swap_in", vm["id"])["memory"]["swapped_bytes"] == 0
        api("snapshot", vm["id"], tmp_path / "after")
        before, after = (snapshot.load(tmp_path / name).memory.ram
                         for name in ("before", "after"))
        assert before[:] == after[:]
        api("resume", vm["id"])
        swapped = api("swap_out", vm["id"])["memory"]["swapped_bytes"]
        assert swapped >= 8 * MIB
        _type(api, vm, b"echo swapped-$((3+4))\n")
        api.wait_log(vm, rb"swapped-7")
        memory = api.info(vm)["memory"]
        assert memory["swapped_bytes"] >= swapped // 2  # answering needed a fraction
