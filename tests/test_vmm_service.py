"""The VMM service: many guests in worker processes, driven through the REST API.

One ``popek serve`` runs for the module; every test removes the VMs it made. Guests are
the tiny bare-metal programs of tests/vmm_guests.py, so each boots in milliseconds.
Timing thresholds are generous: CI machines are small and busy.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.api.client import ApiError, Client
from popek.vmm import procstat
from tests.vmm_guests import guest
from tests.vmm_process import wait_listening

MEM = 32 << 20
PATIENCE = 90.0  # seconds before a condition that should hold soon is declared false
# A test's VMM kills its guests as it exits (guests outlive a VMM by default): none is
# left behind, whatever the test did.
STOP_GUESTS = ["--stop-guests", "--stop-timeout", "0"]


class Api:
    """Synchronous access to the test's VMM (one short asyncio run per call)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def __call__(self, method: str, *args: Any, **kw: Any) -> Any:
        async def call() -> Any:
            async with Client(self.socket_path) as client:
                return await getattr(client, method)(*args, **kw)
        return asyncio.run(call())

    def create(self, program: str, **kw: Any) -> dict[str, Any]:
        return self("create", kernel=str(guest(program)), mem=MEM, **kw)

    def log(self, vm: dict[str, Any]) -> bytes:
        return self("console_log", vm["id"])

    def info(self, vm: dict[str, Any]) -> dict[str, Any]:
        return self("info", vm["id"])

    def wait(self, what: str, check: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_log(self, vm: dict[str, Any], pattern: bytes) -> bytes:
        return self.wait(f"{pattern!r} from {vm['name']}",
                         lambda: re.search(pattern, self.log(vm)) and self.log(vm))

    def type_line(self, vm: dict[str, Any], line: bytes) -> bytes:
        """Type ``line`` on the console WebSocket; what it showed until the line came
        back (the scrollback first). A shell's line editor may wrap the echo at the
        terminal's width, so line ends are not compared; and the wait has one deadline,
        as a guest printing on and on would otherwise keep every receive from timing out."""
        async def type_line() -> bytes:
            async with Client(self.socket_path) as client, client.console(vm["id"]) as ws:
                await ws.send_bytes(line)
                seen = b""
                async with asyncio.timeout(PATIENCE):
                    while line.strip() not in seen.replace(b"\r", b"").replace(b"\n", b""):
                        message = await ws.receive()
                        assert isinstance(message.data, bytes), f"the console ended: {message}"
                        seen += message.data
                return seen
        return asyncio.run(type_line())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, int]]:
    sock = tmp_path_factory.mktemp("vmm") / "vmm.sock"
    log = sock.with_name("vmm.log")
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                                 "--state-dir", str(sock.with_name("state")), *STOP_GUESTS],
                                stderr=stderr)
    api = Api(sock)
    try:
        wait_listening(sock, proc)
        yield api, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def api(service: tuple[Api, int]) -> Iterator[Api]:
    api = service[0]
    yield api
    for vm in api("list"):
        api("delete", vm["id"])


def _ticks(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"tick (\d+)\n", out)]


def test_three_guests_run_different_workloads_at_once(api: Api) -> None:
    counter = api.create("counter", name="counter")
    primes = api.create("primes", name="primes")
    echo = api.create("echo", name="echo")
    api.wait_log(counter, rb"tick 3\n")
    api.wait_log(primes, rb"prime \d+\n")
    api.wait_log(echo, b"echo ready")
    before = {vm["name"]: vm["instructions"] for vm in api("list")}
    api.wait("all three to advance", lambda: all(
        vm["instructions"] > before[vm["name"]] and vm["state"] == "running"
        for vm in api("list")))
    pids = {vm["pid"] for vm in api("list")}
    assert len(pids) == 3 and os.getpid() not in pids


def test_console_input_reaches_the_guest_over_the_websocket(api: Api) -> None:
    echo = api.create("echo")
    api.wait_log(echo, b"echo ready\n")
    assert b"echo ready" in api.type_line(echo, b"hello popek\n")  # the scrollback first
    assert b"hello popek" in api.log(echo)


