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

import re
import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from popek.machine.config import MachineConfig
from popek.net.gateway import Gateway, check_subnet
from popek.net.nat import NatUnavailable, check_available
from popek.net.switch import Switch
from popek.vmm.errors import BadRequest, Conflict, NotFound

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
AUTO = "auto"
FIRST_AUTO = 122  # 192.168.122.0/24 first, as libvirt's default network
_FIELDS = {"name", "subnet", "nat"}
_PLAIN = {"subnet": None, "gateway": None, "gateway_mac": None, "dns": None, "nat": False,
          "leases": [], "uplinks": []}


class Networks:
    """The switches, by name; every public method is one API operation or a VM's hook."""

    def __init__(self) -> None:
        self.switches: dict[str, Switch] = {}

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
        switch = Switch(name)
        if subnet is not None:
            try:
                network = self._free_subnet() if subnet == AUTO else check_subnet(subnet)
            except ValueError as err:
                raise BadRequest(str(err)) from None
            switch.services = Gateway(network, nat, switch.port_of)
        self.switches[name] = switch
        return switch

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
