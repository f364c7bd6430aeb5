"""Guests outlive their VMM: a VMM that stops (SIGTERM, SIGINT) or dies (SIGKILL) leaves
its guests running, and the next ``popek serve`` on the same socket and state directory
adopts them, as libvirt's guests outlive ``libvirtd``.

Each test runs VMMs one after another on a directory of its own. Guests are the tiny
bare-metal programs of tests/vmm_guests.py. Thresholds are generous: CI machines are
small and busy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from popek.api.client import ApiError, Client
from popek.vmm import procstat
from tests.test_vmm_service import PATIENCE, Api, send_frame

EXIT_WITHIN = 5.0  # seconds a VMM may take to exit after SIGTERM


class Serve:
    """``popek serve`` processes, one at a time, on one socket and state directory."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.api = Api(home / "vmm.sock")
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self, *flags: str) -> Api:
        self.runs += 1
        log = self.home / f"vmm{self.runs}.log"
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(  # a session of its own, as a service has
                [sys.executable, "-m", "popek", "serve", "--socket", str(self.api.socket_path),
                 "--state-dir", str(self.home / "state"), *flags], stderr=stderr,
                start_new_session=True)
        self.api.wait("the VMM to answer", self._answers)
        return self.api

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log()
        try:
            self.api("version")
        except ApiError:
            return False
        return True

    def log(self) -> str:
        return (self.home / f"vmm{self.runs}.log").read_text()

    def stop(self, sig: int = signal.SIGTERM, group: bool = False) -> float:
        """Signal the VMM (``group``: its whole process group, as a terminal's Ctrl-C
        does); returns the seconds it took to exit."""
        start = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=PATIENCE)
        took = time.monotonic() - start
        if sig != signal.SIGKILL:
            assert self.proc.returncode == 0 and "Traceback" not in self.log(), self.log()
        self.proc = None
        return took

    def helpers(self) -> list[int]:
        """The VMM's child processes (its worker fork server, multiprocessing's resource
        tracker): the workers it started are its children too."""
        return [pid for pid in _pids() if procstat.parent(pid) == self.proc.pid]


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that ended may wait for a reaper that never
    comes, in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def _ticks(out: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"tick (\d+)\n", out)]


@pytest.fixture
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """Its VMMs; what they leave running is removed through one last VMM."""
    vmms = Serve(tmp_path_factory.mktemp("outlive"))
    yield vmms
    if vmms.proc is None:
        vmms.start()
    for vm in vmms.api("list"):
        vmms.api("delete", vm["id"])
    vmms.stop()


