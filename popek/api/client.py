"""The Python SDK: an asyncio client for the VMM's REST API (``popek.AsyncClient``;
``popek.Client`` is the same with blocking methods, :mod:`popek.api.sync_client`).

``popek vm ...`` is built on it, and so can be any program that manages guests::

    async with AsyncClient() as vmm:
        vm = await vmm.create(kernel="/path/Image", mem=256 << 20)
        await vmm.snapshot(vm["id"], "/tmp/vm.snap")

Over TCP, pass the VMM's URL and API token (:func:`popek.api.token.read` reads its file)::

    async with AsyncClient("http://127.0.0.1:8080", token=token) as vmm: ...
"""

from __future__ import annotations

import base64
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from popek.api.endpoint import default_socket

COPY_IN_PIECE = 512 << 10  # the most stdin one exec request takes
COPY_OUT_BLOCKS = 32  # blocks of 64 KiB: 2 MiB, the most output one exec reply carries
COPY_OUT_PIECE = COPY_OUT_BLOCKS << 16
# One piece of a guest file: $1 the path, $2 the first block.
_READ_PIECE = ('[ -f "$1" ] && [ -r "$1" ] || { echo "$1: no such readable file" >&2; exit 1; }; '
               f'dd if="$1" bs=65536 skip="$2" count={COPY_OUT_BLOCKS} 2>/dev/null')
UNAUTHORIZED = ("unauthorized: the VMM wants its API token (from the file popek serve "
                "--token-file names)")


