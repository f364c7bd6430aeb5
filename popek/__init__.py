"""popek: an efficient, isolated duplicate of a real RISC-V machine.

The Python API: :class:`Machine` (a guest in this process), :class:`Client` and
:class:`AsyncClient` (guests of a ``popek serve``). They are imported on first use, so
``import popek`` stays light for the processes that need none of them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Machine": "popek.machine.embedded", "MachineError": "popek.machine.embedded",
    "ConsoleClosed": "popek.machine.expect", "ConfigError": "popek.machine.config",
    "Client": "popek.api.sync_client", "ApiError": "popek.api.client",
    "AgentError": "popek.machine.agent",
}
__all__ = ["AsyncClient", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from popek.api.client import Client
        return Client
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'popek' has no attribute {name!r}")
