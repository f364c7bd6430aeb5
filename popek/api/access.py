"""Who may call the API, and which host paths their requests may name.

The Unix socket is owner-only, so whoever connects to it already is the VMM's user: it
needs no token, and its requests may name any path, as ``popek run`` may (unless
``--restrict-paths``). A TCP connection proves nothing about its peer: every request on
it, the console WebSocket included, must carry ``Authorization: Bearer TOKEN``, and its
requests may only name paths the VMM's :class:`~popek.vmm.paths.PathPolicy` allows. A
refused request gets a bare 401 that does not say whether the token was missing or wrong.
"""

from __future__ import annotations

import hmac
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from popek.vmm.paths import PathPolicy

PATHS = web.RequestKey("paths", PathPolicy)  # the policy a request's paths must pass
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UNRESTRICTED = PathPolicy()


@dataclass(frozen=True)
class Access:
    token: str | None  # what TCP requests must carry; None refuses every TCP request
    paths: PathPolicy  # for requests over TCP
    restrict_unix: bool = False  # the same policy on the Unix socket

    @web.middleware
    async def admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The first middleware: nothing of a refused request is read or routed."""
        if _over_unix_socket(request):
            request[PATHS] = self.paths if self.restrict_unix else UNRESTRICTED
        elif self.token is not None and _bearer(request, self.token):
            request[PATHS] = self.paths
        else:
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)


def _over_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _bearer(request: web.Request, token: str) -> bool:
    """The request carries ``token``; compared in constant time, so the time a refusal
    takes says nothing about how much of a guess was right."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(errors="replace"), token.encode())
