"""The host ends of guest networks: QEMU's stream and dgram framing, passt, pcap captures.

The other end is played by plain sockets, tcpdump reads the captures, and passt is the
real one from Debian; nothing here needs a guest.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popek.machine.config import ConfigError, NicSpec
from popek.net.dgram import DgramBackend
from popek.net.endpoint import open_nic
from popek.net.pcap import CapturedBackend, PcapWriter
from popek.net.stream import StreamBackend, StreamListener

MAC = "52:54:00:12:34:56"


def frame(n: int, fill: int = 0) -> bytes:
    return b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + b"\x88\xb5" + bytes([fill]) * n


def framed(*frames: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


def drain(backend) -> list[bytes]:
    frames = []
    while (f := backend.receive()) is not None:
        frames.append(f)
    return frames


def wait_readable(fd: int) -> None:
    import select
    assert select.select([fd], [], [], 5)[0]


# -- stream --------------------------------------------------------------------------------
def test_stream_frames_split_anywhere_arrive_whole() -> None:
    peer, ours = socket.socketpair()
    backend = StreamBackend(ours)
    frames = [frame(10, 1), frame(3000, 2), frame(0, 3)]
    data = framed(*frames)
    got = []
    for i in range(len(data)):  # one byte at a time: every split point
        peer.send(data[i:i + 1])
        wait_readable(ours.fileno())
        got += drain(backend)
    assert got == frames
    backend.close()


def test_stream_skips_an_oversized_frame_without_buffering_it() -> None:
    peer, ours = socket.socketpair()
    backend = StreamBackend(ours)
    peer.sendall(struct.pack(">I", 1 << 30))  # a gigabyte, announced
    peer.sendall(bytes(200_000))
    got = drain(backend)
    assert got == [] and backend.dropped == 1
    assert len(backend._in) < 300_000
    backend._skip = 4  # the rest of the gigabyte "arrived"; then a good frame
    peer.sendall(bytes(4) + framed(frame(20)))
    wait_readable(ours.fileno())
    assert drain(backend) == [frame(20)]


def test_stream_peer_hanging_up_leaves_nothing_to_wait_for() -> None:
    peer, ours = socket.socketpair()
    backend = StreamBackend(ours)
    peer.close()
    assert backend.receive() is None
    assert backend.fileno() is None and backend.ready_to_send()
    backend.send(frame(10))
    assert backend.dropped == 1


def test_listener_takes_one_peer_at_a_time_and_drops_frames_to_nobody(tmp_path: Path) -> None:
    path = str(tmp_path / "net.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    backend = StreamListener(server)
    backend.send(frame(1))
    assert backend.dropped == 1  # nobody there
    first = socket.socket(socket.AF_UNIX)
    first.connect(path)
    wait_readable(backend.fileno())
    assert backend.receive() is None  # accepted; nothing sent yet
    second = socket.socket(socket.AF_UNIX)
    second.connect(path)  # waits in the backlog
    first.sendall(framed(frame(5, 7)))
    wait_readable(backend.fileno())
    assert backend.receive() == frame(5, 7)
    backend.send(frame(6))
    assert first.recv(100) == framed(frame(6))
    first.close()
    wait_readable(backend.fileno())
    assert backend.receive() is None  # the first left
    wait_readable(backend.fileno())  # the listening socket: the second is waiting
    second.sendall(framed(frame(8)))
    assert backend.receive() == frame(8)
    backend.close()


# -- dgram ---------------------------------------------------------------------------------
def test_dgram_nics_on_unix_sockets_reach_each_other_whoever_starts_first(
        tmp_path: Path) -> None:
    a_path, b_path = str(tmp_path / "a"), str(tmp_path / "b")
    a = open_nic(NicSpec(type="dgram", local=a_path, remote=b_path), MAC)  # b not there yet
    b = open_nic(NicSpec(type="dgram", local=b_path, remote=a_path), MAC)
    backend_a, backend_b = a.end.backend(), b.end.backend()
    backend_a.send(frame(100, 1))
    backend_b.send(frame(200, 2))
    wait_readable(backend_b.fileno())
    assert backend_b.receive() == frame(100, 1)
    wait_readable(backend_a.fileno())
    assert backend_a.receive() == frame(200, 2)
    for nic in (a, b):
        nic.close()
    assert not os.path.exists(a_path) and not os.path.exists(b_path)


def test_dgram_over_udp_drops_oversized_datagrams() -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    port = peer.getsockname()[1]
    nic = open_nic(NicSpec(type="dgram", local="127.0.0.1:0", remote=f"127.0.0.1:{port}"),
                   MAC)
    backend: DgramBackend = nic.end.backend()
    backend.send(frame(50))
    data, addr = peer.recvfrom(70_000)
    assert data == frame(50)
    peer.sendto(bytes(65_507), addr)  # the largest UDP datagram: fine
    peer.sendto(frame(60), addr)
    wait_readable(backend.fileno())
    assert drain(backend) == [bytes(65_507), frame(60)]
    nic.close()


# -- opening -------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "message"), [
    (NicSpec(type="stream", connect="/nonexistent/net.sock"), "No such file"),
    (NicSpec(type="stream", connect="127.0.0.1:1"), "refused"),
    (NicSpec(type="dgram", local="/tmp", remote="/tmp/x"), "in use"),
    (NicSpec(type="dgram", local="127.0.0.1:0", remote="/tmp/x"), "not both"),
    (NicSpec(type="switch", switch="lan"), "popek serve"),
    (NicSpec(type="stream", listen="127.0.0.1:0", pcap=Path("/dev/null")),
     "not a regular file"),
])
def test_host_ends_that_cannot_be_opened_give_one_line_errors(spec: NicSpec,
                                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        open_nic(spec, MAC)
    assert "\n" not in str(err.value)


def test_a_missing_passt_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"apt-get install passt"):
        open_nic(NicSpec(type="user"), MAC)


def test_passt_that_cannot_forward_a_port_says_so() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"passt failed: .*{port}"):
        open_nic(NicSpec.parse(f"user,hostfwd=tcp:127.0.0.1:{port}-:80"), MAC)
    busy.close()


def test_passt_answers_dhcp_with_qemus_address_layout() -> None:
    """A DHCP DISCOVER from the guest's MAC gets an OFFER of 10.0.2.15/24 with the router
    at 10.0.2.2, as QEMU's user networking gives (and a DNS server: the host's)."""
    nic = open_nic(NicSpec(type="user"), MAC)
    backend = nic.end.backend()
    backend.send(_dhcp_discover(bytes.fromhex(MAC.replace(":", ""))))
    offer = None
    deadline = time.monotonic() + 10
    while offer is None and time.monotonic() < deadline:
        wait_readable(backend.fileno())
        for f in drain(backend):
            if f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == b"\x00\x44":
                offer = f
    assert offer is not None
    bootp = offer[42:]
    assert socket.inet_ntoa(bootp[16:20]) == "10.0.2.15"  # yiaddr
    options = _dhcp_options(bootp[236:])  # from the magic cookie
    assert socket.inet_ntoa(options[3][:4]) == "10.0.2.2"  # router
    assert len(options[6]) >= 4  # DNS
    assert options[1] == socket.inet_aton("255.255.255.0")
    assert options[26] == struct.pack(">H", 65520)  # the MTU that needs mergeable buffers
    backend.close()
    nic.close()


def test_no_passt_outlives_a_killed_popek(tmp_path: Path) -> None:
    """passt exits when the last copy of its socket closes: SIGKILL popek, passt goes."""
    script = ("import sys, time\n"
              "from popek.machine.config import NicSpec\n"
              "from popek.net.endpoint import open_nic\n"
              "nic = open_nic(NicSpec(type='user'), '52:54:00:12:34:56')\n"
              "print(nic.passt.pid, flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    passt_pid = int(proc.stdout.readline())
    assert _alive(passt_pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _alive(passt_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(passt_pid)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _dhcp_discover(mac: bytes) -> bytes:
    bootp = struct.pack(">BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234, 0, 0x8000, bytes(4),
                        bytes(4), bytes(4), bytes(4), mac, bytes(64), bytes(128))
    bootp += b"\x63\x82\x53\x63" + bytes([53, 1, 1, 55, 3, 1, 3, 6, 255])
    udp = struct.pack(">HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes(4), b"\xff" * 4)
    checksum = sum(struct.unpack(">10H", ip))
    while checksum >> 16:
        checksum = (checksum & 0xFFFF) + (checksum >> 16)
    ip = ip[:10] + struct.pack(">H", ~checksum & 0xFFFF) + ip[12:]
    return b"\xff" * 6 + mac + b"\x08\x00" + ip + udp


def _dhcp_options(data: bytes) -> dict[int, bytes]:
    options, i = {}, 4
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        options[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return options


# -- pcap ----------------------------------------------------------------------------------
def test_capture_is_readable_by_tcpdump_while_frames_flow(tmp_path: Path) -> None:
    path = tmp_path / "nic.pcap"
    peer, ours = socket.socketpair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    backend = CapturedBackend(StreamBackend(ours), PcapWriter(fd))
    arp = bytes.fromhex("ffffffffffff525400123456080600010800060400015254001234560a00020f"
                        "0000000000000a000202")
    backend.send(arp)
    peer.sendall(framed(frame(64_000, 9)))
    wait_readable(ours.fileno())
    assert drain(backend) == [frame(64_000, 9)]
    result = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(path)], capture_output=True,
                            text=True, check=True)  # read while the NIC is still open
    lines = [line for line in result.stdout.splitlines() if not line.startswith("\t")]
    assert len(lines) == 2  # (tcpdump dumps unknown frames' bytes on indented lines)
    assert "Request who-has 10.0.2.2 tell 10.0.2.15" in lines[0]
    assert "length 64014" in lines[1] and "ethertype Unknown (0x88b5)" in lines[1]
    backend.close()
