"""Restore templates: clones of a snapshot fork from a process that restored it once, and
are the machines a worker restoring the file itself builds.

Two VMMs restore one snapshot of the bare-metal echo guest (tests/vmm_guests.py): one
forks its clones from a template (the default), the other with ``--restore-templates
off``. Their clones must agree in everything the guest or a user can observe.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.api.client import Client
from popek.vmm import procstat, snapshot
from tests.test_vmm_service import Api
from tests.vmm_process import popek_serve


@pytest.fixture(scope="module")
def vmms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, Api, Path]]:
    """A VMM with templates, one without, and a snapshot of an echo guest that has
    echoed a line already (its RAM holds it)."""
    with popek_serve(tmp_path_factory.mktemp("templates")) as forked, \
            popek_serve(tmp_path_factory.mktemp("plain"), "--restore-templates", "off") as plain:
        api = Api(forked)
        original = api.create("echo")
        api.wait_log(original, rb"echo ready")
        api.type_line(original, b"before the snapshot\n")
        api("action", original["id"], "pause")
        path = forked.parent / "echo.snap"
        api("snapshot", original["id"], path)
        api("delete", original["id"])
        yield api, Api(plain), path


def _restore(api: Api, path: Path) -> dict[str, Any]:
    vm = api("restore", path, start=False)
    return api.info(vm)


def _snapshot_of(api: Api, vm: dict[str, Any], path: Path) -> snapshot.Snapshot:
    api("snapshot", vm["id"], path)
    return snapshot.load(path)


def test_a_clone_from_a_template_is_the_machine_a_restore_builds(
        vmms: tuple[Api, Api, Path], tmp_path: Path) -> None:
    forked_api, plain_api, path = vmms
    forked, plain = _restore(forked_api, path), _restore(plain_api, path)
    assert forked["template_pid"] is not None and plain["template_pid"] is None
    assert procstat.parent(forked["template_pid"]) == procstat.parent(forked["pid"])  # the VMM
    # Not one instruction run yet: harts, devices and RAM are the snapshot's in both.
    a = _snapshot_of(forked_api, forked, tmp_path / "forked.snap")
    b = _snapshot_of(plain_api, plain, tmp_path / "plain.snap")
    assert a.meta["machine"] == b.meta["machine"]
    assert bytes(a.memory.ram) == bytes(b.memory.ram)
    # Run, both given the same line: the same echo, and the same memory after it.
    for api, vm in ((forked_api, forked), (plain_api, plain)):
        api("action", vm["id"], "start")
        assert b"after the restore" in api.type_line(vm, b"after the restore\n")
        api("action", vm["id"], "pause")
    a = _snapshot_of(forked_api, forked, tmp_path / "forked-ran.snap")
    b = _snapshot_of(plain_api, plain, tmp_path / "plain-ran.snap")
    assert bytes(a.memory.ram) == bytes(b.memory.ram)
    assert forked_api.log(forked) == plain_api.log(plain)
    for api, vm in ((forked_api, forked), (plain_api, plain)):
        api("delete", vm["id"])


def test_clones_of_a_template_are_processes_of_their_own(vmms: tuple[Api, Api, Path]) -> None:
    api, _, path = vmms
    clones = [api.info(api("restore", path)) for _ in range(3)]
    assert len({clone["template_pid"] for clone in clones}) == 1  # one template, reused
    assert len({clone["pid"] for clone in clones}) == 3
    for clone in clones:  # each confined as any worker, under its own ids when root
        assert clone["confinement"]["seccomp"] == "filter"
        assert clone["confinement"]["no_new_privs"]
    if os.geteuid() == 0:
        assert len({clone["confinement"]["uid"] for clone in clones}) == 3
    # Each runs alone: a line typed to one is echoed by that one only.
    api.type_line(clones[0], b"only the first\n")
    time.sleep(0.5)
    assert b"only the first" not in api.log(clones[1]) + api.log(clones[2])
    for clone in clones:
        api("delete", clone["id"])


def test_a_killed_template_is_replaced_and_no_restore_fails(
        vmms: tuple[Api, Api, Path]) -> None:
    api, _, path = vmms
    first = api.info(api("restore", path))
    os.kill(first["template_pid"], 9)
    second = api.info(api("restore", path))  # restores the file itself, finding it gone
    assert b"still here" in api.type_line(second, b"still here\n")
    third = api.info(api("restore", path))
    assert third["template_pid"] not in (None, first["template_pid"])
    assert b"and here" in api.type_line(third, b"and here\n")
    for vm in (first, second, third):
        api("delete", vm["id"])


def test_clones_restored_at_once_all_fork_from_one_template(
        vmms: tuple[Api, Api, Path]) -> None:
    """The way bench/density.py restores: every request at once (not started: the echo
    guest spins)."""
    api, _, path = vmms

    async def restore_all() -> list[dict[str, Any]]:
        async with Client(api.socket_path) as client:
            clones = await asyncio.gather(*(client.restore(path, start=False)
                                            for _ in range(30)))
            infos = [await client.info(clone["id"]) for clone in clones]
            for clone in clones:
                await client.delete(clone["id"])
            return infos

    infos = asyncio.run(restore_all())
    assert {info["state"] for info in infos} == {"created"}
    assert len({info["template_pid"] for info in infos}) == 1


def test_a_clone_from_a_template_swaps_out_and_in_intact(
        vmms: tuple[Api, Api, Path], tmp_path: Path) -> None:
    """A clone's RAM maps the template's copy-on-write: dropping a page must not lose
    what the template or the clone wrote, only what the snapshot file still holds."""
    api, _, path = vmms
    vm = _restore(api, path)
    api("action", vm["id"], "start")
    assert b"into the clone" in api.type_line(vm, b"into the clone\n")
    api("action", vm["id"], "pause")
    before = _snapshot_of(api, vm, tmp_path / "before.snap")
    assert api("swap_out", vm["id"])["memory"]["swapped_bytes"] > 0
    assert api("swap_in", vm["id"])["memory"]["swapped_bytes"] == 0
    after = _snapshot_of(api, vm, tmp_path / "after.snap")
    assert bytes(after.memory.ram) == bytes(before.memory.ram)
    api("action", vm["id"], "resume")
    assert b"after the swap" in api.type_line(vm, b"after the swap\n")
    api("delete", vm["id"])
