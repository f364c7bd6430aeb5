"""The VMM's REST API (described in docs/openapi.yaml), served by aiohttp.

Routes are thin: parse JSON, call :class:`popek.vmm.manager.Vmm`, answer JSON. Errors
are ``{"error": message}`` with the status the VMM chose (400 bad request, 403 a path
the policy refuses, 404 no such VM or network, 409 wrong state or in use). The console
is a WebSocket carrying raw bytes both ways. Who may call, and which paths a request may
name, is :mod:`popek.api.access`'s middleware's decision; routes pass its path policy on.

When the VMM stops, its guests run on, and so would their console sessions: the
application's shutdown closes each one (``1001 going away``), and cuts off at once a
client that does not read, whose socket would otherwise hold the VMM's exit for as long
as aiohttp waits for a handler (a minute).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from popek import __version__
from popek.api.access import PATHS, Access
from popek.vmm import agent_exec, pagesharing
from popek.vmm.errors import BadRequest, VmmError
from popek.vmm.manager import Vmm

API_VERSION = 1
VMM_KEY = web.AppKey("vmm", Vmm)
CONSOLES_KEY = web.AppKey("consoles", dict)  # each console's WebSocket, and its transport
CLOSE_GRACE = 1.0  # seconds a console client has to take the closing frame
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except VmmError as err:
        return web.json_response({"error": str(err)}, status=err.status)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
        # JSON may escape unpaired surrogates ("\ud800"), which no file name, console or
        # command line can hold: such a body is not text.
        json.dumps(body, ensure_ascii=False).encode()
    # ValueError: not JSON, or not text in its charset; LookupError: an unknown charset;
    # RecursionError: arrays nested deeper than the parser goes.
    except (ValueError, LookupError, RecursionError):
        raise BadRequest("the request body is not JSON text") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _vmm(request: web.Request) -> Vmm:
    return request.app[VMM_KEY]


async def version(request: web.Request) -> web.Response:
    return web.json_response({"popek": __version__, "api": API_VERSION})


async def host(request: web.Request) -> web.Response:
    vmm = _vmm(request)
    return web.json_response(pagesharing.host_report(vmm.page_sharing, vmm.list()))


async def list_vms(request: web.Request) -> web.Response:
    return web.json_response(_vmm(request).list())


async def create_vm(request: web.Request) -> web.Response:
    vm = await _vmm(request).create(await _body(request), request[PATHS])
    return web.json_response(vm.info(), status=201)


async def restore_vm(request: web.Request) -> web.Response:
    vm = await _vmm(request).restore(await _body(request), request[PATHS])
    return web.json_response(vm.info(), status=201)


async def get_vm(request: web.Request) -> web.Response:
    return web.json_response(_vmm(request).get(request.match_info["vm"]).info())


async def update_vm(request: web.Request) -> web.Response:
    vm = await _vmm(request).update(request.match_info["vm"], await _body(request))
    return web.json_response(vm.info())


async def delete_vm(request: web.Request) -> web.Response:
    await _vmm(request).delete(request.match_info["vm"])
    return web.Response(status=204)


async def list_networks(request: web.Request) -> web.Response:
    return web.json_response(_vmm(request).networks.list())


async def create_network(request: web.Request) -> web.Response:
    networks = _vmm(request).networks
    switch = networks.create(await _body(request))
    return web.json_response(networks.info(switch.name), status=201)


async def get_network(request: web.Request) -> web.Response:
    return web.json_response(_vmm(request).networks.info(request.match_info["net"]))


async def delete_network(request: web.Request) -> web.Response:
    await _vmm(request).networks.delete(request.match_info["net"])
    return web.Response(status=204)


def _action(name: str) -> Handler:
    async def act(request: web.Request) -> web.Response:
        vm = _vmm(request).get(request.match_info["vm"])
        if name == "kill":
            vm.kill()
            await vm.wait_stopped()
        else:
            await getattr(vm, name)()
        return web.json_response(vm.info())

    return act


async def shutdown_vm(request: web.Request) -> web.Response:
    vm = await _vmm(request).shutdown(request.match_info["vm"], await _body(request))
    return web.json_response(vm.info())


async def snapshot_vm(request: web.Request) -> web.Response:
    return web.json_response(
        await _vmm(request).snapshot(request.match_info["vm"], await _body(request),
                                     request[PATHS]), status=201)


async def migrate_vm(request: web.Request) -> web.Response:
    vm = await _vmm(request).migrate(request.match_info["vm"], await _body(request),
                                     request[PATHS])
    return web.json_response(vm.info(), status=202)


async def incoming_migration(request: web.Request) -> web.Response:
    local = request.transport.get_extra_info("sockname") if request.transport else None
    offer = await _vmm(request).expect_incoming(await _body(request), request[PATHS], local)
    return web.json_response(offer, status=201)


async def exec_in_vm(request: web.Request) -> web.Response:
    argv, stdin, timeout = agent_exec.request(await _body(request))
    vm = _vmm(request).get(request.match_info["vm"])
    return web.json_response(await vm.exec(argv, stdin, timeout))


async def console_log(request: web.Request) -> web.Response:
    vm = _vmm(request).get(request.match_info["vm"])
    return web.Response(body=bytes(vm.console.data),
                        content_type="application/octet-stream")


async def console(request: web.Request) -> web.WebSocketResponse:
    """Binary frames out: guest output (the scrollback first with ``?replay=1``); binary or
    text frames in: keystrokes. Ends when the guest stops or the client goes away."""
    vm = _vmm(request).get(request.match_info["vm"])
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)
    queue = vm.console.attach()
    request.app[CONSOLES_KEY][ws] = request.transport
    try:
        if request.query.get("replay") in ("1", "true") and vm.console.data:
            await ws.send_bytes(bytes(vm.console.data))
        if not vm.alive:
            return ws
        await _relay(queue, ws, asyncio.create_task(_to_guest(ws, vm)))
    finally:
        request.app[CONSOLES_KEY].pop(ws, None)
        vm.console.detach(queue)
        await ws.close()
    return ws


async def debugger(request: web.Request) -> web.WebSocketResponse:
    """A gdb remote-protocol stream as a WebSocket (``popek vm debug`` relays gdb's TCP
    connection): binary frames both ways; the guest halts while it opens, and runs on
    when either side closes. One debugger per VM (409 for a second)."""
    vm = _vmm(request).get(request.match_info["vm"])
    stub_out = await vm.debug()
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    try:
        await ws.prepare(request)
        request.app[CONSOLES_KEY][ws] = request.transport
        await _relay(stub_out, ws, asyncio.create_task(_to_stub(ws, vm)))
    finally:
        request.app[CONSOLES_KEY].pop(ws, None)
        vm.end_debug()
        await ws.close()
    return ws


async def _relay(queue: asyncio.Queue[bytes | None], ws: web.WebSocketResponse,
                 incoming: asyncio.Task[None]) -> None:
    """Send ``queue``'s bytes to the client until they end (None) or ``incoming``, the
    task taking the client's messages, does (the client went away)."""
    while True:
        output = asyncio.create_task(queue.get())
        await asyncio.wait({output, incoming}, return_when=asyncio.FIRST_COMPLETED)
        if incoming.done() or output.result() is None:
            output.cancel()
            break
        await ws.send_bytes(output.result())
    incoming.cancel()


