"""The exceptions a WebAssembly module can cause, named by the specification's error classes.

Every failure caused by a module (its bytes, its types, its links or its running code) is a
:class:`WasmError`; the message is the specification's text ("type mismatch", "integer
divide by zero", ...), which test scripts compare. Nothing else escapes from popek.wasm
except exceptions raised by host functions, which propagate unchanged.
"""

from __future__ import annotations


class WasmError(Exception):
    """A module failed to decode, validate, link or run."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedModule(WasmError):
    """The bytes are not a module in the binary format."""


class InvalidModule(WasmError):
    """The module decodes but breaks a validation rule (e.g. a type mismatch)."""


class LinkError(WasmError):
    """An import is missing or has the wrong type."""


class Trap(WasmError):
    """Execution stopped on a trap ("unreachable", "out of bounds memory access", ...)."""


class OutOfFuel(Trap):
    """The instance used up the fuel it was given."""

    def __init__(self) -> None:
        super().__init__("all fuel consumed")
