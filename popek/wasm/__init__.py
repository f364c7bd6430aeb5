"""WebAssembly 2.0 as popek's high-level-language process VM: decode, validate, link, run.

>>> inst = instantiate(load(data), {"env": {"log": HostFunction(["i32"], [], print_it)}})
>>> inst.call("add", 1, 2)

See :mod:`popek.wasm.instance` for how values cross the Python boundary.
"""

from __future__ import annotations

from popek.wasm.binary import Module, decode
from popek.wasm.errors import InvalidModule, LinkError, MalformedModule, OutOfFuel, Trap, WasmError
from popek.wasm.instance import Function, HostFunction, Instance, instantiate
from popek.wasm.runtime import Global, Memory, Table
from popek.wasm.validate import validate


def load(data: bytes) -> Module:
    """Decode and validate a module; raises MalformedModule or InvalidModule."""
    module = decode(bytes(data))
    validate(module)
    return module


__all__ = ["Function", "Global", "HostFunction", "Instance", "InvalidModule", "LinkError",
           "MalformedModule", "Memory", "Module", "OutOfFuel", "Table", "Trap", "WasmError",
           "instantiate", "load"]
