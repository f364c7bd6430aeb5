"""QEMU's ``-netdev dgram``: one frame per datagram, over a Unix or UDP datagram socket.

The socket arrives bound to ``local=`` and, where the peer already existed, connected to
``remote=``; otherwise frames go out with ``sendto`` to the remote address (a peer that
starts later is still reached). Datagrams are whole frames, so there is no framing to
lose; an oversized one (longer than :data:`~popek.net.backend.MAX_FRAME`) is dropped.
"""

from __future__ import annotations

import socket
from typing import Any

from popek.net.backend import MAX_FRAME

RECEIVE_BATCH = 64  # datagrams skipped at most per call (errors, oversized ones)


class DgramBackend:
    """A NIC's frames as datagrams; a full socket holds back one frame."""

    def __init__(self, sock: socket.socket, remote: Any = None) -> None:
        """``remote``: where to send when ``sock`` is not connected (None: it is)."""
        sock.setblocking(False)
        self.sock = sock
        self.remote = remote
        self.dropped = 0
        self._out: bytes | None = None

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def receive(self) -> bytes | None:
        for _ in range(RECEIVE_BATCH):
            try:
                data = self.sock.recv(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:  # an ICMP error for an earlier send, reported once
                continue
            if len(data) <= MAX_FRAME:
                return data
            self.dropped += 1
        return None

    def ready_to_send(self) -> bool:
        return self._out is None

    def send(self, frame: bytes) -> None:
        try:
            if self.remote is None:
                self.sock.send(frame)
            else:
                self.sock.sendto(frame, self.remote)
        except (BlockingIOError, InterruptedError):
            self._out = frame
        except OSError:  # nobody at the remote address (yet), or too large for UDP
            self.dropped += 1

    def flush(self) -> None:
        frame, self._out = self._out, None
        if frame is not None:
            self.send(frame)

    def close(self) -> None:
        self.sock.close()
