"""How system call handlers are declared: by name, with the arguments they take.

A handler is ``def name(p, arg0, ...) -> int`` receiving the raw 64-bit argument
registers; it returns the result (a negative errno is an error) or raises
SyscallError, OSError or GuestFault, which the dispatcher turns into -errno.
"""

from __future__ import annotations

from collections.abc import Callable

from popek.user.syscall_table import SYSCALL_NUMBERS

Handler = Callable[..., int]
HANDLERS: dict[int, tuple[Handler, int]] = {}  # number -> (handler, argument count)
M64 = (1 << 64) - 1


def syscall(*names: str) -> Callable[[Handler], Handler]:
    """Register the decorated function as the handler of the system calls ``names``."""

    def register(fn: Handler) -> Handler:
        nargs = fn.__code__.co_argcount - 1
        for name in names:
            HANDLERS[SYSCALL_NUMBERS[name]] = (fn, nargs)
        return fn

    return register


def i32(value: int) -> int:
    """A C ``int`` argument: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def i64(value: int) -> int:
    """A C ``long`` argument, signed."""
    return value - (1 << 64) if value >> 63 else value