def test_sigterm_leaves_guests_running_and_a_new_vmm_adopts_them(serve: Serve) -> None:
    api = serve.start()
    counter = api.create("counter", name="counter", cpu_cap=30)  # slow: the history fits
    echo = api.create("echo", name="echo")
    paused = api.create("counter", name="paused")
    api.wait_log(counter, rb"tick 2\n")
    api.wait_log(echo, b"echo ready\n")
    api.wait_log(paused, rb"tick 0\n")
    api("action", paused["id"], "pause")
    helpers = [pid for pid in serve.helpers() if pid not in
               {vm["pid"] for vm in (counter, echo, paused)}]
    assert helpers  # the fork server at least
    before = {vm["name"]: vm for vm in api("list")}
    last_tick = _ticks(api.log(counter))[-1]

    assert serve.stop() < EXIT_WITHIN
    assert all(_running(vm["pid"]) for vm in before.values())
    api.wait("the VMM's helpers to exit", lambda: not any(_running(p) for p in helpers))
    cpu = procstat.cpu_seconds(counter["pid"])
    api.wait("the counter to run without a VMM",
             lambda: procstat.cpu_seconds(counter["pid"]) > cpu + 0.2)

    serve.start()
    after = {vm["name"]: vm for vm in api("list")}
    assert {name: (vm["state"], vm["pid"]) for name, vm in after.items()} == {
        name: (vm["state"], vm["pid"]) for name, vm in before.items()}
    assert after["counter"]["confinement"]["uid"] == before["counter"]["confinement"]["uid"]
    assert after["counter"]["confinement"]["limits"] == \
        before["counter"]["confinement"]["limits"]
    assert after["counter"]["cpu"]["cap_percent"] == 30
    api.wait("the counter's statistics to carry on", lambda: api.info(counter)[
        "instructions"] > before["counter"]["instructions"])
    assert api.info(paused)["instructions"] == before["paused"]["instructions"]
    # The history: what the counter printed before and while no VMM was there, unbroken.
    history = api.log(counter)
    ticks = _ticks(history)
    assert ticks[0] <= last_tick < ticks[-1] and ticks == list(range(ticks[0], ticks[-1] + 1))
    assert api.info(counter)["console"]["bytes"] > before["counter"]["console"]["bytes"]
    assert b"echo ready" in api.log(echo), api.info(echo)

    # Every operation works on adopted guests.
    assert api("action", counter["id"], "pause")["state"] == "paused"
    frozen = api.info(counter)["instructions"]
    time.sleep(0.3)
    assert api.info(counter)["instructions"] == frozen
    assert api("action", counter["id"], "resume")["state"] == "running"
    api("action", paused["id"], "resume")
    api.wait("the paused counter to carry on", lambda: api.info(paused)["instructions"] >
             before["paused"]["instructions"])
    api("action", counter["id"], "pause")
    snap = serve.home / "counter.snap"
    saved = api("snapshot", counter["id"], snap)
    assert api.info(counter)["snapshots"][-1]["path"] == str(snap)
    assert saved["console_bytes"] == api.info(counter)["console"]["bytes"]
    restored = api("restore", snap, name="restored")
    ticks = _ticks(api.log(counter) + api.wait_log(restored, rb"tick \d+\n"))
    assert ticks == list(range(ticks[0], ticks[-1] + 1))
    api("update", counter["id"], cpu_cap=None)
    assert b"echo ready" in api.type_line(echo, b"adopted\n")
    stopped = api("action", echo["id"], "shutdown", timeout=PATIENCE)
    assert stopped["state"] == "stopped" and stopped["exit"] == {"kind": "poweroff", "code": 0}
    assert b"goodbye" in api.log(echo)
    assert api("action", paused["id"], "kill")["state"] == "stopped"
    assert not _running(paused["pid"])


def test_sigkill_of_the_vmm_and_its_fork_server_loses_no_guest(serve: Serve) -> None:
    api = serve.start()
    counter = api.create("counter", name="counter")
    api.wait_log(counter, rb"tick 1\n")
    helpers = [pid for pid in serve.helpers() if pid != counter["pid"]]
    vmm = serve.proc.pid
    serve.stop(signal.SIGKILL, group=True)  # the VMM and its fork server: one group
    api.wait("the VMM and its helpers to die",
             lambda: not any(_running(pid) for pid in [vmm, *helpers]))
    assert _running(counter["pid"])

    serve.start()
    adopted = api.info(counter)
    assert (adopted["state"], adopted["pid"]) == ("running", counter["pid"])
    api.wait("the counter to carry on", lambda: api.info(counter)["instructions"] >
             adopted["instructions"])
    api("action", counter["id"], "kill")


def test_guest_that_powered_off_without_a_vmm_is_listed_stopped_with_its_exit_code(
        serve: Serve) -> None:
    api = serve.start()
    vm = api.create("exit5-later")
    api.wait_log(vm, b"waiting\n")
    serve.stop()
    assert _running(vm["pid"])  # it powers off 3 s of guest time after it started
    api.wait("the guest to power off", lambda: not _running(vm["pid"]))
    serve.start()
    ended = api.info(vm)
    assert ended["state"] == "stopped" and ended["exit"] == {"kind": "poweroff", "code": 5}
    assert b"bye\n" in api.log(vm)  # its last words, printed while no VMM was there
    serve.stop()
    serve.start()  # and the next VMM still knows
    assert api.info(vm)["exit"] == {"kind": "poweroff", "code": 5}
    assert b"bye\n" in api.log(vm)


def test_guest_whose_worker_was_killed_without_a_vmm_is_listed_failed(serve: Serve) -> None:
    api = serve.start()
    vm = api.create("counter")
    api.wait_log(vm, rb"tick 0\n")
    serve.stop(signal.SIGINT, group=True)  # Ctrl-C: it reaches the VMM, not the guests
    assert _running(vm["pid"])
    os.kill(vm["pid"], signal.SIGKILL)
    serve.start()
    failed = api.info(vm)
    assert failed["state"] == "failed" and "without a word" in failed["failure"], failed
    assert "SIGKILL" in failed["failure"]