class ApiError(Exception):
    """The VMM refused a request (``status`` is the HTTP status) or cannot be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """One connection pool to a VMM on a Unix socket (or ``url`` for TCP, with ``token``).
    The first argument may be the socket's path or the URL."""

    def __init__(self, socket_path: str | Path | None = None, url: str | None = None,
                 token: str | None = None) -> None:
        if isinstance(socket_path, str) and socket_path.startswith(("http://", "https://")):
            socket_path, url = None, socket_path
        self.socket_path = socket_path or default_socket()
        self.url = url
        self.base = url or "http://popek"
        self.headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        connector = None if self.url else aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(
            connector=connector, headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=5))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            async with self._session.request(method, self.base + path, json=body) as resp:
                if resp.status == 204:
                    return None
                if resp.content_type == "application/json":
                    data = await resp.json()
                else:
                    data = await resp.read()
                if resp.status == 401:
                    raise ApiError(UNAUTHORIZED, 401)
                if resp.status >= 400:
                    message = data.get("error") if isinstance(data, dict) else None
                    raise ApiError(message or f"HTTP {resp.status}", resp.status)
                return data
        except aiohttp.ClientConnectionError as err:
            reason = getattr(getattr(err, "os_error", None), "strerror", None) or err
            raise ApiError(f"cannot reach the VMM at {self.url or self.socket_path} "
                           f"({reason}); is 'popek serve' running?") from None

    # -- operations (see docs/openapi.yaml) ---------------------------------------------------
    async def version(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/version")

    async def list(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/v1/vms")

    async def create(self, **spec: Any) -> dict[str, Any]:
        return await self.request("POST", "/v1/vms", spec)

    async def restore(self, path: str | Path, **opts: Any) -> dict[str, Any]:
        return await self.request("POST", "/v1/snapshots/restore",
                                  {"path": str(Path(path).absolute()), **opts})

    async def info(self, vm: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/vms/{vm}")

    async def update(self, vm: str, **changes: Any) -> dict[str, Any]:
        return await self.request("PATCH", f"/v1/vms/{vm}", changes)

    async def action(self, vm: str, action: str, **body: Any) -> dict[str, Any]:
        """start, pause, resume, kill or shutdown (``line``, ``timeout``, ``force``)."""
        return await self.request("POST", f"/v1/vms/{vm}/{action}", body or None)

    async def start(self, vm: str) -> dict[str, Any]:
        return await self.action(vm, "start")

    async def pause(self, vm: str) -> dict[str, Any]:
        return await self.action(vm, "pause")

    async def resume(self, vm: str) -> dict[str, Any]:
        return await self.action(vm, "resume")

    async def kill(self, vm: str) -> dict[str, Any]:
        return await self.action(vm, "kill")

    async def stop(self, vm: str, **opts: Any) -> dict[str, Any]:
        """As ``popek vm stop``: the guest powers off (``timeout`` seconds), else is killed."""
        return await self.action(vm, "shutdown", **opts)

    async def delete(self, vm: str) -> None:
        await self.request("DELETE", f"/v1/vms/{vm}")

    async def snapshot(self, vm: str, path: str | Path,
                       diff: str | Path | None = None) -> dict[str, Any]:
        """``diff``: only the pages written since that snapshot, the VM's latest."""
        return await self.request("POST", f"/v1/vms/{vm}/snapshot", {
            "path": str(Path(path).absolute()),
            **({"diff": str(Path(diff).absolute())} if diff is not None else {})})

    async def migrate(self, vm: str, to: str, **options: Any) -> dict[str, Any]:
        """Start a live migration to the VMM ``to`` (a Unix socket path, or tcp:HOST:PORT
        with ``token``); ``info(vm)["migration"]`` shows how it goes."""
        return await self.request("POST", f"/v1/vms/{vm}/migrate", {"to": to, **options})

    async def exec(self, vm: str, argv: list[str], stdin: bytes = b"",
                   timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``argv`` in the guest through its agent, as ``popek vm exec``: stdin of up
        to 512 KiB in, the exit status and stdout and stderr (bytes, up to 2 MiB) out."""
        result = await self.request("POST", f"/v1/vms/{vm}/exec", {
            "argv": list(argv), "stdin": base64.b64encode(stdin).decode(), "timeout": timeout})
        return subprocess.CompletedProcess(list(argv), result["status"],
                                           base64.b64decode(result["stdout"]),
                                           base64.b64decode(result["stderr"]))

    async def copy_in(self, vm: str, source: str | Path, guest_path: str) -> int:
        """Copy the host file ``source`` to ``guest_path`` in the guest, in pieces the
        API carries; the bytes copied."""
        data = Path(source).read_bytes()
        for at in range(0, max(len(data), 1), COPY_IN_PIECE):
            redirect = ">>" if at else ">"
            self._copied(await self.exec(vm, ["sh", "-c", f'cat {redirect} "$1"', "sh",
                                              guest_path], data[at:at + COPY_IN_PIECE]),
                         guest_path)
        return len(data)

    async def copy_out(self, vm: str, guest_path: str, target: str | Path) -> int:
        """Copy the guest's file ``guest_path`` to the host file ``target``; the bytes
        copied."""
        pieces = []
        while True:
            piece = self._copied(await self.exec(vm, ["sh", "-c", _READ_PIECE, "sh", guest_path,
                                                      str(len(pieces) * COPY_OUT_BLOCKS)]),
                                 guest_path)
            pieces.append(piece)
            if len(piece) < COPY_OUT_PIECE:
                break
        data = b"".join(pieces)
        Path(target).write_bytes(data)
        return len(data)

    @staticmethod
    def _copied(result: subprocess.CompletedProcess, path: str) -> bytes:
        if result.returncode:
            raise ApiError(result.stderr.decode(errors="replace").strip() or
                           f"{path}: copy failed with status {result.returncode}")
        return result.stdout

    async def console_log(self, vm: str) -> bytes:
        return await self.request("GET", f"/v1/vms/{vm}/console/log")

    async def host(self) -> dict[str, Any]:
        """Host-wide memory: KSM's counters and the guests' RAM summed."""
        return await self.request("GET", "/v1/host")

    async def networks(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/v1/networks")

    async def create_network(self, name: str, **options: Any) -> dict[str, Any]:
        """``subnet`` (a CIDR, "auto" or None for a plain segment) and ``nat``."""
        return await self.request("POST", "/v1/networks", {"name": name, **options})

    async def network(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/networks/{name}")

    async def delete_network(self, name: str) -> None:
        await self.request("DELETE", f"/v1/networks/{name}")

    @contextlib.asynccontextmanager
    async def debugger(self, vm: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket (``async with``) carrying a gdb remote-protocol stream to the VM's
        gdb stub: the guest halts until the debugger continues."""
        try:
            ws = await self._session.ws_connect(f"{self.base}/v1/vms/{vm}/gdb")
        except aiohttp.WSServerHandshakeError as err:
            raise ApiError(UNAUTHORIZED if err.status == 401 else
                           f"cannot debug {vm} (HTTP {err.status})", err.status) from None
        async with ws:
            yield ws

    @contextlib.asynccontextmanager
    async def console(self, vm: str,
                      replay: bool = True) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        """A WebSocket (``async with``): receive guest output, ``send_bytes`` keystrokes."""
        try:
            ws = await self._session.ws_connect(
                f"{self.base}/v1/vms/{vm}/console" + ("?replay=1" if replay else ""))
        except aiohttp.WSServerHandshakeError as err:
            raise ApiError(UNAUTHORIZED if err.status == 401 else
                           f"cannot attach to {vm}'s console (HTTP {err.status})",
                           err.status) from None
        async with ws:
            yield ws
