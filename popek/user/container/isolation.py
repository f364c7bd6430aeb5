"""What makes a process VM a container: the rules its system calls follow inside one.

A :class:`Process` with a :class:`Container` resolves every path through the
container's :class:`RootFS`, sees pids through its :class:`Namespace`, is uid and gid
0 (the invoking user outside: files that user owns look like root's, others like
nobody's), reaches only loopback addresses when the network is ``none``, and may map
no more guest memory than the limit. Without one, a process sees the host as
``popek exec`` always has.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field

from popek.user.container.namespace import Namespace
from popek.user.container.rootfs import RootFS
from popek.vmm.throttle import CpuCap

OVERFLOW_ID = 65534  # what Linux shows for an id with no mapping in the namespace
SUN_PATH_MAX = 108


@dataclass
class Container:
    rootfs: RootFS
    namespace: Namespace
    network: str = "host"  # or "none": loopback only
    cpu_cap: CpuCap | None = None  # on the container's CPU time, checked by each process
    host_uid: int = field(default_factory=os.getuid)
    host_gid: int = field(default_factory=os.getgid)

    # -- ids ------------------------------------------------------------------------------
    def uid_in(self, host_uid: int) -> int:
        return 0 if host_uid == self.host_uid else OVERFLOW_ID

    def gid_in(self, host_gid: int) -> int:
        return 0 if host_gid == self.host_gid else OVERFLOW_ID

    def uid_out(self, guest_uid: int) -> int:
        """A uid the guest passes (chown): only its own maps; -1 means unchanged."""
        if guest_uid in (0, -1):
            return self.host_uid if guest_uid == 0 else -1
        raise OSError(errno.EINVAL, "uid not mapped in the container")

    def gid_out(self, guest_gid: int) -> int:
        if guest_gid in (0, -1):
            return self.host_gid if guest_gid == 0 else -1
        raise OSError(errno.EINVAL, "gid not mapped in the container")

    # -- /proc -----------------------------------------------------------------------------
    def proc_file(self, host: bytes) -> bytes | None:
        """The text of /proc/N/stat or status (host path ``host``) as the container sees
        it: its pids, its ids, the program's name; None for any other file."""
        parts = host.split(b"/")
        if len(parts) != 4 or parts[1] != b"proc" or not parts[2].isdigit() or \
                parts[3] not in (b"stat", b"status"):
            return None
        with open(host, "rb") as f:
            text = f.read()
        guest = self.namespace.to_guest(int(parts[2]))
        comm = self.namespace.comm(guest)
        if parts[3] == b"stat":
            return self._stat(text, guest, comm)
        return self._status(text, guest, comm)

    def _stat(self, text: bytes, guest: int, comm: bytes) -> bytes:
        fields = text[text.rindex(b")") + 2:].split(b" ")
        for i in (1, 2, 3, 5):  # ppid, pgrp, session, tpgid
            fields[i] = b"%d" % self.namespace.to_guest(int(fields[i]))
        return b"%d (%s) " % (guest, comm) + b" ".join(fields)

    def _status(self, text: bytes, guest: int, comm: bytes) -> bytes:
        lines = []
        for line in text.split(b"\n"):
            key, _, value = line.partition(b":")
            if key == b"Name":
                line = b"Name:\t" + comm
            elif key in (b"Tgid", b"Pid", b"NStgid", b"NSpid"):
                line = key + b":\t%d" % guest
            elif key in (b"PPid", b"NSpgid", b"NSsid"):
                line = key + b":\t%d" % self.namespace.to_guest(int(value.split()[0]))
            elif key in (b"Uid", b"Gid"):
                inside = self.uid_in if key == b"Uid" else self.gid_in
                line = key + b":\t" + b"\t".join(b"%d" % inside(int(v)) for v in value.split())
            lines.append(line)
        return b"\n".join(lines)

    # -- network --------------------------------------------------------------------------
    def sockaddr(self, name: bytes) -> bytes:
        """A guest sockaddr as the host should see it: a Unix socket's path resolved in the
        container, other addresses refused unless loopback when the network is none."""
        if len(name) < 2:
            return name
        family = struct.unpack_from("<H", name)[0]
        if family == socket.AF_UNIX:
            return self._unix_address(name)
        if self.network == "none" and not _is_loopback(family, name):
            raise OSError(errno.ENETUNREACH, "the container has no network")
        return name

    def _unix_address(self, name: bytes) -> bytes:
        path = name[2:].split(b"\0", 1)[0]
        if not path:  # the abstract namespace, shared with the host
            if self.network == "none":
                raise OSError(errno.ECONNREFUSED, "no abstract sockets without a network")
            return name
        host = self.rootfs.resolve(path)
        if len(host) >= SUN_PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "socket path too long on the host")
        return name[:2] + host + b"\0"


def _is_loopback(family: int, name: bytes) -> bool:
    if family == socket.AF_INET and len(name) >= 8:
        return name[4] == 127
    if family == socket.AF_INET6 and len(name) >= 24:
        address = name[8:24]
        return address == socket.inet_pton(socket.AF_INET6, "::1") or \
            (address[:12] == b"\0" * 10 + b"\xff\xff" and address[12] == 127)
    return family not in (socket.AF_INET, socket.AF_INET6)