def test_corrupt_records_are_left_alone_and_fail_no_other_vm(serve: Serve) -> None:
    """Found by the records fuzz target: records like these made every listing of the
    VMs fail (GET /v1/vms, so popek vm ls), or had the VM's directory removed."""
    api = serve.start()
    kept, *spoilt = [api.create("exit7") for _ in range(4)]
    for vm in (kept, *spoilt):
        api.wait("the guest to power off", lambda vm=vm: api.info(vm)["state"] == "stopped")
    serve.stop()
    texts = {}
    for vm, corruption in zip(spoilt, ({"stats": None}, {"limits": []}, {"state": None}),
                              strict=True):
        record = serve.home / "state" / "vms" / vm["id"] / "vm.json"
        texts[record] = json.dumps({**json.loads(record.read_text()), **corruption})
        record.write_text(texts[record])
    serve.start()
    assert [vm["id"] for vm in api("list")] == [kept["id"]]
    for record, text in texts.items():
        assert f"its record {record} is corrupt" in serve.log()
        assert record.read_text() == text  # left for a person to look at


def test_stop_guests_powers_them_off_before_the_vmm_exits(serve: Serve) -> None:
    """Running guests are asked to power off, paused ones resumed to be asked; one that
    never started is killed."""
    api = serve.start("--stop-guests")
    echo, paused = api.create("echo", name="echo"), api.create("echo", name="paused")
    created = api.create("counter", name="created", start=False)
    for vm in (echo, paused):
        api.wait_log(vm, b"echo ready\n")
    api("action", paused["id"], "pause")
    serve.stop()
    assert not any(_running(vm["pid"]) for vm in (echo, paused, created))
    serve.start()
    ended = {vm["name"]: vm for vm in api("list")}
    for vm in (echo, paused):
        assert ended[vm["name"]]["exit"] == {"kind": "poweroff", "code": 0}
        assert b"goodbye" in api.log(vm)
    assert ended["created"]["state"] == "stopped"
    assert ended["created"]["exit"]["kind"] == "killed"


def test_vmm_exits_promptly_with_console_clients_attached(serve: Serve) -> None:
    """One client reads, one never does (its socket fills with a flood of output): the
    VMM closes both and exits within seconds; the guests run on."""
    api = serve.start()
    flood = api.create("flood", cpu_cap=50)
    api.wait_log(flood, b"flood flood")

    async def attach_and_stop() -> tuple[float, Any]:
        async with Client(api.socket_path) as reader, Client(api.socket_path) as stuck, \
                reader.console(flood["id"]) as ws, stuck.console(flood["id"]):
            async def read() -> None:
                async for _ in ws:
                    pass
            reading = asyncio.create_task(read())
            await asyncio.sleep(2)  # the stuck client's socket fills meanwhile
            took = await asyncio.to_thread(serve.stop)
            await reading
            return took, ws.close_code
    took, close_code = asyncio.run(attach_and_stop())
    assert took < EXIT_WITHIN
    assert close_code == aiohttp.WSCloseCode.GOING_AWAY
    assert _running(flood["pid"])


def test_one_vmm_per_state_directory_and_per_socket(serve: Serve, tmp_path: Path) -> None:
    serve.start()
    state = serve.home / "state"
    for flags, message in [
        (["--socket", str(tmp_path / "other.sock"), "--state-dir", str(state)],
         f"another popek serve \\(pid {serve.proc.pid}\\) uses the state directory"),
        (["--socket", str(serve.api.socket_path), "--state-dir", str(tmp_path / "state")],
         "another VMM is listening on"),
    ]:
        second = subprocess.run([sys.executable, "-m", "popek", "serve", *flags],
                                capture_output=True, text=True, timeout=PATIENCE)
        assert second.returncode == 2 and re.search(message, second.stderr), second.stderr
    assert serve.api("version")