async def _to_stub(ws: web.WebSocketResponse, vm: Any) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            vm.send_debug(msg.data)


async def _close_consoles(app: web.Application) -> None:
    """The VMM is stopping: end every console session, the guests' lives aside."""
    async def close(ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> None:
        try:
            await asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY,
                                            message=b"the VMM is stopping"), CLOSE_GRACE)
        except (TimeoutError, ConnectionError):
            pass
        if transport is not None:
            transport.abort()  # a client that does not read is cut off
    await asyncio.gather(*(close(*session) for session in list(app[CONSOLES_KEY].items())))


async def _to_guest(ws: web.WebSocketResponse, vm: Any) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            vm.send_input(msg.data)
        elif msg.type == WSMsgType.TEXT:
            vm.send_input(msg.data.encode())


def routes() -> list[web.RouteDef]:
    return [
        web.get("/v1/version", version),
        web.get("/v1/vms", list_vms),
        web.post("/v1/vms", create_vm),
        web.post("/v1/snapshots/restore", restore_vm),
        web.get("/v1/vms/{vm}", get_vm),
        web.patch("/v1/vms/{vm}", update_vm),
        web.delete("/v1/vms/{vm}", delete_vm),
        *(web.post(f"/v1/vms/{{vm}}/{name}", _action(name))
          for name in ("start", "pause", "resume", "kill")),
        web.post("/v1/vms/{vm}/shutdown", shutdown_vm),
        web.post("/v1/vms/{vm}/snapshot", snapshot_vm),
        web.post("/v1/vms/{vm}/migrate", migrate_vm),
        web.post("/v1/migrations", incoming_migration),
        web.post("/v1/vms/{vm}/exec", exec_in_vm),
        web.get("/v1/vms/{vm}/console", console),
        web.get("/v1/vms/{vm}/console/log", console_log),
        web.get("/v1/vms/{vm}/gdb", debugger),
        web.get("/v1/networks", list_networks),
        web.get("/v1/host", host),
        web.post("/v1/networks", create_network),
        web.get("/v1/networks/{net}", get_network),
        web.delete("/v1/networks/{net}", delete_network),
    ]


def make_app(vmm: Vmm, access: Access) -> web.Application:
    app = web.Application(middlewares=[access.admit, _errors], client_max_size=1 << 20)
    app[VMM_KEY] = vmm
    app[CONSOLES_KEY] = {}
    app.on_shutdown.append(_close_consoles)
    app.add_routes(routes())
    return app
