"""The bundled guest agent under QEMU: its virtio-serial port is a device no one here wrote.

The bundled kernel and initramfs boot in qemu-system-riscv64 with a virtserialport named
``org.popek.agent.0`` on a Unix socket; the test speaks the agent's frames (built by
popek's own ``frame``) on that socket and checks what comes back byte for byte.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest

from popek import images
from popek.devices.virtio.console import AGENT_PORT_NAME
from popek.machine.agent import frame

PATIENCE = 120.0


class AgentSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = b""

    def _take(self, n: int) -> bytes:
        while len(self.inbox) < n:
            data = self.sock.recv(1 << 16)
            assert data, "the port closed"
            self.inbox += data
        taken, self.inbox = self.inbox[:n], self.inbox[n:]
        return taken

    def run(self, argv: list[str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        self.sock.sendall(frame(b"E", b"".join(a.encode() + b"\0" for a in argv))
                          + (frame(b"I", stdin) if stdin else b"") + frame(b"C"))
        out = {b"O": b"", b"R": b""}
        while True:
            kind, length = struct.unpack("<cI", self._take(5))
            payload = self._take(length)
            if kind == b"X":
                return struct.unpack("<i", payload)[0], out[b"O"], out[b"R"]
            out[kind] += payload


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentSocket]:
    root = tmp_path_factory.mktemp("qemu-agent")
    kernel, path = root / "Image", root / "agent.sock"
    kernel.write_bytes(lzma.decompress(images.KERNEL.read_bytes()))
    qemu = subprocess.Popen(
        ["qemu-system-riscv64", "-M", "virt", "-m", "256M", "-nographic", "-kernel", str(kernel),
         "-initrd", str(images.INITRD), "-append", "console=ttyS0",
         "-chardev", f"socket,id=agent,path={path},server=on,wait=off",
         "-device", "virtio-serial-device",
         "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + PATIENCE
        while not path.exists():
            assert time.monotonic() < deadline and qemu.poll() is None, "QEMU did not start"
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.settimeout(PATIENCE)  # the guest boots, then its agent answers
            yield AgentSocket(sock)
    finally:
        qemu.kill()
        qemu.wait()


def test_the_agent_runs_a_command_and_reports_its_status(agent: AgentSocket) -> None:
    assert agent.run(["sh", "-c", "uname -m; echo oops >&2; exit 4"]) == \
        (4, b"riscv64\n", b"oops\n")
    assert agent.run(["sh", "-c", "kill -TERM $$"])[0] == 128 + 15
    assert agent.run(["no-such-program"]) == \
        (127, b"", b"popek-agent: no-such-program: No such file or directory\n")


def test_the_agent_is_binary_safe_under_qemu(agent: AgentSocket) -> None:
    data = bytes(range(256)) * 32 + os.urandom(200_000)
    status, out, _ = agent.run(["cat"], data)
    assert status == 0 and out == data
    status, out, _ = agent.run(["sha256sum"], data)
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
