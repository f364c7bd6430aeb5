"""QEMU's user networking (``--nic user``) through passt, Debian's user-mode network stack.

Writing TCP/IP in Python would be slow and a second network stack to trust; passt is the
one QEMU 7.2+, libvirt and podman use. It terminates the guest's TCP and UDP in ordinary
host sockets (no root, no tap device) and speaks QEMU's stream framing on a socket, so
to popek it is one more stream peer. It is told QEMU's address layout:

==============  ==============================================================
10.0.2.15/24    the guest, by DHCP
10.0.2.2        the gateway; connections to it reach the host's loopback
DNS             the host's nameservers, by DHCP (10.0.2.2 for one on the host's
                loopback), which passt lets the guest reach
==============  ==============================================================

QEMU puts DNS at 10.0.2.3. This passt (Debian 12's, 2023-03) cannot both hand that
address out and forward it: ``--dns 10.0.2.3`` makes it skip the host's resolv.conf,
where ``--dns-forward`` finds its target, so that server would never answer. Working
DNS at another address beats a dead one at QEMU's (see images/README.md).

``hostfwd=`` becomes passt's ``-t``/``-u`` port forwards. passt runs in the foreground as
a child on one end of a socket pair (``--fd``) and exits when the other end closes, that
is when the last process holding it (popek run, or the VMM worker it was passed to)
ends, however it ends: with a VMM's guest it outlives the VMM, in a session of its own
that signals to the VMM's process group do not reach. As root it drops to ``nobody`` and
sandboxes itself.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Sequence

from popek.machine.config import ConfigError, HostForward, NicSpec
from popek.net.stream import LENGTH

PROGRAM = "passt"
GUEST = "10.0.2.15"
GATEWAY = "10.0.2.2"
PREFIX = 24
READY_TIMEOUT = 10.0  # seconds for passt to start answering
WINDOW_BUFFER = 8 << 20  # bytes of frames passt may queue towards the guest
SO_SNDBUFFORCE = 32  # Linux; not exported by Python's socket module
_ARP = struct.Struct(">6s6sH HHBBH 6s4s6s4s")


def arguments(fd: int, address: str, prefix: int, gateway: str, *, dhcp: bool = True,
              mac: str | None = None, dns_forward: str | None = None,
              forwards: Sequence[HostForward] = ()) -> list[str]:
    """passt's arguments (the program's name first) for one guest at ``address``/``prefix``
    behind ``gateway`` (which reaches the host's loopback), on the connected socket
    ``fd``: with its own DHCP server or none, the gateway's MAC, a DNS address to relay
    to the host's resolver, and ``hostfwd=`` port forwards. Both ``--nic user`` and a
    switch's NAT uplinks (:mod:`popek.net.nat`) start passt with these."""
    args = [PROGRAM, "--foreground", "--quiet", "--stderr", "--ipv4-only", "--fd", str(fd),
            "--address", address, "--netmask", str(prefix), "--gateway", gateway]
    if not dhcp:
        args.append("--no-dhcp")
    if mac is not None:
        args += ["--mac-addr", mac]
    if dns_forward is not None:
        args += ["--dns-forward", dns_forward]
    for fwd in forwards:
        ports = f"{fwd.host_port}:{fwd.guest_port}"
        args += ["--tcp-ports" if fwd.protocol == "tcp" else "--udp-ports",
                 f"{fwd.host_addr}/{ports}" if fwd.host_addr else ports]
    return args


def start(nic: NicSpec, mac: str) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A running passt for ``nic`` (whose guest has ``mac``) and the socket its guest
    side is on.

    Returns once passt answers on the socket, so a forward it could not set up (a host
    port in use) is a ConfigError here with passt's own words, not a silent dead link."""
    if shutil.which(PROGRAM) is None:
        raise ConfigError("--nic user needs passt, which is not installed "
                          "(apt-get install passt)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    _room_for_a_window(theirs)
    log = tempfile.TemporaryFile()
    try:
        # A session of its own, as a VMM worker has: a guest outlives its VMM, network
        # included, so signals to the VMM's process group (Ctrl-C) must not reach passt.
        proc = subprocess.Popen(arguments(theirs.fileno(), GUEST, PREFIX, GATEWAY,
                                          forwards=nic.hostfwd), pass_fds=(theirs.fileno(),),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
    except OSError as err:
        ours.close()
        raise ConfigError(f"--nic user: cannot run passt: {err}") from None
    finally:
        theirs.close()
    try:
        _wait_until_serving(ours, bytes.fromhex(mac.replace(":", "")))
    except OSError as err:
        ours.close()
        stop(proc)
        log.seek(0)
        said = [line for line in log.read().decode(errors="replace").splitlines()
                if line and not line.startswith("Failed to send")]  # its syslog attempts
        raise ConfigError(f"--nic user: passt failed: {said[-1] if said else err}") from None
    finally:
        log.close()
    return ours, proc


def _room_for_a_window(sock: socket.socket) -> None:
    """passt drops the frames it cannot write at once (TCP will resend them), and the
    NIC stops reading while the guest has no receive buffers: a slow guest then loses
    most of each TCP window and lives on retransmissions. A send buffer that holds a
    whole window keeps those frames waiting instead (as root, beyond wmem_max)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, WINDOW_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WINDOW_BUFFER)


def _wait_until_serving(sock: socket.socket, mac: bytes) -> None:
    """Ask passt, as the guest would, who the gateway is, and wait for any frame back
    (OSError if it exits or stays silent)."""
    arp = _ARP.pack(b"\xff" * 6, mac, 0x0806, 1, 0x0800, 6, 4, 1, mac,
                    socket.inet_aton(GUEST), bytes(6), socket.inet_aton(GATEWAY))
    sock.settimeout(READY_TIMEOUT)
    try:
        sock.sendall(LENGTH.pack(len(arp)) + arp)
        size = LENGTH.unpack(_receive_exactly(sock, LENGTH.size))[0]
        _receive_exactly(sock, size)  # the answer goes nowhere: the guest did not ask
    except TimeoutError:
        raise OSError(f"no answer within {READY_TIMEOUT:.0f} s") from None
    finally:
        sock.settimeout(None)


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("passt exited")
        data += chunk
    return bytes(data)


def stop(proc: subprocess.Popen[bytes], timeout: float = 2.0) -> None:
    """Wait for a passt whose socket has closed to exit; kill it if it does not."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
