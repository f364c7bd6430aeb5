"""Live migration between two ``popek serve`` instances, through the CLI and the API.

The guest is QEMU's migration test idea (``migrant`` in tests/vmm_guests.py): it checks
every page of 8 MiB holds the pass it expects before it increments it, so a page that
arrived stale stops it with MISMATCH. It moves from VMM A to VMM B (over TCP, with B's
token and under B's path policy, by ``popek vm migrate``) and back (to A's Unix socket,
by the API), and its passes go on without a gap or a repeat. Bad requests and a
destination that dies mid-migration leave the guest running on its source.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek import images
from popek.api.client import ApiError
from tests.test_vmm_service import STOP_GUESTS, Api
from tests.vmm_guests import guest


class Vmm:
    def __init__(self, root: Path, name: str, tcp: bool) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.socket = self.dir / "vmm.sock"
        self.log = self.dir / "vmm.log"
        self.token_file = self.dir / "state" / "api-token"
        self.name, self.tcp_args = name, (
            ["--tcp", "127.0.0.1:0", "--allow-path", str(guest("migrant").parent)]
            if tcp else [])
        self.start()

    def start(self) -> None:
        with open(self.log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "popek", "serve", "--socket", str(self.socket),
                 "--state-dir", str(self.dir / "state"), *STOP_GUESTS, *self.tcp_args],
                stderr=stderr)
        self.api = Api(self.socket)
        self.api.wait(f"VMM {self.name}", lambda: "listening" in self.log.read_text())
        found = re.search(r"http://127\.0\.0\.1:(\d+)", self.log.read_text())
        self.tcp = f"tcp:127.0.0.1:{found[1]}" if found else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "popek", "vm", "--socket",
                               str(self.socket), *args], capture_output=True, text=True,
                              timeout=300)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        log = self.log.read_text()
        assert self.proc.returncode == 0 and "Traceback" not in log, log


@pytest.fixture(scope="module")
def vmms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Vmm, Vmm]]:
    root = tmp_path_factory.mktemp("migrate")
    a = Vmm(root, "a", tcp=False)
    b = Vmm(root, "b", tcp=True)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def pair(vmms: tuple[Vmm, Vmm]) -> Iterator[tuple[Vmm, Vmm]]:
    yield vmms
    for vmm in vmms:
        for vm in vmm.api("list"):
            if vm["state"] not in ("incoming", "creating"):
                vmm.api("delete", vm["id"])


def _passes(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"pass (\d+)\n", out)]


def _wait_migrated(api: Api, vm: dict[str, Any]) -> dict[str, Any]:
    return api.wait("the migration's end",
                    lambda: (info := api.info(vm))["migration"]["state"] != "migrating"
                    and info)


def _carries_on(api: Api, vm: dict[str, Any], after: int) -> bytes:
    out = api.wait_log(vm, rb"pass %d\n" % (after + 64))
    assert b"MISMATCH" not in out
    return out


def test_guest_migrates_there_and_back_and_goes_on(pair: tuple[Vmm, Vmm]) -> None:
    a, b = pair
    vm = a.api.create("migrant", name="mover", engine="translate")
    last = _passes(a.api.wait_log(vm, rb"pass 64\n"))[-1]

    done = a.cli("migrate", "mover", "--to", b.tcp, "--dest-token-file", str(b.token_file),
                 "--max-downtime", "300")
    assert done.returncode == 0, done.stderr
    assert re.search(r"Migrated mover to tcp:.*: downtime \d+ ms, total [\d.]+ s", done.stderr)
    a.stop()  # the record keeps it listed, migrated, across a restart of its old VMM
    a.start()
    left = a.api.info(vm)
    assert left["state"] == "migrated" and left["migration"]["state"] == "done"
    assert left["migration"]["to"] == b.tcp and left["migration"]["rounds"] >= 1
    arrived = b.api.info(vm)
    assert (arrived["id"], arrived["name"], arrived["state"]) == (vm["id"], "mover", "running")
    assert arrived["config"] == left["config"]
    out = _carries_on(b.api, vm, last)
    assert out.startswith(a.api.log(vm)[:1000])  # the console's history came along
    last = _passes(out)[-1]

    b.api("migrate", vm["id"], str(a.socket), max_downtime=0.3)  # back, by the API
    info = _wait_migrated(b.api, vm)
    assert info["migration"]["state"] == "done", info["migration"]
    assert info["migration"]["downtime_ms"] > 0 and info["migration"]["bytes_sent"] > 8 << 20
    back = a.api.wait("the guest back on A", lambda: a.api.info(vm)["state"] == "running")
    assert back
    out = _carries_on(a.api, vm, last)
    passes = _passes(out)
    assert passes == list(range(0, passes[-1] + 1, 16))  # not one pass lost or repeated
    assert a.api.info(vm)["instructions"] > arrived["instructions"]


def test_postcopy_guest_runs_there_at_once_and_goes_on(pair: tuple[Vmm, Vmm]) -> None:
    """--postcopy: the guest runs on the destination after one pass and pulls the pages
    it rewrote since; the source's worker serves them, then ends (migrated)."""
    a, b = pair
    vm = a.api.create("migrant", name="jumper", engine="translate")
    last = _passes(a.api.wait_log(vm, rb"pass 64\n"))[-1]
    done = a.cli("migrate", "jumper", "--to", str(b.socket), "--postcopy")
    assert done.returncode == 0, done.stderr
    info = a.api.info(vm)
    assert info["state"] in ("running", "migrated") and info["migration"]["state"] == "done"
    assert info["migration"]["postcopy_pages"] > 0 and info["migration"]["rounds"] == 0
    assert "postcopy_error" not in info["migration"]
    _carries_on(b.api, vm, last)
    a.api.wait("the source's worker to end", lambda: a.api.info(vm)["state"] == "migrated")


