"""Opening a NIC's host end, kept apart from using it.

Whoever may touch the host opens the end (:func:`open_nic`): spawns passt, connects,
binds or listens, creates the capture file. What it gets is a :class:`HostEnd`, a few
descriptors that can travel to another process (a VMM worker, which may open nothing
itself: multiprocessing passes them by SCM_RIGHTS, as it passes a worker its channel)
and become a :class:`~popek.net.backend.NetBackend` there (:meth:`HostEnd.backend`).
``popek run`` does both in one process. A connected stream socket is a complete host end
(``HostEnd("stream", sock)``): that is all a virtual switch port has to produce.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
from dataclasses import dataclass, field
from multiprocessing import reduction
from typing import Any

from popek.machine.config import ConfigError, NicSpec, is_inet_address
from popek.net import passt
from popek.net.backend import NetBackend
from popek.net.dgram import DgramBackend
from popek.net.pcap import CapturedBackend, PcapWriter
from popek.net.stream import StreamBackend, StreamListener

KINDS = ("stream", "listen", "dgram")


@dataclass
class HostEnd:
    """One NIC's host end, open: ``stream`` a connected stream socket, ``listen`` a
    listening one (one peer at a time), ``dgram`` a bound datagram socket (``remote`` is
    where to send when it is not connected); ``pcap`` a capture file's descriptor."""

    kind: str
    sock: socket.socket
    remote: Any = None
    pcap: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"host end kind {self.kind!r} is not one of {KINDS}")

    def backend(self) -> NetBackend:
        """The end as the NIC uses it; the backend owns the descriptors from now on."""
        pcap, self.pcap = self.pcap, None
        if self.kind == "stream":
            inner: NetBackend = StreamBackend(self.sock)
        elif self.kind == "listen":
            inner = StreamListener(self.sock)
        else:
            inner = DgramBackend(self.sock, self.remote)
        return inner if pcap is None else CapturedBackend(inner, PcapWriter(pcap))

    def close(self) -> None:
        """Close this process's copies (the VMM's, once a worker holds its own)."""
        self.sock.close()
        if self.pcap is not None:
            os.close(self.pcap)
            self.pcap = None

    def __reduce__(self) -> tuple[Any, ...]:
        # The socket pickles itself for multiprocessing; a bare descriptor number would
        # mean nothing in the other process, so the capture file's travels the same way.
        pcap = reduction.DupFd(self.pcap) if self.pcap is not None else None
        return _received_end, (self.kind, self.sock, self.remote, pcap)


def _received_end(kind: str, sock: socket.socket, remote: Any, pcap: Any) -> HostEnd:
    return HostEnd(kind, sock, remote, pcap.detach() if pcap is not None else None)


@dataclass
class OpenedNic:
    """A host end and what stays with the process that opened it: the passt serving it,
    and the Unix socket paths it bound (removed when the NIC is done)."""

    end: HostEnd | None = None
    passt: subprocess.Popen[bytes] | None = None
    paths: list[str] = field(default_factory=list)

    def close(self) -> None:
        """After the guest is gone: passt exits once every copy of its socket is closed
        (waited for, killed if it lingers), and bound paths are removed."""
        if self.end is not None:
            self.end.close()
        if self.passt is not None:
            passt.stop(self.passt)
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(path)


def open_nic(nic: NicSpec, mac: str, port: socket.socket | None = None) -> OpenedNic:
    """Open ``nic``'s host end; ConfigError (one line) if it cannot be. A ``switch`` NIC's
    end is ``port``, the socket its virtual switch made for it (popek serve only)."""
    opened = OpenedNic()
    try:
        opened.end = HostEnd("stream", port) if nic.type == "switch" and port else \
            _open_end(nic, mac, opened)
        if nic.pcap is not None:
            opened.end.pcap = _capture_file(nic.pcap)
    except OSError as err:
        opened.close()
        raise ConfigError(f"--nic {nic.type}: {_describe(err)}") from None
    except ConfigError:
        opened.close()
        raise
    return opened


