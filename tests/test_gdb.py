"""The gdb stub against QEMU's: one gdb-multiarch session, the same pcs and registers.

The session (tests/gdb/session.gdb) debugs tests/gdb/target.c, built here with Debian's
cross compiler, under ``popek exec --gdb`` and ``qemu-riscv64 -g``, and as a bare-metal
ELF under ``popek run --gdb`` and ``qemu-system-riscv64 -s -S``; gdb's output must be
the same, under every tier. Watchpoints (which qemu-riscv64 lacks) and the protocol's
handling of malformed packets are checked against what they must do.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from popek.engine.engine import TIERS

HERE = Path(__file__).resolve().parent / "gdb"
CC = "riscv64-linux-gnu-gcc"
CFLAGS = ["-O1", "-g", "-static", "-nostdlib", "-fno-pie", "-no-pie"]
PRELUDE = "set architecture riscv:rv64\nset confirm off\nset pagination off\nset width 0\n"
TIMEOUT = 120


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed: apt-get install {package} (./quickstart installs it)")
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gdb")
    cc = tool(CC, "gcc-riscv64-linux-gnu")
    source = str(HERE / "target.c")
    built = {"user": out / "user", "bare": out / "bare"}
    subprocess.run([cc, *CFLAGS, "-o", built["user"], source], check=True)
    subprocess.run([cc, *CFLAGS, "-ffreestanding", "-mcmodel=medany", "-DBARE_METAL",
                    "-T", str(HERE / "bare.ld"), "-Wl,--build-id=none",
                    "-Wl,--no-warn-rwx-segments", "-o", built["bare"], source], check=True)
    return built


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def popek(*args: str) -> list[str]:
    return [sys.executable, "-m", "popek", *args]


def gdb_session(server: list[str], port: int, program: Path, script: str,
                tmp_path: Path) -> str:
    """gdb's output for ``script`` against ``server`` (listening on ``port``), once the
    server has exited, without the name gdb gives the emulator's own process."""
    gdb = tool("gdb-multiarch", "gdb-multiarch")
    commands = tmp_path / f"session-{port}.gdb"
    commands.write_text(PRELUDE + f"target remote localhost:{port}\n" + script)
    proc = subprocess.Popen(server, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        # gdb retries a refused connection (tcp auto-retry) until the server listens.
        result = subprocess.run([gdb, "-q", "-nx", "-batch", "-x", str(commands), str(program)],
                                capture_output=True, text=True, timeout=TIMEOUT)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
        _, errors = proc.communicate()
    output = result.stdout + result.stderr
    assert "Remote connection closed" not in output, output + errors.decode()
    return re.sub(r"\[Inferior 1 \(.*?\)", "[Inferior 1", output)


def session(machine: bool = False) -> str:
    """The session's commands; a machine's ends before the guest powers off (QEMU hangs
    up then), and gdb detaches from it."""
    text = (HERE / "session.gdb").read_text()
    return text.rpartition("continue")[0] if machine else text


@pytest.fixture(scope="module")
def qemu_user_session(programs: dict[str, Path], tmp_path_factory) -> str:
    port = free_port()
    qemu = tool("qemu-riscv64", "qemu-user")
    return gdb_session([qemu, "-g", str(port), str(programs["user"])], port,
                       programs["user"], session(), tmp_path_factory.mktemp("qemu"))


@pytest.fixture(scope="module")
def qemu_system_session(programs: dict[str, Path], tmp_path_factory) -> str:
    port = free_port()
    qemu = tool("qemu-system-riscv64", "qemu-system-misc")
    return gdb_session([qemu, "-M", "virt", "-m", "128M", "-nographic", "-bios", "none",
                        "-kernel", str(programs["bare"]), "-gdb", f"tcp:localhost:{port}", "-S"],
                       port, programs["bare"], session(machine=True),
                       tmp_path_factory.mktemp("qemu"))


@pytest.mark.parametrize("tier", TIERS)
def test_exec_session_matches_qemu_user(tier: str, programs, qemu_user_session, tmp_path):
    assert " in mix (a=217, b=b@entry=1)" in qemu_user_session  # the session did its work
    assert "[Inferior 1 exited with code " in qemu_user_session
    port = free_port()
    ours = gdb_session(popek("exec", "--engine", tier, "--gdb", f"localhost:{port}",
                             str(programs["user"])), port, programs["user"], session(), tmp_path)
    assert ours == qemu_user_session


@pytest.mark.parametrize("tier", TIERS)
def test_run_session_matches_qemu_system(tier: str, programs, qemu_system_session, tmp_path):
    assert " in mix (a=217, b=b@entry=1)" in qemu_system_session
    port = free_port()
    ours = gdb_session(popek("run", "--engine", tier, "--mem", "128M", "--kernel",
                             str(programs["bare"]), "--gdb", f"localhost:{port}"),
                       port, programs["bare"], session(machine=True), tmp_path)
    # Halted before the first instruction: QEMU's at its reset vector, which jumps to RAM;
    # popek's firmware starts the kernel at its entry. From there on the two agree.
    ours_first, _, ours_rest = ours.partition("\n")[2].partition("\n")
    qemu_first, _, qemu_rest = qemu_system_session.partition("\n")[2].partition("\n")
    assert (qemu_first, ours_first) == ("0x0000000000001000 in ?? ()",
                                        "0x0000000080000000 in _start ()")
    assert ours_rest == qemu_rest