def test_guest_moves_with_a_copy_of_its_disk(pair: tuple[Vmm, Vmm]) -> None:
    """--copy-disks: the guest (scribe) rewrites its disk throughout; the destination
    writes the copy to a new file (--disk-path) and the guest goes on with it, finding
    every block as it left it. A copy never overwrites a file: exit status 2."""
    a, b = pair
    folder = guest("scribe").parent  # B's path policy allows it
    image, copy = folder / "scribe.img", folder / "scribe-copy.img"
    image.write_bytes(b"".join(bytes([0, sector // 8 % 256]) + bytes(510)
                               for sector in range(2048)))
    copy.unlink(missing_ok=True)
    vm = a.api.create("scribe", name="scribe", disks=[{"path": str(image)}])
    a.api.wait_log(vm, rb"disk pass 8\n")
    to = ("--to", b.tcp, "--dest-token-file", str(b.token_file), "--copy-disks")
    refused = a.cli("migrate", "scribe", *to, "--disk-path", str(image))
    assert refused.returncode == 2 and "exists on the destination" in refused.stderr
    assert refused.stderr.count("\n") == 1 and a.api.info(vm)["state"] == "running"
    done = a.cli("migrate", "scribe", *to, "--disk-path", str(copy))
    assert done.returncode == 0, done.stderr
    last = int(re.findall(rb"disk pass (\d+)", a.api.log(vm))[-1])
    assert b.api.info(vm)["config"]["disks"][0]["path"] == str(copy)
    out = b.api.wait_log(vm, rb"disk pass %d\n" % (last + 8))
    assert b"MISMATCH" not in out and b"IOERR" not in out


def test_bad_requests_are_refused_with_status_2_and_change_nothing(
        pair: tuple[Vmm, Vmm], tmp_path: Path) -> None:
    a, b = pair
    vm = a.api.create("migrant", name="stayer")
    a.api.wait_log(vm, rb"pass 16\n")
    paused = a.api.create("idle", name="sleeper")
    a.api("action", paused["id"], "pause")
    cases = [
        (("nosuchvm", "--to", str(b.socket)), "no such VM"),
        (("stayer", "--to", str(a.socket)), "the destination is the source itself"),
        (("stayer", "--to", str(tmp_path / "nobody.sock")), "cannot reach the VMM"),
        (("stayer", "--to", b.tcp), "needs its API token"),
        (("sleeper", "--to", str(b.socket)), "it is paused"),
        (("stayer", "--to", str(b.socket), "--copy-disks"), "no writable disk to copy"),
        (("stayer", "--to", str(b.socket), "--disk-path", "/x.img"), "goes with copy_disks"),
        (("stayer", "--to", str(b.socket), "--max-bandwidth", "1K"), "at least 4096"),
    ]
    for args, message in cases:
        refused = a.cli("migrate", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr
    assert a.api.info(vm)["state"] == "running" and a.api.info(vm)["migration"] is None
    assert b.api("list") == []
    with pytest.raises(ApiError, match="unknown field"):
        a.api("migrate", vm["id"], str(b.socket), speed=1)


def test_destination_killed_mid_migration_leaves_the_source_running(
        pair: tuple[Vmm, Vmm]) -> None:
    a, b = pair
    vm = a.api.create("migrant", name="survivor")
    last = _passes(a.api.wait_log(vm, rb"pass 16\n"))[-1]
    # A budget the guest, which writes all its 8 MiB every pass, never meets, and a link
    # whose first pass alone takes half an hour: the migration is still copying when the
    # destination's worker is stopped, then killed. (Without the bandwidth cap the source,
    # throttling the guest down to its least share, could hand over before the test
    # stopped the worker on a loaded host.)
    a.api("migrate", vm["id"], str(b.socket), max_downtime=1e-9, max_bandwidth=4096)
    pid = b.api.wait("the destination's worker",
                     lambda: [v["pid"] for v in b.api("list") if v["pid"]])[0]
    os.kill(pid, signal.SIGSTOP)
    assert a.api.info(vm)["migration"]["state"] == "migrating"
    os.kill(pid, signal.SIGKILL)
    info = _wait_migrated(a.api, vm)
    assert info["migration"]["state"] == "failed"
    assert "destination" in info["migration"]["error"]
    assert info["state"] == "running"
    _carries_on(a.api, vm, last)
    b.api.wait("the destination to drop it", lambda: b.api("list") == [])
    time.sleep(0.5)
    assert a.api.info(vm)["state"] == "running"


@pytest.mark.boots_linux
def test_linux_guest_migrates_there_and_back_with_its_processes(
        pair: tuple[Vmm, Vmm]) -> None:
    """The bundled Linux (one boot): a shell loop printing a counter, and a sleeping
    process, both started before the migrations, go on after A -> B (pre-copy) -> A
    (post-copy: Linux runs on A while it pulls the pages it wrote since the first pass).
    A third process keeps writing memory, so that some pages are written during the
    first pass whatever its length (an idle, tickless guest may write none in 0.1 s)."""
    a, b = pair
    vm = a.api("create", kernel=str(images.KERNEL), initrd=str(images.INITRD), mem=128 << 20,
               name="linux")
    a.api.wait_log(vm, rb"popek guest: Linux[^#]*# ")  # typed at the shell's prompt
    a.api.type_line(vm, b"sleep 100000 & echo sleeper-$!; (n=0; while true; do n=$((n+1)); "
                        b"done) & (i=0; while true; do echo count-$i; i=$((i+1)); sleep 0.2; "
                        b"done) &\n")
    sleeper = re.search(rb"sleeper-(\d+)", a.api.wait_log(vm, rb"sleeper-\d+"))[1]
    counts = a.api.wait_log(vm, rb"count-5\r?\n")
    for source, dest, to, postcopy in ((a, b, str(b.socket), False),
                                       (b, a, str(a.socket), True)):
        last = int(re.findall(rb"count-(\d+)", counts)[-1])
        source.api("migrate", vm["id"], to, postcopy=postcopy)
        info = _wait_migrated(source.api, vm)
        assert info["migration"]["state"] == "done", info["migration"]
        assert info["migration"]["bytes_sent"] < 128 << 20  # touched pages only
        assert (info["migration"]["postcopy_pages"] > 0) == postcopy
        counts = dest.api.wait_log(vm, rb"count-%d\r?\n" % (last + 5))
    out = a.api.type_line(vm, b"kill -0 %s && echo still-$((1+1))-alive\n" % sleeper)
    a.api.wait_log(vm, rb"still-2-alive")
    numbers = [int(n) for n in re.findall(rb"count-(\d+)\r?\n", a.api.log(vm))]
    assert numbers == list(range(len(numbers))), numbers  # no gap, no repeat
    assert out
