"""The virtual networks of one VMM: named switches (``popek net``, ``--nic switch=NAME``).

A switch lives in the VMM's event loop (:mod:`popek.net.switch`). A VM's NIC on a switch
is a socket pair: the VMM keeps one end as a port of the switch and hands the other to
the VM's worker as the NIC's host end, so a worker reaches the network only through the
switch the VMM chose for it and no socket file exists that anything else could open.
A VM's ports leave their switches when it stops; a VM restored from a snapshot gets new
ports on the switches its configuration names, with the same MACs (and so, by DHCP, the
same addresses). Clones restored from one snapshot therefore share a MAC and an address,
as clones of a real machine do: put them on different switches.

A switch has a subnet unless asked not to: by default the first free /24 from
192.168.122.0/24 up (libvirt's default network), skipping the subnets of this VMM's other
switches and of the host's routes, so that the gateway's address never hides a host
network from NAT guests. With a subnet the switch serves DHCP; ``subnet: null`` makes a
plain Ethernet segment whose guests configure themselves.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from popek.machine.config import MachineConfig
from popek.net.gateway import Gateway, check_subnet
from popek.net.nat import NatUnavailable, check_available
from popek.net.packets import mac_text
from popek.net.switch import Switch
from popek.vmm import statedir
from popek.vmm.errors import BadRequest, Conflict, NotFound

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
AUTO = "auto"
FIRST_AUTO = 122  # 192.168.122.0/24 first, as libvirt's default network
_FIELDS = {"name", "subnet", "nat"}
FILE = "networks.json"
FORMAT = 1
_PLAIN = {"subnet": None, "gateway": None, "gateway_mac": None, "dns": None, "nat": False,
          "leases": [], "uplinks": []}


class Networks:
    """The switches, by name; every public method is one API operation or a VM's hook."""

    def __init__(self, state_dir: Path | None = None) -> None:
        """``state_dir``: where the definitions are kept (None: nowhere, as for a switch
        host of the tests')."""
        self.switches: dict[str, Switch] = {}
        self._file = state_dir / FILE if state_dir is not None else None

    # -- the API ------------------------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> Switch:
        unknown = set(body) - _FIELDS
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        name, subnet, nat = body.get("name"), body.get("subnet", AUTO), body.get("nat", False)
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise BadRequest("'name' must be 1 to 32 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if name in self.switches:
            raise Conflict(f"network {name} exists")
        if not isinstance(nat, bool):
            raise BadRequest("'nat' must be true or false")
        if subnet is not None and not isinstance(subnet, str):
            raise BadRequest("'subnet' must be a CIDR such as 192.168.122.0/24, \"auto\" "
                             "or null")
        if nat and subnet is None:
            raise BadRequest("NAT needs a subnet: the guests' addresses come from its DHCP")
        if nat:
            try:
                check_available()
            except NatUnavailable as err:
                raise BadRequest(str(err)) from None
        try:
            network = None if subnet is None else \
                self._free_subnet() if subnet == AUTO else check_subnet(subnet)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        switch = self._make(name, network, nat)
        self.save()
        return switch

    def _make(self, name: str, subnet: IPv4Network | None, nat: bool,
              gateway_mac: bytes | None = None) -> Switch:
        switch = Switch(name)
        if subnet is not None:
            gateway = Gateway(subnet, nat, switch.port_of, gateway_mac)
            gateway.dhcp.on_bound = self.save
            switch.services = gateway
        self.switches[name] = switch
        return switch

    # -- kept in the state directory ----------------------------------------------------------
    def save(self) -> None:
        if self._file is None:
            return
        networks = []
        for name, switch in self.switches.items():
            gateway = switch.services
            networks.append({"name": name} if not isinstance(gateway, Gateway) else {
                "name": name, "subnet": str(gateway.subnet), "nat": gateway.nat is not None,
                "gateway_mac": mac_text(gateway.mac), "leases": gateway.dhcp.info()})
        statedir.write_atomic(self._file, json.dumps({"format": FORMAT, "networks": networks},
                                                     indent=1).encode())

    def restore(self) -> None:
        """The networks a VMM before this one kept; one that cannot be made again is left
        out, with a warning."""
        if self._file is None or not self._file.exists():
            return
        try:
            kept = json.loads(self._file.read_bytes())
            if kept.get("format") != FORMAT:
                raise ValueError(f"not of format {FORMAT}")
            networks = list(kept["networks"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            _warn(f"the networks in {self._file} cannot be read ({err}); none kept")
            return
        for net in networks:
            try:
                self._restore(net)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                _warn(f"network {net.get('name') if isinstance(net, dict) else net!r} "
                      f"cannot be made again ({err}); left out")

    def _restore(self, net: dict[str, Any]) -> None:
        name = net["name"]
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in self.switches:
            raise ValueError(f"bad or repeated name {name!r}")
        subnet = net.get("subnet")
        nat = bool(net.get("nat"))
        if nat:
            try:
                check_available()
            except NatUnavailable as err:
                _warn(f"network {name}: {err}; kept without NAT")
                nat = False
        mac = net.get("gateway_mac")
        switch = self._make(name, check_subnet(subnet) if subnet else None, nat,
                            bytes.fromhex(mac.replace(":", "")) if mac else None)
        if isinstance(switch.services, Gateway):
            switch.services.dhcp.restore(net.get("leases", []))

    def get(self, name: str) -> Switch:
        switch = self.switches.get(name)
        if switch is None:
            raise NotFound(f"no such network: {name}")
        return switch

    def list(self) -> list[dict[str, Any]]:
        return [self.info(name) for name in self.switches]

    def info(self, name: str) -> dict[str, Any]:
        return {**_PLAIN, **self.get(name).info()}

    async def delete(self, name: str) -> None:
        switch = self.get(name)
        vms = sorted({p.label.get("vm_name", "?") for p in switch.ports})
        if vms:
            raise Conflict(f"network {name} has VMs attached: {', '.join(vms)}")
        del self.switches[name]
        self.save()
        await switch.close()

    async def close(self) -> None:
        """The VMM is going away: every switch and every passt with it."""
        for switch in self.switches.values():
            await switch.close()
        self.switches.clear()

    # -- VMs ----------------------------------------------------------------------------------
    def check(self, config: MachineConfig) -> None:
        """BadRequest naming the first switch ``config`` wants that does not exist."""
        for nic in config.nics:
            if nic.type == "switch" and nic.switch not in self.switches:
                raise BadRequest(f"no such network: {nic.switch} (create it with: popek net "
                                 f"create {nic.switch})")

    def connect(self, vm_id: str, vm_name: str, config: MachineConfig) -> dict[int, socket.socket]:
        """A port on its switch for each of the VM's switch NICs: the worker's ends, by NIC
        index (the NICs have their MACs already)."""
        self.check(config)
        ends = {}
        for index, nic in enumerate(config.nics):
            if nic.type == "switch":
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                self.switches[nic.switch].attach(ours, vm=vm_id, vm_name=vm_name, nic=index,
                                                 mac=nic.mac)
                ends[index] = theirs
        return ends

    def disconnect(self, vm_id: str) -> None:
        """The VM stopped: its ports leave their switches."""
        for switch in self.switches.values():
            for port in [p for p in switch.ports if p.label.get("vm") == vm_id]:
                switch.detach(port)

    def _free_subnet(self) -> IPv4Network:
        taken = [s.services.subnet for s in self.switches.values() if s.services is not None]
        taken += host_networks()
        for third in [*range(FIRST_AUTO, 256), *range(FIRST_AUTO)]:
            candidate = IPv4Network(f"192.168.{third}.0/24")
            if not any(candidate.overlaps(net) for net in taken):
                return candidate
        raise ValueError("no free 192.168.N.0/24 is left: give a subnet")


def _warn(message: str) -> None:
    print(f"popek VMM: warning: {message}", file=sys.stderr)


def host_networks() -> list[IPv4Network]:
    """The IPv4 networks the host routes to (its own LANs and their routes), from
    /proc/net/route; the default route is left out."""
    networks = []
    try:
        with open("/proc/net/route") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) < 8:
                    continue
                dest, mask = (IPv4Address(int(f, 16).to_bytes(4, "little"))
                              for f in (fields[1], fields[7]))
                if int(mask):
                    networks.append(IPv4Network(f"{dest}/{mask}", strict=False))
    except (OSError, ValueError):
        pass
    return networks
