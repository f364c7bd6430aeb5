"""The API admits only its owner: a token on TCP, and a path policy for what requests name.

Over TCP every request, the console WebSocket included, needs ``Authorization: Bearer``
with the token of ``popek serve``'s token file, and may name only host paths inside the
bundled images, ``STATE_DIR/storage`` and ``--allow-path`` directories; the owner-only Unix
socket needs neither (unless ``--restrict-paths``). A refused path must not even be
opened: the tests name FIFOs, whose opening the test sees (its writer stops waiting).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from popek.api import token
from popek.api.client import ApiError, Client
from popek.vmm import statedir
from popek.vmm.errors import BadRequest, Forbidden
from popek.vmm.paths import PathPolicy
from tests.test_vmm_service import STOP_GUESTS
from tests.vmm_guests import guest

MEM = 32 << 20
PATIENCE = 60.0


# -- the token file ---------------------------------------------------------------------------
def test_token_file_is_created_owner_only_with_a_fresh_random_token(tmp_path: Path) -> None:
    first = token.load_or_create(tmp_path / "a")
    second = token.load_or_create(tmp_path / "b")
    assert first != second and len(first) >= 40
    for name in ("a", "b"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_token_file_is_reused_when_present(tmp_path: Path) -> None:
    path = tmp_path / "token"
    made = token.load_or_create(path)
    assert token.load_or_create(path) == made == token.read(path)
    path.write_text("my-own-token-of-24-chars\n")
    assert token.load_or_create(path) == "my-own-token-of-24-chars"


@pytest.mark.parametrize("mode, content, message", [
    (0o640, "0123456789abcdefghij", r"open to others \(mode 0640\); run: chmod 600"),
    (0o604, "0123456789abcdefghij", r"open to others \(mode 0604\)"),
    (0o600, "short", "at least 16 printable"),
    (0o600, "has a space in the middle", "at least 16 printable"),
])
def test_unsafe_or_unusable_token_file_is_refused(tmp_path: Path, mode: int, content: str,
                                                  message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(token.TokenError, match=message):
        token.load_or_create(path)


def _serve_fails(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "popek", "serve", *args],
                          capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    return done.stderr


def test_serve_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    readable = tmp_path / "token"
    readable.write_text("0123456789abcdefghij\n")
    readable.chmod(0o644)
    error = _serve_fails("--socket", str(tmp_path / "s.sock"), "--state-dir",
                         str(tmp_path / "state"), "--tcp", "127.0.0.1:0",
                         "--token-file", str(readable))
    assert error.startswith("popek serve: error: the token file") and "chmod 600" in error
    assert not (tmp_path / "s.sock").exists()


def test_serve_keeps_tcp_on_loopback_unless_told(tmp_path: Path) -> None:
    error = _serve_fails("--socket", str(tmp_path / "s.sock"), "--state-dir",
                         str(tmp_path / "state"), "--tcp", "0.0.0.0:0")
    assert "not a loopback address" in error and "--allow-remote" in error


def test_state_dir_is_created_owner_only_and_a_shared_one_refused(tmp_path: Path) -> None:
    made = statedir.prepare(tmp_path / "new" / "state")
    for d in (made, statedir.storage(made)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(statedir.StateDirError, match="others may write"):
        statedir.prepare(shared)


# -- the path policy --------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """allowed/ (with links in and out), outside/ and allowed-not/ (a look-alike name)."""
    for d in ("allowed/sub", "outside", "allowed-not"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("allowed/sub/f", "outside/f", "allowed-not/f"):
        (tmp_path / d).touch()
    (tmp_path / "allowed" / "out").symlink_to(tmp_path / "outside" / "f")
    (tmp_path / "allowed" / "outdir").symlink_to(tmp_path / "outside")
    (tmp_path / "allowed" / "dangling").symlink_to(tmp_path / "outside" / "not-yet")
    (tmp_path / "outside" / "in").symlink_to(tmp_path / "allowed" / "sub" / "f")
    return tmp_path


@pytest.mark.parametrize("name", [
    "allowed/sub/f", "allowed/sub/new.snap", "allowed", "outside/in", "outside/../allowed/sub/f",
])
def test_policy_allows_what_resolves_inside(tree: Path, name: str) -> None:
    policy = PathPolicy([tree / "allowed"])
    assert policy.check(f"{tree}/{name}").is_relative_to(tree / "allowed")


@pytest.mark.parametrize("name", [
    "outside/f", "allowed/out", "allowed/outdir/f", "allowed/outdir/new.snap",
    "allowed/dangling", "allowed/../outside/f", "allowed/sub/../../outside/f",
    "allowed-not/f",
])
def test_policy_refuses_what_resolves_outside(tree: Path, name: str) -> None:
    with pytest.raises(Forbidden, match="outside the directories this VMM allows") as refused:
        PathPolicy([tree / "allowed"]).check(f"{tree}/{name}")
    assert "\n" not in str(refused.value)
    PathPolicy().check(f"{tree}/{name}")  # no roots: anything absolute


@pytest.mark.parametrize("path", ["relative/disk.img", "", "/tmp/nul\0byte"])
def test_policy_refuses_what_is_no_absolute_path(path: str) -> None:
    for policy in (PathPolicy(), PathPolicy([Path("/")])):
        with pytest.raises(BadRequest):
            policy.check(path)


# -- a VMM listening on TCP -------------------------------------------------------------------
@dataclass
class TcpVmm:
    socket: Path
    url: str
    token: str
    dirs: Path  # holds allowed/, outside/ and state/

    def call(self, method: str, *args: Any, tcp: bool = True, secret: str | None = None,
             **kw: Any) -> Any:
        """``method`` of the SDK, over TCP with the token (or ``secret``), or the socket."""
        async def call() -> Any:
            client = Client(url=self.url, token=secret or self.token) if tcp else \
                Client(self.socket)
            async with client:
                return await getattr(client, method)(*args, **kw)
        return asyncio.run(call())

    def refused(self, method: str, *args: Any, status: int = 403, **kw: Any) -> str:
        with pytest.raises(ApiError) as refused:
            self.call(method, *args, **kw)
        assert refused.value.status == status, refused.value
        assert "\n" not in str(refused.value)
        return str(refused.value)

    def wait_log(self, vm: dict[str, Any], pattern: bytes) -> None:
        deadline = time.monotonic() + PATIENCE
        while not re.search(pattern, self.call("console_log", vm["id"])):
            assert time.monotonic() < deadline, f"no {pattern!r} from {vm['name']}"
            time.sleep(0.1)


@pytest.fixture(scope="class")
def vmm(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpVmm]:
    """A VMM on TCP that allows allowed/ (holding the guests); the class may add flags."""
    dirs = tmp_path_factory.mktemp("access")
    for d in ("allowed", "outside"):
        (dirs / d).mkdir()
    for program in ("echo", "counter"):
        shutil.copy(guest(program), dirs / "allowed" / program)
    sock, log = dirs / "vmm.sock", dirs / "vmm.log"
    flags = getattr(request.cls, "SERVE_FLAGS", ())
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "popek", "serve", "--socket", str(sock),
                                 "--state-dir", str(dirs / "state"), "--tcp", "127.0.0.1:0",
                                 "--allow-path", str(dirs / "allowed"), *STOP_GUESTS, *flags],
                                stderr=stderr)
    try:
        deadline = time.monotonic() + PATIENCE
        while not (found := re.search(r"http://127\.0\.0\.1:\d+", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield TcpVmm(sock, found.group(), (dirs / "state" / "api-token").read_text().strip(), dirs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=PATIENCE)
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def api(vmm: TcpVmm) -> Iterator[TcpVmm]:
    yield vmm
    for vm in vmm.call("list", tcp=False):
        vmm.call("delete", vm["id"], tcp=False)
    for d in ("allowed", "outside"):
        for entry in (vmm.dirs / d).iterdir():
            if entry.name not in ("echo", "counter"):
                entry.unlink()


class WatchedFifo:
    """A FIFO that tells whether anyone opened it: a writer waits in ``open`` until a
    reader comes (``O_RDWR``, as a disk is opened, counts as a reader too)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._opened = threading.Event()
        self._writer = threading.Thread(target=self._wait, daemon=True)
        self._writer.start()

    def _wait(self) -> None:
        os.close(os.open(self.path, os.O_WRONLY))
        self._opened.set()

    def opened(self) -> bool:
        return self._opened.wait(0.5)  # time for a reader that just came to be seen

    def release(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._writer.join(PATIENCE)
        os.close(fd)


@pytest.fixture
def fifo(api: TcpVmm) -> Iterator[WatchedFifo]:
    watched = WatchedFifo(api.dirs / "outside" / "fifo")
    yield watched
    watched.release()


def _raw(api: TcpVmm, path: str,
         headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    async def get() -> tuple[int, bytes, dict[str, str]]:
        async with aiohttp.ClientSession() as session, \
                session.get(api.url + path, headers=headers) as resp:
            return resp.status, await resp.read(), dict(resp.headers)
    return asyncio.run(get())


class TestTcpNeedsTheToken:
    def test_requests_without_the_right_token_get_a_bare_401(self, api: TcpVmm) -> None:
        answers = set()
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"},
                        {"Authorization": f"Bearer {api.token}x"},
                        {"Authorization": f"Bearer {api.token[:-1]}"},
                        {"Authorization": f"Basic {api.token}"},
                        {"Authorization": api.token}):
            for path in ("/v1/vms", "/v1/version", "/v1/no-such-route"):
                status, body, reply = _raw(api, path, headers)
                answers.add((status, body, reply.get("WWW-Authenticate")))
        assert answers == {(401, b'{"error": "unauthorized"}', "Bearer")}
        status, body, _ = _raw(api, "/v1/vms", {"Authorization": f"Bearer {api.token}"})
        assert (status, body) == (200, b"[]")
        assert api.call("list", tcp=False) == []  # the owner-only socket needs no token

    def test_the_console_websocket_needs_the_token(self, api: TcpVmm) -> None:
        echo = api.call("create", kernel=str(api.dirs / "allowed" / "echo"), mem=MEM)
        api.wait_log(echo, b"echo ready\n")

        async def attach(headers: dict[str, str]) -> int:
            async with aiohttp.ClientSession(headers=headers) as session:
                try:
                    async with session.ws_connect(f"{api.url}/v1/vms/{echo['id']}/console"):
                        return 101
                except aiohttp.WSServerHandshakeError as err:
                    return err.status
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-enough-length"}):
            assert asyncio.run(attach(headers)) == 401
        assert "unauthorized" in api.refused("console_log", echo["id"], status=401,
                                             secret="wrong-token-of-enough-length")

        async def type_line() -> bytes:
            async with Client(url=api.url, token=api.token) as client, \
                    client.console(echo["id"]) as ws:
                await ws.send_bytes(b"over tcp\n")
                seen = b""
                while b"over tcp" not in seen:
                    seen += (await asyncio.wait_for(ws.receive(), PATIENCE)).data
                return seen
        assert b"echo ready" in asyncio.run(type_line())

    def test_popek_vm_uses_the_token_file(self, api: TcpVmm, tmp_path: Path) -> None:
        def popek_vm(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "popek", "vm", "--tcp",
                                   api.url.removeprefix("http://"), *args],
                                  capture_output=True, text=True, timeout=PATIENCE)
        good = popek_vm("--token-file", str(api.dirs / "state" / "api-token"), "create",
                        "--kernel", str(api.dirs / "allowed" / "counter"), "--mem", "32M",
                        "--name", "over-tcp")
        assert good.returncode == 0, good.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("wrong-token-of-enough-length\n")
        refused = popek_vm("--token-file", str(wrong), "ls")
        assert refused.returncode == 1 and "unauthorized" in refused.stderr
        assert "over-tcp" not in refused.stdout
        missing = popek_vm("--token-file", str(tmp_path / "missing"), "ls")
        assert missing.returncode == 1 and "cannot read the token file" in missing.stderr


