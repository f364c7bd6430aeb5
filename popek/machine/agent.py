"""The host end of popek's guest agent: commands run in the guest over its virtio console
port (the agent is ``images/src/popek-agent.c``; its frame format is described there).

One command at a time: :meth:`AgentLink.start` sends the command line and its stdin,
the guest's frames of stdout, stderr and status come back through the port's
``on_output``, and the command's ``done`` callback gets a ``CompletedProcess``, or an
:class:`AgentError`. Everything here runs on the thread that runs the machine. What
the guest sends is untrusted: an unknown frame or more output than :data:`MAX_OUTPUT`
ends the command with an error, never the host.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from popek.devices.virtio.console import AGENT_PORT_NAME, VirtioConsole

if TYPE_CHECKING:  # subprocess (~3 ms of import) only for the result type, made when used
    from subprocess import CompletedProcess

FRAME = struct.Struct("<cI")
STDIN_CHUNK = 64 << 10  # the agent takes frames of up to 1 MiB
MAX_OUTPUT = 256 << 20  # bytes of stdout + stderr one command may return
NO_AGENT = (f"no guest agent answered: the guest must run popek-agent on the virtio console "
            f"port {AGENT_PORT_NAME} (the bundled initramfs starts it at boot)")

Done = Callable[["CompletedProcess | Exception"], None]


class AgentError(Exception):
    """The agent cannot run the command (absent, busy, gone, or it broke the protocol)."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def relink(previous: AgentLink | None, port: VirtioConsole | None,
           max_output: int = MAX_OUTPUT) -> AgentLink | None:
    """The link to a new machine's agent ``port`` (a boot, a reboot, a restore), the
    command running on the ``previous`` machine's failing as that machine is gone."""
    if previous is not None:
        previous.abandon("the guest rebooted")
    return AgentLink(port, max_output) if port is not None else None


class AgentLink:
    """Commands for the agent behind ``port``, and their results."""

    def __init__(self, port: VirtioConsole, max_output: int = MAX_OUTPUT) -> None:
        self.port = port
        self.max_output = max_output
        self.opened = threading.Event()  # a guest program holds the port open
        if port.guest_open:
            self.opened.set()
        port.on_output = self._received
        port.on_open = self._opened
        self._inbox = bytearray()
        self._argv: list[str] = []
        self._out: list[bytearray] = []
        self._done: Done | None = None
        self._discarding = False  # an abandoned command's frames are still coming

    def start(self, argv: Sequence[str], stdin: bytes, done: Done) -> None:
        """Run ``argv`` in the guest with ``stdin``; ``done`` gets the outcome later."""
        if not self.port.guest_open:
            raise AgentError(NO_AGENT)
        if self._done is not None or self._discarding:
            raise AgentError("the agent is still running an earlier command")
        if not argv or any("\0" in arg for arg in argv):
            raise AgentError("a command is a non-empty list of arguments without NUL bytes")
        self._argv, self._out, self._done = list(argv), [bytearray(), bytearray()], done
        self.port.send(frame(b"E", b"".join(arg.encode() + b"\0" for arg in argv)))
        for at in range(0, len(stdin), STDIN_CHUNK):
            self.port.send(frame(b"I", stdin[at:at + STDIN_CHUNK]))
        self.port.send(frame(b"C"))

    def abandon(self, reason: str) -> None:
        """Give up on the running command (it timed out, the machine is going away): its
        ``done`` gets an AgentError; what the guest still sends for it is dropped."""
        if self._done is not None:
            self._discarding = True
            self._finish(AgentError(reason))

    def _finish(self, outcome: CompletedProcess | Exception) -> None:
        done, self._done = self._done, None
        self._out = []
        if done is not None:
            done(outcome)

    def _opened(self, is_open: bool) -> None:
        if is_open:
            self.opened.set()
        else:
            self.opened.clear()
            self._inbox.clear()
            self._discarding = False
            if self._done is not None:
                self._finish(AgentError("the guest agent closed its port mid-command"))

    def _received(self, data: bytes) -> None:
        self._inbox += data
        while len(self._inbox) >= FRAME.size:
            kind, length = FRAME.unpack_from(self._inbox)
            if kind not in b"ORX" or length > self.max_output or (kind == b"X" and length != 4):
                self._inbox.clear()
                self._discarding = False
                if self._done is not None:
                    self._finish(AgentError(f"the guest agent sent a malformed frame "
                                            f"({kind!r}, {length} bytes)"))
                return
            if len(self._inbox) < FRAME.size + length:
                return
            payload = bytes(self._inbox[FRAME.size:FRAME.size + length])
            del self._inbox[:FRAME.size + length]
            self._frame(kind, payload)

    def _frame(self, kind: bytes, payload: bytes) -> None:
        if self._discarding or self._done is None:
            self._discarding = self._discarding and kind != b"X"
            return
        if kind == b"X":
            from subprocess import CompletedProcess

            (status,) = struct.unpack("<i", payload)
            stdout, stderr = (bytes(b) for b in self._out)
            self._finish(CompletedProcess(self._argv, status, stdout, stderr))
            return
        stream = self._out[kind == b"R"]
        stream += payload
        if len(self._out[0]) + len(self._out[1]) > self.max_output:
            self.abandon(f"the command's output passed {self.max_output >> 10} KiB")
