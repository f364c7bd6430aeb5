"""``popek.Client``: the VMM's REST API as blocking methods, for scripts and notebooks.

Each method is the asyncio client's (:class:`popek.api.client.Client`) of the same name,
run on an event loop of the client's own thread, so this works from any code, async or
not, and the two can never disagree on an operation::

    with popek.Client() as vmm:                       # the default socket, as popek vm uses
        vm = vmm.create(name="web", mem=128 << 20)
        vmm.pause("web"); vmm.snapshot("web", "/tmp/web.snap"); vmm.resume("web")
        print(vmm.info("web")["instructions"])
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from popek.api.client import Client as AsyncClient


class Client:
    """A VMM at ``target``: its Unix socket's path or its ``http://HOST:PORT`` URL (which
    needs ``token``); default, the socket ``popek serve`` uses by default."""

    def __init__(self, target: str | Path | None = None, token: str | None = None) -> None:
        self.api = AsyncClient(target, token=token)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="popek-client",
                                        daemon=True)
        self._thread.start()
        self._run(self.api.__aenter__())

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self.api.__aexit__(None, None, None))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocking(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self.api, name)(*args, **kwargs))
    return call


for _name, _method in inspect.getmembers(AsyncClient, inspect.iscoroutinefunction):
    if not _name.startswith("_"):
        setattr(Client, _name, _blocking(_name, _method))