class TestTcpRequestsNameOnlyAllowedPaths:
    def test_paths_outside_are_refused_before_anything_opens_them(
            self, api: TcpVmm, fifo: WatchedFifo) -> None:
        allowed, kernel = api.dirs / "allowed", str(api.dirs / "allowed" / "counter")
        (allowed / "link").symlink_to(fifo.path)
        for spec in [{"kernel": str(fifo.path)},
                     {"kernel": kernel, "initrd": str(fifo.path)},
                     {"kernel": kernel, "disks": [{"path": str(fifo.path)}]},
                     {"kernel": kernel, "disks": [{"path": str(allowed / "link")}]},
                     {"kernel": kernel, "disks": [{"path": f"{allowed}/../outside/fifo"}]},
                     {"kernel": kernel, "bios": str(fifo.path)},
                     {"kernel": kernel, "nics": [{"type": "stream", "connect": str(fifo.path)}]},
                     {"kernel": kernel, "nics": [{"type": "user",
                                                  "pcap": str(fifo.path) + ".pcap"}]}]:
            reason = api.refused("create", mem=MEM, **spec)
            assert "outside the directories this VMM allows" in reason
            assert str(fifo.path) in reason
        assert "resolved: " in api.refused("restore", allowed / "link")
        assert not fifo.opened()
        assert list(fifo.path.parent.iterdir()) == [fifo.path]  # no pcap file either
        assert api.call("list", tcp=False) == []

    def test_neither_a_root_only_file_nor_the_vmm_s_own_can_become_a_disk(
            self, api: TcpVmm) -> None:
        secret = api.dirs / "outside" / "secret"
        secret.write_bytes(bytes(1 << 20))
        secret.chmod(0o600)
        for disk in (secret, api.dirs / "state" / "api-token",
                     api.dirs / "state" / "storage" / ".." / "api-token"):
            api.refused("create", kernel=str(api.dirs / "allowed" / "counter"), mem=MEM,
                        disks=[{"path": str(disk), "readonly": True}])
        assert api.call("list") == []

    def test_allowed_directories_work(self, api: TcpVmm) -> None:
        disk = api.dirs / "allowed" / "disk.img"
        disk.write_bytes(bytes(1 << 20))
        vm = api.call("create", kernel=str(api.dirs / "allowed" / "counter"), mem=MEM,
                      disks=[{"path": str(disk)}])
        api.wait_log(vm, rb"tick 1\n")
        for where in (api.dirs / "allowed" / "vm.snap", api.dirs / "state" / "storage" / "vm.snap"):
            api.call("snapshot", vm["id"], where)
            clone = api.call("restore", where)
            assert clone["state"] == "running"
        (api.dirs / "state" / "storage" / "vm.snap").unlink()

    def test_snapshots_are_written_only_inside(self, api: TcpVmm) -> None:
        vm = api.call("create", kernel=str(api.dirs / "allowed" / "counter"), mem=MEM)
        (api.dirs / "allowed" / "outdir").symlink_to(api.dirs / "outside")
        for target in (api.dirs / "outside" / "vm.snap",
                       api.dirs / "allowed" / "outdir" / "vm.snap",
                       Path(f"{api.dirs}/allowed/../outside/vm.snap")):
            api.refused("snapshot", vm["id"], target)
        assert list((api.dirs / "outside").iterdir()) == []

    def test_a_snapshot_inside_cannot_reopen_a_disk_outside(self, api: TcpVmm) -> None:
        outside_disk = api.dirs / "outside" / "disk.img"
        outside_disk.write_bytes(bytes(1 << 20))
        snap = api.dirs / "allowed" / "vm.snap"
        vm = api.call("create", kernel=str(api.dirs / "allowed" / "counter"), mem=MEM,
                      disks=[{"path": str(outside_disk)}], tcp=False)  # the owner may
        api.call("snapshot", vm["id"], snap, tcp=False)
        assert str(outside_disk) in api.refused("restore", snap)
        assert api.call("restore", snap, tcp=False)["state"] == "running"


class TestRestrictPaths:
    SERVE_FLAGS = ("--restrict-paths",)

    def test_the_unix_socket_is_held_to_the_allowed_paths(self, api: TcpVmm,
                                                          fifo: WatchedFifo) -> None:
        api.refused("create", kernel=str(fifo.path), mem=MEM, tcp=False)
        assert not fifo.opened()
        vm = api.call("create", kernel=str(api.dirs / "allowed" / "counter"), mem=MEM,
                      tcp=False)
        assert vm["state"] == "running"
