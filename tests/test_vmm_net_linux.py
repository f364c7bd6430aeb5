"""popek's own Linux guests on the VMM's virtual switches, driven through their consoles.

One ``popek serve`` with a switch ``lan`` (DHCP, NAT) and guests ``a`` and ``b`` on it.
A Linux boot is the expensive part, so the two boot at once (64 MiB each) and every
check runs on the same booted guests: DHCP, ping and a file over nc between them, NAT to
the host's loopback, the switch's view of its ports, a network in use that cannot be
removed, and ``b`` saved and restored: the restored guest joins ``lan`` again with its
MAC and address and carries on. At the end the VMM is killed outright: its guests'
passts must end with it, and the next VMM adopts the guests and makes their network
again. Isolation between switches and a flooding port are checked with QEMU's guests on
the same switches (tests/test_net_qemu_guests.py), which boot in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from net_guests import Shell, check_switched_guests, http_server, running

from popek import images
from popek.api.client import ApiError, Client
from tests.test_vmm_service import Api as ServiceApi
from tests.vmm_process import wait_listening

BOOT_PATIENCE = 600.0
FILE_KIB = 128  # busybox nc copies 1 KiB a system call: slow on popek, and enough here


class Api(ServiceApi):
    """The service tests' synchronous API, and typing on a console."""

    def type(self, vm: str, text: str) -> None:
        async def send() -> None:
            async with Client(self.socket_path) as client, \
                    client.console(vm, replay=False) as ws:
                await ws.send_bytes(text.encode())
        asyncio.run(send())


class VmmGuest(Shell):
    """A VM's shell through the VMM's console API."""

    def __init__(self, api: Api, vm: dict[str, Any]) -> None:
        super().__init__()
        self.api = api
        self.name = vm["name"]
        self.id = vm["id"]
        self.mac = vm["config"]["nics"][0]["mac"]

    def type(self, text: str) -> None:
        self.api.type(self.id, text)

    def output(self) -> str:
        return self.api("console_log", self.id).decode(errors="replace")


class Lab:
    api: Api
    a: VmmGuest
    b: VmmGuest
    b2: VmmGuest  # b restored from its snapshot
    a_ip: str
    b_ip: str
    where: Path
    vmm: subprocess.Popen[bytes]

    def start_vmm(self) -> None:
        """A ``popek serve`` on the lab's socket and state directory (the next adopts
        what the one before left running)."""
        sock = self.where / "vmm.sock"
        sock.unlink(missing_ok=True)
        with open(self.where / "vmm.log", "ab") as stderr:
            self.vmm = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket",
                                         str(sock), "--state-dir", str(self.where / "state")],
                                        stderr=stderr)
        wait_listening(sock, self.vmm)
        self.api = Api(sock)


def _boot(api: Api, name: str, switch: str) -> VmmGuest:
    vm = api("create", name=name, kernel=str(images.KERNEL), initrd=str(images.INITRD),
             mem=64 << 20, nics=[{"type": "switch", "switch": switch}])
    return VmmGuest(api, vm)


@pytest.fixture(scope="class")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab()
    lab.where = tmp_path_factory.mktemp("vmm-net")
    workers: set[int] = set()  # guests outlive their VMM: the lab ends them
    lab.start_vmm()
    try:
        lab.api("create_network", "lan", subnet="192.168.77.0/24", nat=True)
        lab.a, lab.b = _boot(lab.api, "a", "lan"), _boot(lab.api, "b", "lan")
        workers |= {vm["pid"] for vm in lab.api("list")}
        for guest in (lab.a, lab.b):
            guest.wait_for("popek guest: Linux", BOOT_PATIENCE)
            guest.ok("dmesg -n 1")
        lab.a_ip, lab.b_ip = lab.a.dhcp(), lab.b.dhcp()
        yield lab
        assert "Traceback" not in (lab.where / "vmm.log").read_text()
    finally:
        if lab.vmm.poll() is None:
            with contextlib.suppress(Exception):
                workers |= {vm["pid"] for vm in lab.api("list") if vm["pid"]}
        lab.vmm.kill()
        lab.vmm.wait(timeout=60)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.boots_linux
