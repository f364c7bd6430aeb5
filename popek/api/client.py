"""The Python SDK: an asyncio client for the VMM's REST API.

``popek vm ...`` is built on it, and so can be any program that manages guests::

    async with Client() as vmm:
        vm = await vmm.create(kernel="/path/Image", mem=256 << 20)
        await vmm.snapshot(vm["id"], "/tmp/vm.snap")

Over TCP, pass the VMM's API token (:func:`popek.api.token.read` reads its file)::

    async with Client(url="http://127.0.0.1:8080", token=token) as vmm: ...
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from popek.api.endpoint import default_socket

UNAUTHORIZED = ("unauthorized: the VMM wants its API token (from the file popek serve "
                "--token-file names)")


class ApiError(Exception):
    """The VMM refused a request (``status`` is the HTTP status) or cannot be reached."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """One connection pool to a VMM on a Unix socket (or ``url`` for TCP, with ``token``)."""

    def __init__(self, socket_path: Path | None = None, url: str | None = None,
                 token: str | None = None) -> None:
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

    async def console_log(self, vm: str) -> bytes:
        return await self.request("GET", f"/v1/vms/{vm}/console/log")

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
