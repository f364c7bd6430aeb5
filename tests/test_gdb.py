"""The gdb stub against QEMU's: one gdb-multiarch session, the same pcs and registers.

The session (tests/gdb/session.gdb) debugs tests/gdb/target.c, built here with Debian's
cross compiler, under ``popek exec --gdb`` and ``qemu-riscv64 -g``, and as a bare-metal
ELF under ``popek run --gdb`` and ``qemu-system-riscv64 -s -S``; gdb's output must be
the same, under every tier. Watchpoints (which qemu-riscv64 lacks) and the protocol's
handling of malformed packets are checked against what they must do.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from popek.api.client import ApiError, Client
from popek.engine.engine import TIERS
from tests.vmm_process import popek_serve

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
    built = {"user": out / "user", "bare": out / "bare", "bare-spin": out / "bare-spin"}
    subprocess.run([cc, *CFLAGS, "-o", built["user"], source], check=True)
    for name, spin in (("bare", "0"), ("bare-spin", "1")):
        subprocess.run([cc, *CFLAGS, "-ffreestanding", "-mcmodel=medany", "-DBARE_METAL",
                        f'-DSPIN="{spin}"', "-T", str(HERE / "bare.ld"), "-Wl,--build-id=none",
                        "-Wl,--no-warn-rwx-segments", "-o", built[name], source], check=True)
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
    ours = gdb_session(popek("run", "--engine", tier, "--mem", "128M", "--bios", "none",
                             "--kernel", str(programs["bare"]), "--gdb", f"localhost:{port}"),
                       port, programs["bare"], session(machine=True), tmp_path)
    # Halted before the first instruction at the reset vector, as QEMU is, then the same.
    assert "0x0000000000001000 in ?? ()" in ours
    assert ours == qemu_system_session


def test_exec_watchpoints_stop_after_the_write(tier: str, programs, tmp_path):
    """Watchpoints (qemu-riscv64 has none to compare with) stop right after each access
    to the variable: write ones with the old and new values, read ones with the value
    read, under every tier."""
    port = free_port()
    script = ("watch counter\ncontinue\ncontinue\ndelete\nrwatch counter\ncontinue\n"
              "delete\nawatch watched\ncontinue\np watched == $a0\ndelete\ncontinue\n")
    out = gdb_session(popek("exec", "--engine", tier, "--gdb", f"localhost:{port}",
                            str(programs["user"])), port, programs["user"], script, tmp_path)
    assert re.search(r"Hardware watchpoint 1: counter\s+Old value = 0\s+New value = 1\s", out)
    assert re.search(r"Old value = 1\s+New value = 2\s", out)
    assert re.search(r"Hardware read watchpoint 2: counter\s+Value = 2\s+0x\w+ in work .*\n"
                     r"\d+\t\s+counter = counter \+ 1;", out)  # after the load, before the add
    assert re.search(r"Hardware access \(read/write\) watchpoint 3: watched\s+Old value = 0\s+"
                     r"New value = \d+", out)
    # Stopped after the store: at the line after it, with the stored value in memory.
    assert re.search(r"watched\s+Old value = 0\s+New value = \d+\s+"
                     r"0x\w+ in work .*\n\d+\t\s+return acc;", out)
    assert "$1 = 1" in out
    assert "[Inferior 1 exited with code " in out


test_exec_watchpoints_stop_after_the_write = pytest.mark.parametrize("tier", TIERS)(
    test_exec_watchpoints_stop_after_the_write)


class RemoteClient:
    """The debugger's end of the protocol, written here from the specification: lets a
    test send what gdb never would."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.create_connection(("localhost", port), timeout=30)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.pending = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self, payload: bytes) -> bytes:
        return b"$%s#%02x" % (payload, sum(payload) & 0xFF)

    def read_reply(self) -> bytes:
        """The next packet's payload (acknowledged), skipping the stub's '+' acks."""
        while True:
            start = self.pending.find(b"$")
            end = self.pending.find(b"#", start)
            if start >= 0 and end >= 0 and len(self.pending) >= end + 3:
                payload = self.pending[start + 1:end]
                assert int(self.pending[end + 1:end + 3], 16) == sum(payload) & 0xFF
                self.pending = self.pending[end + 3:]
                self.sock.sendall(b"+")
                return payload
            self.pending += self._recv()

    def read_ack(self) -> bytes:
        while not self.pending:
            self.pending += self._recv()
        ack, self.pending = self.pending[:1], self.pending[1:]
        return ack

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        assert data, "the stub hung up"
        return data

    def ask(self, payload: bytes) -> bytes:
        self.send_raw(self.packet(payload))
        assert self.read_ack() == b"+"
        return self.read_reply()

    def continue_then_interrupt(self, seconds: float) -> bytes:
        """Continue, let the target run ``seconds``, Ctrl-C: the stop reply."""
        self.send_raw(self.packet(b"c"))
        assert self.read_ack() == b"+"
        time.sleep(seconds)
        self.send_raw(b"\x03")
        return self.read_reply()

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(bytes.fromhex(self.ask(b"m%x,8" % addr).decode()), "little")


