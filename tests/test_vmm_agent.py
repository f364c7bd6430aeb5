"""``popek vm exec`` and ``popek vm cp`` through the guest agent of the bundled Linux, and
the clear error of a guest that has none.

One ``popek serve`` and one Linux boot serve the class; the commands run as a user types
them (``python -m popek vm ...`` in a subprocess), and their bytes are checked exactly.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import popek
from tests.vmm_guests import guest
from tests.vmm_process import popek_serve

BOOT_PATIENCE = 300.0


class Vmm:
    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def vm(self, *args: str, stdin: bytes = b"",
           timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "popek", "vm", "--socket",
                               str(self.sock), *args], input=stdin, capture_output=True,
                              timeout=timeout)


@pytest.fixture(scope="class")
def vmm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vmm]:
    with popek_serve(tmp_path_factory.mktemp("agent")) as sock:
        vmm = Vmm(sock)
        created = vmm.vm("create", "--name", "linux", "--mem", "128M")
        assert created.returncode == 0, created.stderr
        deadline = time.monotonic() + BOOT_PATIENCE
        while (ran := vmm.vm("exec", "linux", "--", "true")).returncode:
            assert b"no guest agent answered" in ran.stderr, ran.stderr
            assert time.monotonic() < deadline, "the guest agent never answered"
            time.sleep(1)
        yield vmm


@pytest.mark.boots_linux
class TestGuestAgent:
    def test_exec_passes_stdout_stderr_and_exit_status(self, vmm: Vmm) -> None:
        ran = vmm.vm("exec", "linux", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
        assert (ran.returncode, ran.stdout, ran.stderr) == (3, b"out\n", b"err\n")
        killed = vmm.vm("exec", "linux", "--", "sh", "-c", "kill -9 $$")
        assert killed.returncode == 128 + 9
        assert vmm.vm("exec", "linux", "--", "uname", "-m").stdout == b"riscv64\n"

    def test_exec_is_binary_safe_both_ways(self, vmm: Vmm) -> None:
        data = bytes(range(256)) * 64 + os.urandom(100_000) + b"\r\n\0\x1b[6n\x03\x04"
        ran = vmm.vm("exec", "linux", "--", "cat", stdin=data)
        assert ran.returncode == 0 and ran.stdout == data
        summed = vmm.vm("exec", "linux", "--", "sha256sum", stdin=data)
        assert summed.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()

    def test_cp_round_trip_keeps_every_byte(self, vmm: Vmm, tmp_path: Path) -> None:
        data = os.urandom((2 << 20) + 4096)  # more than one piece each way
        source, back = tmp_path / "in.bin", tmp_path / "out.bin"
        source.write_bytes(data)
        assert vmm.vm("cp", str(source), "linux:/tmp/copied.bin").returncode == 0
        summed = vmm.vm("exec", "linux", "--", "sha256sum", "/tmp/copied.bin")
        assert summed.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        assert vmm.vm("cp", "linux:/tmp/copied.bin", str(back)).returncode == 0
        assert back.read_bytes() == data
        missing = vmm.vm("cp", "linux:/no/such/file", str(tmp_path / "x"))
        assert missing.returncode == 1 and b"/no/such/file: no such readable file" in \
            missing.stderr

    def test_a_missing_program_and_an_overrun_are_reported(self, vmm: Vmm) -> None:
        missing = vmm.vm("exec", "linux", "--", "no-such-program")
        assert missing.returncode == 127
        assert missing.stderr == b"popek-agent: no-such-program: No such file or directory\n"
        slow = vmm.vm("exec", "--timeout", "1", "linux", "--", "sleep", "4")
        assert slow.returncode == 1 and b"sleep ran longer than 1 s" in slow.stderr
        deadline = time.monotonic() + 60  # the agent is free again once sleep ends
        while (ran := vmm.vm("exec", "linux", "--", "echo", "free")).returncode:
            assert b"still running an earlier command" in ran.stderr, ran.stderr
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert ran.stdout == b"free\n"

    def test_a_guest_without_the_agent_gets_a_clear_error(self, vmm: Vmm) -> None:
        made = vmm.vm("create", "--name", "bare", "--kernel", str(guest("idle")),
                      "--mem", "32M")
        assert made.returncode == 0, made.stderr
        ran = vmm.vm("exec", "bare", "--", "true")
        assert ran.returncode == 1
        assert b"no guest agent answered: the guest must run popek-agent" in ran.stderr
        assert vmm.vm("rm", "bare").returncode == 0


def test_machine_exec_without_an_agent_says_so() -> None:
    with popek.Machine(kernel=guest("idle"), mem="32M") as vm, \
            pytest.raises(popek.AgentError, match="no guest agent answered.*waited 0.5 s"):
        vm.exec("true", timeout=0.5)