def _capture_file(path: os.PathLike[str]) -> int:
    """A regular file, created or emptied. ``O_NONBLOCK``: a FIFO in its place cannot
    stall the opener (the VMM included)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"pcap={path}: not a regular file")
    os.ftruncate(fd, 0)
    os.set_blocking(fd, True)
    return fd


def _open_end(nic: NicSpec, mac: str, opened: OpenedNic) -> HostEnd:
    if nic.type == "user":
        sock, opened.passt = passt.start(nic, mac)
        return HostEnd("stream", sock)
    if nic.type == "stream" and nic.connect:
        return HostEnd("stream", _connected(nic.connect))
    if nic.type == "stream":
        return HostEnd("listen", _listening(nic.listen, opened.paths))
    if nic.type == "dgram":
        return _datagram(nic.local, nic.remote, opened.paths)
    raise ConfigError(f"--nic switch={nic.switch}: virtual switches belong to popek serve "
                      "(popek vm create --nic switch=NAME)")


def open_nics(nics: list[NicSpec], macs: list[str],
              ports: dict[int, socket.socket] | None = None) -> list[OpenedNic]:
    """Every NIC's host end, or none (what was opened is closed again) and ConfigError.
    ``ports``: the switch NICs' sockets, by index."""
    opened: list[OpenedNic] = []
    try:
        for index, (nic, mac) in enumerate(zip(nics, macs, strict=True)):
            opened.append(open_nic(nic, mac, (ports or {}).get(index)))
    except ConfigError:
        for done in opened:
            done.close()
        raise
    return opened


def _describe(err: OSError) -> str:
    where = err.filename or ""
    return f"{where}: {err.strerror}" if where and err.strerror else str(err.strerror or err)


def _inet(endpoint: str, default_host: str, kind: int) -> tuple[int, Any]:
    """(family, address) of ``HOST:PORT`` (an empty HOST is ``default_host``)."""
    host, _, port = endpoint.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or default_host, int(port), type=kind)
    except socket.gaierror as err:
        raise ConfigError(f"{endpoint}: {err.strerror}") from None
    return infos[0][0], infos[0][4]


def _no_delay(sock: socket.socket) -> None:
    """Each frame is one whole message: TCP waiting to merge small ones only adds delay.
    Set here, by the opener: accepted connections inherit it from a listening socket,
    and a confined worker may not set socket options."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _stream_socket(endpoint: str, default_host: str) -> tuple[socket.socket, Any]:
    """A stream socket for ``endpoint`` (a Unix path or ``HOST:PORT``) and its address."""
    if is_inet_address(endpoint):
        family, addr = _inet(endpoint, default_host, socket.SOCK_STREAM)
    else:
        family, addr = socket.AF_UNIX, endpoint
    sock = socket.socket(family, socket.SOCK_STREAM)
    _no_delay(sock)
    return sock, addr


def _connected(endpoint: str) -> socket.socket:
    sock, addr = _stream_socket(endpoint, "127.0.0.1")
    try:
        sock.connect(addr)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, err.strerror, endpoint) from None
    return sock


def _listening(endpoint: str, paths: list[str]) -> socket.socket:
    sock, addr = _stream_socket(endpoint, "0.0.0.0")
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        if sock.family == socket.AF_UNIX:
            paths.append(endpoint)
        sock.listen(1)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, err.strerror, endpoint) from None
    return sock


def _datagram(local: str | None, remote: str, paths: list[str]) -> HostEnd:
    inet = is_inet_address(remote)
    if local is not None and is_inet_address(local) != inet:
        raise ConfigError(f"--nic dgram: local={local} and remote={remote} are not both "
                          "Unix socket paths or both HOST:PORT")
    family, peer = _inet(remote, "127.0.0.1", socket.SOCK_DGRAM) if inet \
        else (socket.AF_UNIX, remote)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if local is not None:
            sock.bind(_inet(local, "0.0.0.0", socket.SOCK_DGRAM)[1] if inet else local)
            if not inet:
                paths.append(local)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, err.strerror, local) from None
    try:
        sock.connect(peer)
    except OSError:  # a Unix peer that is not there yet: send to its path until it is
        return HostEnd("dgram", sock, remote=peer)
    return HostEnd("dgram", sock)