def symbol(program: Path, name: str) -> int:
    with open(program, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]["st_value"]


@pytest.mark.parametrize("tier", TIERS)
def test_exec_ctrl_c_then_a_watchpoint_in_hot_code(tier: str, programs):
    """Ctrl-C stops a program spinning in code every tier has compiled by then; a watchpoint
    set there stops after exactly one more store; kill ends popek."""
    port = free_port()
    proc = subprocess.Popen(popek("exec", "--engine", tier, "--gdb", f"localhost:{port}",
                                  str(programs["user"]), "spin"),
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        gdb = RemoteClient(port)
        assert gdb.ask(b"?").startswith(b"T05")
        assert gdb.continue_then_interrupt(1.0) == b"T02thread:1;"
        counter = symbol(programs["user"], "counter")
        before = gdb.read_u64(counter)
        assert before > 1000  # it did spin
        assert gdb.ask(b"Z2,%x,8" % counter) == b"OK"
        assert gdb.ask(b"c") == b"T05watch:%x;thread:1;" % counter
        assert gdb.read_u64(counter) == before + 1
        assert gdb.ask(b"z2,%x,8" % counter) == b"OK"
        gdb.send_raw(gdb.packet(b"k"))
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_malformed_packets_get_error_replies_and_the_session_goes_on(programs):
    """Then threads, physical memory, Ctrl-C, detach, a second debugger and kill, on a
    ``popek run`` machine."""
    port = free_port()
    proc = subprocess.Popen(popek("run", "--mem", "128M", "--cpus", "2", "--kernel",
                                  str(programs["bare-spin"]), "--gdb", f"localhost:{port}"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        gdb = RemoteClient(port)
        gdb.send_raw(b"$g#00")  # bad checksum: resend, please
        assert gdb.read_ack() == b"-"
        gdb.send_raw(b"garbage+")  # bytes between packets are skipped
        gdb.send_raw(b"$" + b"A" * 70000)  # far longer than PacketSize, and no end
        assert gdb.read_ack() == b"-"
        for bad in (b"m", b"mzz,4", b"m0,ffffffffffffffffff", b"M80000000,4:zz",
                    b"M80000000,10:00", b"X80000000,4:ab", b"Z0,xyz,4", b"Z2,0,0",
                    b"P1000=00", b"Pzz", b"Hg99", b"T99", b"vCont;x", b"Qqemu.PhyMemMode:7",
                    b"qXfer:features:read:other.xml:0,100", b"qXfer:features:read:target.xml:"):
            reply = gdb.ask(bad)
            assert reply.startswith(b"E"), (bad, reply)
        assert gdb.ask(b"qUnknownQuery") == b""
        assert gdb.ask(b"m0,ffffffff") == b"E0e"  # nothing at address 0 in the page tables
        entry = symbol(programs["bare-spin"], "_start")
        # The session still works: registers, threads (a hart each), physical memory.
        assert len(gdb.ask(b"g")) == 33 * 16
        assert gdb.ask(b"qfThreadInfo") == b"m1,2"
        assert gdb.ask(b"Hg2") == b"OK"
        assert len(gdb.ask(b"p20")) == 16  # hart 1's pc (its firmware holds it stopped)
        assert gdb.ask(b"Hg1") == b"OK"
        assert gdb.ask(b"p20") == entry.to_bytes(8, "little").hex().encode()
        assert gdb.ask(b"Qqemu.PhyMemMode:1") == b"OK"
        assert gdb.ask(b"qqemu.PhyMemMode") == b"1"
        first = gdb.ask(b"m%x,4" % entry)
        with open(programs["bare-spin"], "rb") as f:
            text = ELFFile(f).get_section_by_name(".text").data()
        assert bytes.fromhex(first.decode()) == text[:4]
        assert gdb.continue_then_interrupt(0.5) == b"T02thread:1;"
        assert gdb.ask(b"Qqemu.PhyMemMode:0") == b"OK"
        assert gdb.read_u64(symbol(programs["bare-spin"], "counter"))
        gdb.send_raw(gdb.packet(b"D"))
        assert gdb.read_ack() == b"+" and gdb.read_reply() == b"OK"
        time.sleep(0.2)
        assert proc.poll() is None  # detached, the guest spins on
        again = RemoteClient(port)  # and the next debugger finds it halted
        assert again.ask(b"?") == b"T05thread:1;"
        again.send_raw(again.packet(b"k"))
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        proc.kill()
        proc.wait()


def test_vm_debug_relays_gdb_through_the_vmm(programs, tmp_path):
    """``popek vm debug`` halts a running VMM guest for gdb (through the VMM's API, the
    guest's only door): a watchpoint, registers; the guest runs on after gdb detaches;
    a second debugger is refused while one holds it, and gdb's kill stops it."""
    with popek_serve(tmp_path) as vmm:
        vm_cli = popek("vm", "--socket", str(vmm))
        created = subprocess.run([*vm_cli, "create", "--kernel", str(programs["bare-spin"]),
                                  "--mem", "32M", "--name", "spinner"],
                                 capture_output=True, text=True, check=True)
        assert created.stdout.strip()
        port = free_port()
        script = "p counter > 0\nwatch counter\ncontinue\ninfo registers pc\ndelete\ndetach\n"
        out = gdb_session([*vm_cli, "debug", "spinner", "--gdb", f"localhost:{port}"], port,
                          programs["bare-spin"], script, tmp_path)
        assert "$1 = 1" in out
        assert re.search(r"Hardware watchpoint 1: counter\s+Old value = \d+\s+New value = \d+",
                         out)
        assert re.search(r"pc\s+0x8\w+\s+0x8\w+ <start_c\+\d+>", out)
        info = subprocess.run([*vm_cli, "info", "spinner"], capture_output=True, text=True,
                              check=True).stdout
        assert re.search(r"state\s+running", info), info

        async def second_debugger_refused_and_kill() -> None:
            async with Client(vmm) as client, client.debugger("spinner") as ws:
                await ws.send_bytes(b"$?#3f")
                seen = b""
                while b"#" not in seen:
                    seen += (await asyncio.wait_for(ws.receive(), TIMEOUT)).data
                assert seen.startswith(b"+$T05thread:1;")
                with pytest.raises(ApiError, match="HTTP 409"):
                    async with client.debugger("spinner"):
                        pass
                await ws.send_bytes(b"$k#6b")  # and gdb's kill stops the guest
                deadline = time.monotonic() + TIMEOUT
                while (vm := await client.info("spinner"))["state"] != "stopped":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                assert vm["exit"]["kind"] == "killed"
        asyncio.run(second_debugger_refused_and_kill())