def test_pausing_one_guest_leaves_the_others_running(api: Api) -> None:
    a, b = api.create("counter", name="a"), api.create("counter", name="b")
    api.wait_log(a, rb"tick 1\n")
    paused = api("action", a["id"], "pause")
    assert paused["state"] == "paused"
    frozen_log, frozen = api.log(a), api.info(a)["instructions"]
    b_before = api.info(b)["instructions"]
    api.wait("b to advance", lambda: api.info(b)["instructions"] > b_before + 1_000_000)
    assert api.log(a) == frozen_log
    assert api.info(a)["instructions"] == frozen
    assert api("action", a["id"], "resume")["state"] == "running"
    api.wait("a to carry on", lambda: api.info(a)["instructions"] > frozen)
    ticks = _ticks(api.log(a))
    assert ticks == list(range(len(ticks)))


def test_snapshot_of_a_running_counter_restores_without_repeating_or_skipping(
        api: Api, tmp_path: Path) -> None:
    original = api.create("counter", name="original")
    api.wait_log(original, rb"tick 3\n")
    saved = api("snapshot", original["id"], tmp_path / "counter.snap")
    assert saved["ram_bytes"] >= 1 << 20 and saved["file_bytes"] > MEM
    api("action", original["id"], "kill")
    before = api.log(original)[:saved["console_bytes"]]
    restored = api("restore", tmp_path / "counter.snap", name="restored")
    assert restored["state"] == "running" and restored["source_snapshot"]
    target = _ticks(before)[-1] + 5
    after = api.wait("five more ticks", lambda: (
        out := api.log(restored)) and max(_ticks(out), default=-1) >= target and out)
    ticks = _ticks(before + after)
    assert ticks == list(range(len(ticks)))


def test_diff_snapshot_stores_what_changed_and_restores_over_its_base(
        api: Api, tmp_path: Path) -> None:
    original = api.create("counter", name="differ")
    api.wait_log(original, rb"tick 2\n")
    full = api("snapshot", original["id"], tmp_path / "full.snap")
    api.wait_log(original, rb"tick 6\n")
    diff = api("snapshot", original["id"], tmp_path / "diff.snap", tmp_path / "full.snap")
    assert diff["ram_bytes"] < full["ram_bytes"] // 16  # a stack page or two, not the table
    with pytest.raises(ApiError, match="not the latest snapshot"):
        api("snapshot", original["id"], tmp_path / "x.snap", tmp_path / "full.snap")
    api("action", original["id"], "kill")
    before = api.log(original)[:diff["console_bytes"]]
    restored = api("restore", tmp_path / "diff.snap", name="from-diff")
    after = api.wait("ticks after the diff's", lambda: (
        out := api.log(restored)) and max(_ticks(out), default=-1) >= _ticks(before)[-1] + 3
        and out)
    ticks = _ticks(before + after)
    assert ticks == list(range(len(ticks)))


def test_snapshot_of_a_paused_guest_and_clones_that_share_its_memory(
        api: Api, tmp_path: Path) -> None:
    original = api.create("counter")
    api.wait_log(original, rb"tick 2\n")
    api("action", original["id"], "pause")
    path = tmp_path / "paused.snap"
    api("snapshot", original["id"], path)
    before = api.log(original)
    clones = [api("restore", path, name=f"clone{i}") for i in range(2)]
    for clone in clones:
        after = api.wait_log(clone, rb"tick \d+\n")
        ticks = _ticks(before + after)
        assert ticks == list(range(len(ticks)))
    # Both clones map the snapshot privately (copy-on-write) and share its clean pages:
    # those of the counter's 1 MiB table, which they read from the page cache, or (forked
    # from the VMM's restore template, which read it) leave to the template.
    for clone in clones:
        mapping = _mapping_of(clone["pid"], path)
        assert mapping["perms"] == "rw-p"
        assert mapping["Private_Dirty"] < 1024  # KiB: no clone copied the table
        holder = _mapping_of(api.info(clone)["template_pid"] or clone["pid"], path)
        assert holder["Rss"] >= 1024


