"""Exceptions that carry control out of a system call or a trap, past the engine.

The interpreter writes ``pc`` back in a ``finally`` block, so raising from the trap
handler leaves the hart in a consistent state whatever the exception.
"""

from __future__ import annotations


class ControlFlow(Exception):
    """Not an error: something the run loop or the dispatcher acts on."""


class ProcessExit(ControlFlow):
    """exit/exit_group: the process ends with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Terminated(ControlFlow):
    """The process dies of signal ``sig`` (when the host could not kill us with it)."""

    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.sig = sig


class Resume(ControlFlow):
    """Continue at ``pc`` with the registers as the call left them (rt_sigreturn, execve)."""

    def __init__(self, pc: int) -> None:
        super().__init__(pc)
        self.pc = pc


class Interrupted(ControlFlow):
    """A blocking call was interrupted by a signal the guest handles."""

    def __init__(self, restart: bool) -> None:
        super().__init__(restart)
        self.restart = restart