class TestPopekGuestsOnSwitches:
    def test_guests_on_one_switch_talk(self, lab: Lab) -> None:
        assert lab.a_ip != lab.b_ip
        check_switched_guests(lab.a, lab.b, lab.a_ip, lab.b_ip, kib=FILE_KIB)
        lan = lab.api("network", "lan")
        ports = {p["vm_name"]: p for p in lan["ports"]}
        assert set(ports) == {"a", "b"}
        assert ports["a"]["mac"] == lab.a.mac and ports["a"]["learned"] == [lab.a.mac]
        assert ports["b"]["counters"]["bytes_in"] > FILE_KIB << 10
        leases = {x["mac"]: x["address"] for x in lan["leases"]}
        assert leases == {lab.a.mac: lab.a_ip, lab.b.mac: lab.b_ip}

    def test_nat_reaches_the_hosts_loopback_through_the_gateway(self, lab: Lab) -> None:
        with http_server() as (port, page):
            out = lab.a.ok(f"wget -q -O - http://192.168.77.1:{port}/page | sha256sum")
        assert out.split()[0] == hashlib.sha256(page).hexdigest()
        uplinks = lab.api("network", "lan")["uplinks"]
        assert [(u["mac"], u["address"]) for u in uplinks] == [(lab.a.mac, lab.a_ip)]

    def test_a_network_in_use_stays_and_a_missing_one_is_refused(self, lab: Lab) -> None:
        with pytest.raises(ApiError) as refused:
            lab.api("delete_network", "lan")
        assert refused.value.status == 409 and "a, b" in str(refused.value)
        with pytest.raises(ApiError) as missing:
            lab.api("create", kernel=str(images.KERNEL_SMP), mem=64 << 20,
                    nics=[{"type": "switch", "switch": "nowhere"}])
        assert missing.value.status == 400 and "nowhere" in str(missing.value)

    def test_a_restored_guest_rejoins_its_switch_with_its_address(self, lab: Lab) -> None:
        snap = lab.where / "b.snap"
        lab.api("action", lab.b.id, "pause")
        lab.api("snapshot", lab.b.id, snap)
        lab.api("delete", lab.b.id)
        ports = lab.api("network", "lan")["ports"]
        assert [p["vm_name"] for p in ports] == ["a"]  # b's port left with b
        restored = lab.api("restore", snap, name="b2")
        lab.b2 = b2 = VmmGuest(lab.api, restored)
        assert b2.mac == lab.b.mac
        b2.ok(f"ping -c 2 -W 5 {lab.a_ip}")
        lab.a.ok(f"ping -c 2 -W 5 {lab.b_ip}")
        ports = {p["vm_name"]: p for p in lab.api("network", "lan")["ports"]}
        assert ports["b2"]["mac"] == lab.b.mac and ports["b2"]["learned"] == [lab.b.mac]

    def test_a_new_vmm_adopts_the_guests_on_their_network(self, lab: Lab) -> None:
        """The VMM is killed outright: its NAT passts end with it (SIGKILL leaves it no
        say), its guests do not. The next VMM on the state directory makes ``lan`` again
        with its leases and plugs the guests in: they talk on, and NAT starts anew."""
        before = lab.api("network", "lan")
        passts = [u["pid"] for u in before["uplinks"]]
        assert passts  # the NAT test started one
        lab.vmm.send_signal(signal.SIGKILL)
        lab.vmm.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(running(pid) for pid in passts):
            assert time.monotonic() < deadline, "a passt outlived the VMM"
            time.sleep(0.1)
        lab.start_vmm()
        for guest in (lab.a, lab.b2):
            guest.api = lab.api
        lab.a.ok(f"ping -c 2 -W 5 {lab.b_ip}")
        lab.b2.ok(f"ping -c 2 -W 5 {lab.a_ip}")
        after = lab.api("network", "lan")
        assert after["gateway_mac"] == before["gateway_mac"]
        assert after["leases"] == before["leases"]
        assert {p["vm_name"] for p in after["ports"]} == {"a", "b2"}
        with http_server() as (port, page):
            out = lab.b2.ok(f"wget -q -O - http://192.168.77.1:{port}/page | sha256sum")
        assert out.split()[0] == hashlib.sha256(page).hexdigest()
        uplinks = lab.api("network", "lan")["uplinks"]
        assert [u["mac"] for u in uplinks] == [lab.b.mac] and uplinks[0]["pid"] not in passts
