"""The VMM's virtual networks through the REST API, with tiny bare-metal guests.

A guest here never touches its NIC; what is checked is the VMM's bookkeeping: networks
created, listed, described and removed, requests refused with the right status, and a
VM's ports joining its switches when it starts, leaving when it stops.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from popek.api.client import ApiError
from tests.test_vmm_service import MEM, STOP_GUESTS, Api
from tests.vmm_guests import guest
from tests.vmm_process import wait_listening


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    where = tmp_path_factory.mktemp("vmm-networks")
    sock = where / "vmm.sock"
    serve = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                              "--state-dir", str(where / "state"), *STOP_GUESTS],
                             stderr=subprocess.DEVNULL)
    try:
        api = Api(sock)
        wait_listening(sock, serve)
        yield api
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)


def _refused(api: Api, status: int, method: str, *args: object, **kw: object) -> str:
    with pytest.raises(ApiError) as refused:
        api(method, *args, **kw)
    assert refused.value.status == status, str(refused.value)
    return str(refused.value)


def test_networks_are_created_listed_described_and_removed(api: Api) -> None:
    lan = api("create_network", "t-lan")
    assert (lan["subnet"], lan["gateway"], lan["nat"]) == \
        ("192.168.122.0/24", "192.168.122.1", False)
    other = api("create_network", "t-other")
    assert other["subnet"] != lan["subnet"]  # the next free /24
    plain = api("create_network", "t-plain", subnet=None)
    assert plain["subnet"] is None and plain["gateway"] is None and plain["leases"] == []
    mine = api("create_network", "t-mine", subnet="10.20.30.0/24")
    assert mine["gateway"] == "10.20.30.1"
    listed = {n["name"]: n for n in api("networks")}
    assert {"t-lan", "t-other", "t-plain", "t-mine"} <= set(listed)
    assert api("network", "t-mine") == listed["t-mine"]
    for name in ("t-lan", "t-other", "t-plain", "t-mine"):
        api("delete_network", name)
    assert not {"t-lan", "t-other", "t-plain", "t-mine"} & {n["name"] for n in api("networks")}


@pytest.mark.parametrize(("options", "status", "words"), [
    ({"name": "bad name"}, 400, "'name'"),
    ({"name": "n", "subnet": "10.0.0.0/30"}, 400, "prefix"),
    ({"name": "n", "subnet": "10.0.0.1/24"}, 400, "host bits"),
    ({"name": "n", "subnet": "fe80::/64"}, 400, "CIDR"),
    ({"name": "n", "subnet": None, "nat": True}, 400, "NAT needs a subnet"),
    ({"name": "n", "nat": "yes"}, 400, "'nat'"),
    ({"name": "n", "vlan": 3}, 400, "vlan"),
])
def test_impossible_networks_are_refused(api: Api, options: dict[str, object], status: int,
                                         words: str) -> None:
    name = options.pop("name")
    assert words in _refused(api, status, "create_network", name, **options)
    assert "n" not in {n["name"] for n in api("networks")}


def test_names_are_unique_and_unknown_ones_are_404(api: Api) -> None:
    api("create_network", "t-dup")
    try:
        assert "exists" in _refused(api, 409, "create_network", "t-dup")
    finally:
        api("delete_network", "t-dup")
    _refused(api, 404, "network", "t-dup")
    _refused(api, 404, "delete_network", "t-dup")


def test_a_vms_ports_join_at_start_and_leave_when_it_stops(api: Api) -> None:
    api("create_network", "t-a")
    api("create_network", "t-b", subnet=None)
    try:
        assert "nowhere" in _refused(api, 400, "create", kernel=str(guest("idle")), mem=MEM,
                                     nics=[{"type": "switch", "switch": "nowhere"}])
        vm = api("create", name="t-vm", kernel=str(guest("idle")), mem=MEM,
                 nics=[{"type": "switch", "switch": "t-a"},
                       {"type": "switch", "switch": "t-b"},
                       {"type": "switch", "switch": "t-a"}])
        macs = [nic["mac"] for nic in vm["config"]["nics"]]
        assert len(set(macs)) == 3
        ports = api("network", "t-a")["ports"]
        assert [(p["vm"], p["vm_name"], p["nic"], p["mac"], p["state"]) for p in ports] == \
            [(vm["id"], "t-vm", 0, macs[0], "up"), (vm["id"], "t-vm", 2, macs[2], "up")]
        assert [p["nic"] for p in api("network", "t-b")["ports"]] == [1]
        assert "t-vm" in _refused(api, 409, "delete_network", "t-a")
        api("action", vm["id"], "kill")
        api.wait("the ports to leave", lambda: not api("network", "t-a")["ports"] and
                 not api("network", "t-b")["ports"])
    finally:
        for vm in api("list"):
            api("delete", vm["id"])
        api("delete_network", "t-a")
        api("delete_network", "t-b")