def _mapping_of(pid: int, path: Path) -> dict[str, Any]:
    """/proc/PID/smaps entry (sizes in KiB) of the mapping of ``path``."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(str(path)):
            entry: dict[str, Any] = {"perms": line.split()[1]}
            for field in lines[i + 1:]:
                name, _, rest = field.partition(":")
                if not rest.strip().endswith("kB"):
                    break
                entry[name] = int(rest.split()[0])
            return entry
    raise AssertionError(f"{path} is not mapped by {pid}")


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:len(d) // 2], "truncated"),
    (lambda d: d[:5000] + bytes([d[5000] ^ 0xFF]) + d[5001:], "corrupt file"),
    (lambda d: d[:8] + (7).to_bytes(4, "little") + d[12:], "format 7 is newer"),
])
def test_bad_snapshots_are_refused_and_change_nothing(
        api: Api, tmp_path: Path, damage: Callable[[bytes], bytes], message: str) -> None:
    vm = api.create("counter")
    api.wait_log(vm, rb"tick 0\n")
    path = tmp_path / "vm.snap"
    api("snapshot", vm["id"], path)
    path.write_bytes(damage(path.read_bytes()))
    vms_before = [v["id"] for v in api("list")]
    with pytest.raises(ApiError, match=message) as refused:
        api("restore", path)
    assert refused.value.status == 400
    assert [v["id"] for v in api("list")] == vms_before
    assert api.info(vm)["state"] == "running"


def test_killed_worker_fails_its_vm_only(api: Api) -> None:
    victim, bystander = api.create("counter", name="victim"), api.create("counter")
    api.wait_log(victim, rb"tick 0\n")
    os.kill(victim["pid"], signal.SIGKILL)
    failed = api.wait("the victim to fail", lambda: (
        info := api.info(victim))["state"] == "failed" and info)
    assert "signal 9" in failed["failure"]
    before = api.info(bystander)["instructions"]
    api.wait("the bystander to carry on", lambda: api.info(bystander)["instructions"] > before)
    with pytest.raises(ApiError, match="cannot pause"):
        api("action", victim["id"], "pause")


def test_console_flood_costs_the_vmm_little(api: Api, service: tuple[Api, int]) -> None:
    flood = api.create("flood", cpu_cap=50)
    counter = api.create("counter")
    api.wait_log(flood, b"flood flood")
    vmm_before = procstat.cpu_seconds(service[1])
    flood_before = api.info(flood)["console"]["bytes"]
    counter_before = api.info(counter)["instructions"]
    start = time.monotonic()
    time.sleep(3)
    flooded = api.info(flood)["console"]["bytes"] - flood_before
    vmm_share = (procstat.cpu_seconds(service[1]) - vmm_before) / (time.monotonic() - start)
    assert flooded > 10_000
    assert vmm_share < 0.5, f"the VMM used {vmm_share:.0%} of a core relaying the flood"
    assert len(api.log(flood)) <= 256 << 10  # the scrollback stays bounded
    assert api.info(counter)["instructions"] > counter_before


def test_crashing_guest_spins_in_traps_without_harming_anyone(api: Api) -> None:
    crash = api.create("crash")
    api.wait_log(crash, b"crashing")
    info = api.wait("instruction access faults", lambda: (
        i := api.info(crash))["traps"].get("insn_access", 0) > 100 and i)
    assert info["state"] == "running"


def test_guest_feeding_its_devices_garbage_hurts_only_itself(api: Api) -> None:
    garbage, bystander = api.create("garbage"), api.create("counter")
    api.wait("the garbage guest to finish or stop", lambda: (
        b"survived" in api.log(garbage) or api.info(garbage)["state"] != "running"))
    assert api.info(garbage)["state"] != "failed", api.info(garbage)["failure"]
    before = api.info(bystander)["instructions"]
    api.wait("the bystander to carry on", lambda: api.info(bystander)["instructions"] > before)


def test_cpu_cap_holds_a_spinning_guest_to_its_share(api: Api) -> None:
    vm = api.create("spin", cpu_cap=20)
    api.wait_log(vm, b"spinning")
    start, cpu0 = time.monotonic(), procstat.cpu_seconds(vm["pid"])
    time.sleep(4)
    share = (procstat.cpu_seconds(vm["pid"]) - cpu0) / (time.monotonic() - start)
    assert share < 0.3, f"capped at 20% but used {share:.0%}"
    assert api.info(vm)["cpu"]["cap_percent"] == 20
    uncapped = api("update", vm["id"], cpu_cap=None)
    assert uncapped["cpu"]["cap_percent"] is None


def test_weights_share_a_contended_core_in_proportion(api: Api) -> None:
    heavy = api.create("spin", cpu_weight=100)
    light = api.create("spin", cpu_weight=25)  # in cgroups, or niced (needs no privilege)
    core = min(os.sched_getaffinity(0))
    for vm in (heavy, light):
        api.wait_log(vm, b"spinning")
        os.sched_setaffinity(vm["pid"], {core})  # make them contend for one core
    time.sleep(0.5)
    cpu0 = {vm["name"]: procstat.cpu_seconds(vm["pid"]) for vm in (heavy, light)}
    time.sleep(4)
    used = {vm["name"]: procstat.cpu_seconds(vm["pid"]) - cpu0[vm["name"]]
            for vm in (heavy, light)}
    assert used[heavy["name"]] > 2 * used[light["name"]], used


def test_graceful_shutdown_goes_through_the_guest(api: Api) -> None:
    echo = api.create("echo")
    api.wait_log(echo, b"echo ready")
    stopped = api("action", echo["id"], "shutdown", timeout=PATIENCE)
    assert stopped["state"] == "stopped"
    assert stopped["exit"] == {"kind": "poweroff", "code": 0}
    assert b"goodbye" in api.log(echo)


def test_shutdown_kills_a_guest_that_ignores_it(api: Api) -> None:
    spin = api.create("spin")
    api.wait_log(spin, b"spinning")
    stopped = api("action", spin["id"], "shutdown", timeout=0.5)
    assert stopped["state"] == "stopped" and stopped["exit"]["kind"] == "killed"


def test_guest_exit_status_is_reported(api: Api) -> None:
    vm = api.create("exit7")
    done = api.wait("the guest to power off", lambda: (
        info := api.info(vm))["state"] == "stopped" and info)
    assert done["exit"] == {"kind": "poweroff", "code": 7}


def test_bad_requests_are_refused_and_change_nothing(api: Api, tmp_path: Path) -> None:
    for spec, message in [
        ({"kernel": str(tmp_path / "missing")}, "not found"),
        ({"kernel": "relative/Image"}, "absolute"),
        ({"kernel": str(guest("hello")), "cpu_cap": 250}, "cpu_cap"),
        ({"kernel": str(guest("hello")), "mem": 12345}, "impossible"),
        ({"kernel": str(guest("hello")), "colour": "red"}, "unknown field"),
    ]:
        with pytest.raises(ApiError, match=message) as refused:
            api("create", **spec)
        assert refused.value.status == 400
    assert api("list") == []
    with pytest.raises(ApiError, match="no such VM") as missing:
        api("info", "nonexistent")
    assert missing.value.status == 404


def test_guest_that_makes_popek_exceed_the_memory_limit_fails_alone(api: Api) -> None:
    # 16 MiB of code: 4 Mi distinct instructions, whose decoded forms popek keeps
    bomb = api.create("codebomb", mem_overhead=64 << 20)
    bystander = api.create("counter")
    failed = api.wait("the code bomb to fail", lambda: (
        info := api.info(bomb))["state"] == "failed" and info)
    assert "memory limit" in failed["failure"]
    before = api.info(bystander)["instructions"]
    api.wait("the bystander to carry on", lambda: api.info(bystander)["instructions"] > before)


def test_cli_creates_lists_snapshots_and_restores(api: Api, tmp_path: Path) -> None:
    env = {**os.environ, "POPEK_SOCKET": str(api.socket_path)}

    def popek_vm(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "popek", "vm", *args], env=env,
                              capture_output=True, text=True, timeout=PATIENCE)
        assert done.returncode == 0, done.stderr
        return done.stdout
    vm_id = popek_vm("create", "--kernel", str(guest("counter")), "--mem", "32M",
                     "--name", "cli-vm", "--cpu-cap", "80%").strip()
    assert re.fullmatch(r"[0-9a-f]{12}", vm_id)
    listing = popek_vm("ls")
    assert "cli-vm" in listing and "running" in listing and "80%" in listing
    api.wait_log({"id": vm_id, "name": "cli-vm"}, rb"tick \d+\n")
    snap = tmp_path / "cli.snap"
    popek_vm("snapshot", "cli-vm", str(snap))
    clone_ids = popek_vm("restore", str(snap), "--count", "2", "--name", "twin").split()
    assert len(clone_ids) == 2
    assert {"twin-1", "twin-2"} <= {vm["name"] for vm in api("list")}
    assert "instructions" in popek_vm("info", "twin-1")
    assert popek_vm("kill", "cli-vm").strip() == "cli-vm"
    assert "stopped (killed" in popek_vm("ls")


# -- networks: the VMM opens each NIC's host end, the worker only uses it ---------------------
def send_frame(path: Path) -> socket.socket:
    """Connect to a NIC's listening socket and send it one Ethernet frame."""
    frame = b"\xff" * 12 + b"\x88\xb5" + bytes(50)
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(str(path))
    peer.sendall(struct.pack(">I", len(frame)) + frame)
    return peer


