"""VM swap-out under ``popek serve``: a guest's RAM goes to its swap file and comes back
as the guest touches it, by command or when guests hold more than ``--mem-limit``.

The guests are bare-metal "sharer"s (tests/vmm_guests.py): each fills 2 MiB with a
pattern and prints its checksum when "s" is typed, reading every word of it, so a page
lost or mangled on its way out or back shows as a different sum. A swapped-out guest
outlives its VMM like any other. A VMM whose files cannot grow (RLIMIT_FSIZE, as a full
disk) keeps the guest resident and says why.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from popek.api.client import ApiError
from tests.test_vmm_outlive import Serve, serve  # noqa: F401 (a fixture)
from tests.test_vmm_page_sharing import AREA, _checksum, _vmm
from tests.test_vmm_service import Api

MIB = 1 << 20
# Swapped out, a sharer's 2 MiB less the pages its idle loop fetches back (with readahead)
SWAPPED = AREA * 9 // 10


def _sharer(api: Api) -> dict[str, Any]:
    vm = api.create("sharer")
    api.wait_log(vm, rb"sharer ready\n")
    return vm


def _memory(api: Api, vm: dict[str, Any]) -> dict[str, Any]:
    return api.info(vm)["memory"]


def _swap_file(tmp: Path, vm: dict[str, Any]) -> Path:
    return tmp / "state" / "vms" / vm["id"] / "swap"


def test_swap_out_and_in_keeps_the_guest_and_its_memory(tmp_path: Path) -> None:
    with _vmm(tmp_path) as api:
        vm = _sharer(api)
        checksum = _checksum(api, vm)
        shown = subprocess.run([sys.executable, "-m", "popek", "vm", "--socket",
                                str(api.socket_path), "swap-out", vm["name"]],
                               capture_output=True, text=True, check=True).stdout
        assert shown.startswith(f"{vm['name']}: 2.") and "swapped out" in shown, shown
        memory = _memory(api, vm)  # as the guest, idle in WFI, fetched its code back
        assert memory["swapped_bytes"] >= SWAPPED
        assert memory["guest_touched_bytes"] < AREA // 4
        assert _swap_file(tmp_path, vm).stat().st_blocks * 512 >= AREA
        assert _checksum(api, vm) == checksum  # read back from the file as it sums
        assert _memory(api, vm)["guest_touched_bytes"] >= AREA
        api("swap_out", vm["id"])
        assert api("swap_in", vm["id"])["memory"]["swapped_bytes"] == 0
        assert _checksum(api, vm) == checksum
        api("delete", vm["id"])
        assert not _swap_file(tmp_path, vm).exists()


def test_a_swapped_out_guest_outlives_its_vmm(serve: Serve) -> None:  # noqa: F811
    """The worker holds its swap file open: the next VMM adopts the guest as it was, and
    can swap it out (into the same file) and in again."""
    api = serve.start()
    vm = _sharer(api)
    checksum = _checksum(api, vm)
    api("swap_out", vm["id"])
    serve.stop()
    api = serve.start()
    assert _memory(api, vm)["swapped_bytes"] >= SWAPPED
    assert _checksum(api, vm) == checksum
    assert api("swap_out", vm["id"])["memory"]["swapped_bytes"] >= SWAPPED
    assert api("swap_in", vm["id"])["memory"]["swapped_bytes"] == 0
    assert _checksum(api, vm) == checksum


def _small_files() -> None:
    """What a full disk does to the swap file, for this VMM and its workers: writes past
    1 MiB fail (EFBIG; Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (MIB, MIB))


def test_a_full_disk_leaves_the_guest_resident_and_says_why(tmp_path: Path) -> None:
    with _vmm(tmp_path, preexec_fn=_small_files) as api:
        vm = _sharer(api)
        checksum = _checksum(api, vm)
        with pytest.raises(ApiError, match="cannot swap out: writing the swap file failed: "
                                           "File too large$"):
            api("swap_out", vm["id"])
        memory = _memory(api, vm)
        assert memory["swapped_bytes"] == 0 and memory["guest_touched_bytes"] >= AREA
        assert api.info(vm)["state"] == "running"
        assert _checksum(api, vm) == checksum


def test_above_the_memory_limit_the_guest_idle_longest_is_swapped_out(
        tmp_path: Path) -> None:
    """Two guests hold 2 MiB and more each, over a 3 MiB limit: the VMM swaps out the one
    whose console has been quiet longer, and the other keeps its RAM."""
    with _vmm(tmp_path, "--mem-limit", "3M") as api:
        idle = _sharer(api)
        busy = _sharer(api)
        api.wait("the idle guest swapped out",
                 lambda: _memory(api, idle)["swapped_bytes"] >= SWAPPED)
        assert _memory(api, busy)["swapped_bytes"] == 0
        assert _checksum(api, idle) == _checksum(api, busy)  # the same pattern in both