def test_worker_admits_no_other_user_while_it_waits_for_a_vmm(serve: Serve) -> None:
    """The worker checks SO_PEERCRED itself: here another user reaches its socket (past
    the owner-only directory, through a descriptor the test opened) and is dropped."""
    api = serve.start()
    vm = api.create("counter")
    api.wait_log(vm, rb"tick 0\n")
    serve.stop()
    worker_socket = serve.home / "state" / "vms" / vm["id"] / "worker.sock"
    worker_socket.chmod(0o666)
    path = os.open(worker_socket, os.O_PATH)
    intruder = subprocess.run(
        [sys.executable, "-c", "import os, socket, sys\n"
         "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
         "s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])\n"
         "print(repr(s.recv(100)))", f"/proc/self/fd/{path}"],
        pass_fds=[path], capture_output=True, text=True, timeout=PATIENCE)
    os.close(path)
    worker_socket.chmod(0o600)
    assert intruder.stdout.strip() == "b''", intruder.stderr  # dropped at once, told nothing
    serve.start()
    assert api.info(vm)["state"] == "running"


def test_guest_nics_outlive_the_vmm(serve: Serve, tmp_path: Path) -> None:
    """A user NIC's passt (its own session) and a NIC's listening socket keep serving the
    guest after Ctrl-C to the VMM's process group; the adopting VMM sees the frames that
    came meanwhile, and when the VM is deleted removes the socket its predecessor bound."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "nic.sock"
    api = serve.start()
    vm = api.create("idle", nics=[
        {"type": "stream", "listen": str(path)},
        {"type": "user", "hostfwd": [{"host_addr": "127.0.0.1", "host_port": port,
                                      "guest_port": 80}]}])
    api.wait_log(vm, b"idle ready")
    serve.stop(signal.SIGINT, group=True)
    socket.create_connection(("127.0.0.1", port), timeout=10).close()  # passt still serves
    peer = send_frame(path)  # to the worker's listening NIC, with no VMM
    serve.start()
    api.wait("the frame to be counted", lambda: api.info(vm)["nics"][0]["rx_not_ready"])
    peer.close()
    api("delete", vm["id"])
    assert not path.exists()
    api.wait("passt to end with its guest", lambda: _refused(port))


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def test_networks_outlive_the_vmm_and_adopted_guests_rejoin_them(serve: Serve) -> None:
    """A new VMM makes the switches of the one before again (same subnet, same gateway MAC,
    so guests' leases and ARP caches stay right) and plugs the adopted guests' switch NICs
    into new ports. A port stays up only while the worker holds its other end: the old
    VMM's went with it, and the new one keeps no copy of the worker's."""
    api = serve.start()
    api("create_network", "lan", subnet="192.168.55.0/24")
    api("create_network", "plain", subnet=None)
    vm = api.create("idle", name="member", nics=[{"type": "switch", "switch": "lan"},
                                                 {"type": "switch", "switch": "plain"}])
    api.wait_log(vm, b"idle ready")
    before = api("network", "lan")
    serve.stop(signal.SIGKILL)
    serve.start()
    time.sleep(1)  # a port whose peer were gone would be down by now
    lan, plain = api("network", "lan"), api("network", "plain")
    assert (lan["subnet"], lan["gateway_mac"]) == ("192.168.55.0/24", before["gateway_mac"])
    assert plain["subnet"] is None
    for network in (lan, plain):
        assert [(p["vm_name"], p["state"]) for p in network["ports"]] == [("member", "up")]
    with pytest.raises(ApiError) as refused:
        api("delete_network", "lan")
    assert refused.value.status == 409
    api("delete", vm["id"])
    assert api("network", "lan")["ports"] == []  # the adopted guest's ports left with it
    api("delete_network", "plain")
    serve.stop()
    serve.start()
    assert [n["name"] for n in api("networks")] == ["lan"]


def test_a_vm_recorded_before_bios_popek_starts_with_popeks_sbi(serve: Serve) -> None:
    """VMMs before configurations had a version recorded "bios": "none" for popek's SBI,
    which is "popek" now that "none" means no firmware, as on QEMU."""
    api = serve.start()
    vm = api.create("exit7", start=False)
    serve.stop()
    record = serve.home / "state" / "vms" / vm["id"] / "vm.json"
    older = json.loads(record.read_text())
    del older["config_version"]
    older["config"]["bios"] = "none"
    record.write_text(json.dumps(older))
    serve.start()
    assert api.info(vm)["config"]["bios"] == "popek"
    api("action", vm["id"], "start")
    api.wait("the guest to power off", lambda: api.info(vm)["state"] == "stopped")
    assert api.info(vm)["exit"] == {"kind": "poweroff", "code": 7}