def test_a_nic_socket_opened_by_the_vmm_wakes_the_idle_worker(api: Api, tmp_path: Path
                                                              ) -> None:
    """The guest has no driver, so the NIC drops the frame and counts it: proof that the
    VMM's listening socket reached the worker and that its runner woke for the frame."""
    path, pcap = tmp_path / "nic.sock", tmp_path / "nic.pcap"
    vm = api.create("idle", nics=[{"type": "stream", "listen": str(path), "pcap": str(pcap)}])
    api.wait_log(vm, b"idle ready")
    assert re.fullmatch(r"52:54:([0-9a-f]{2}:){3}00", api.info(vm)["config"]["nics"][0]["mac"])
    peer = send_frame(path)
    api.wait("the frame to reach the NIC", lambda: api.info(vm)["nics"][0]["rx_not_ready"])
    peer.close()
    dump = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(pcap)], capture_output=True,
                          text=True, check=True).stdout  # the worker wrote what the VMM opened
    assert "ethertype Unknown (0x88b5), length 64" in dump
    api("delete", vm["id"])
    assert not path.exists()  # the VMM bound it, the VMM removed it


def test_a_restored_nic_gets_its_host_end_opened_again(api: Api, tmp_path: Path) -> None:
    path = tmp_path / "nic.sock"
    vm = api.create("idle", nics=[{"type": "stream", "listen": str(path)}])
    api.wait_log(vm, b"idle ready")
    api("snapshot", vm["id"], tmp_path / "nic.snap")
    api("delete", vm["id"])
    clone = api("restore", tmp_path / "nic.snap")
    assert clone["config"]["nics"][0]["mac"] == vm["config"]["nics"][0]["mac"]
    peer = send_frame(path)
    api.wait("the frame to reach the clone's NIC",
             lambda: api.info(clone)["nics"][0]["rx_not_ready"])
    peer.close()


def test_no_passt_outlives_its_vm(api: Api, service: tuple[Api, int]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vm = api.create("idle", nics=[{"type": "user", "hostfwd": [
        {"host_addr": "127.0.0.1", "host_port": port, "guest_port": 80}]}])
    passt = [pid for pid in _children(service[1]) if _comm(pid).startswith("passt")]
    assert len(passt) == 1
    socket.create_connection(("127.0.0.1", port), timeout=10).close()  # passt forwards it
    api("delete", vm["id"])
    assert _comm(passt[0]) in ("", "<zombie>"), "passt outlived its VM"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10)
    with pytest.raises(ApiError, match="passt failed"):  # the port is the first guest's
        taken = socket.socket()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        try:
            api.create("idle", nics=[{"type": "user", "hostfwd": [
                {"host_addr": "127.0.0.1", "host_port": port, "guest_port": 80}]}])
        finally:
            taken.close()


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _comm(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return "<zombie>" if stat.rsplit(")", 1)[1].split()[0] == "Z" else \
        stat[stat.index("(") + 1:stat.rindex(")")]
