"""QEMU's stream framing (``-netdev stream``/``socket``): each frame is a 4-byte big-endian
length, then the frame, over a connected stream socket (Unix or TCP).

passt speaks it on its socket, QEMU on its stream netdevs and popek's switch ports on
theirs, so one guest can join another's network whoever runs it. The peer is untrusted:
a length above :data:`~popek.net.backend.MAX_FRAME` is skipped byte by byte without being
buffered, and no more than one frame plus one read is ever held in memory.
"""

from __future__ import annotations

import socket
import struct

from popek.net.backend import MAX_FRAME

LENGTH = struct.Struct(">I")
RECV_CHUNK = 256 << 10  # bytes read at a time: several large frames per system call


class StreamBackend:
    """A NIC's frames over one connected stream socket (the peer may hang up: then frames
    to it are dropped and there is nothing left to wait for)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.dropped = 0
        self.hung_up = False
        self._in = bytearray()
        self._pos = 0  # where the next frame's length starts in _in
        self._skip = 0  # bytes of an oversized frame still to discard
        self._out = memoryview(b"")  # the part of the last frame a full socket held back

    def fileno(self) -> int | None:
        # A dead socket stays open until close(), so its number cannot be reused by a
        # new socket while the runner may still have it registered.
        return None if self.hung_up else self.sock.fileno()

    def replug(self, sock: socket.socket) -> None:
        """Carry on over ``sock``, a new connection to the same network (a VMM that adopted
        the guest made its switch port anew); whatever the old one held is lost."""
        self.sock.close()
        sock.setblocking(False)
        self.sock = sock
        self.hung_up = False
        self._in = bytearray()
        self._pos = self._skip = 0
        self._out = memoryview(b"")

    # -- receiving ------------------------------------------------------------------------
    def receive(self) -> bytes | None:
        """The next whole frame; reads the socket at most once, so a peer that keeps it
        busy cannot keep the caller here."""
        frame = self._next_frame()
        if frame is None and self._fill():
            frame = self._next_frame()
        return frame

    def _next_frame(self) -> bytes | None:
        buf, pos = self._in, self._pos
        while True:
            if self._skip:
                n = min(self._skip, len(buf) - pos)
                pos += n
                self._skip -= n
                if self._skip:
                    break
            if len(buf) - pos < LENGTH.size:
                break
            size = LENGTH.unpack_from(buf, pos)[0]
            if size > MAX_FRAME:
                self.dropped += 1
                self._skip = size
                pos += LENGTH.size
                continue
            end = pos + LENGTH.size + size
            if end > len(buf):
                break
            self._pos = end
            return bytes(buf[pos + LENGTH.size:end])
        del buf[:pos]
        self._pos = 0
        return None

    def _fill(self) -> bool:
        """Read what the socket holds; False if there was nothing (or the peer left)."""
        if self.hung_up:
            return False
        try:
            data = self.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self._hang_up()
            return False
        self._in += data
        return True

    # -- sending --------------------------------------------------------------------------
    def ready_to_send(self) -> bool:
        return not self._out

    def send(self, frame: bytes) -> None:
        if self.hung_up:
            self.dropped += 1
            return
        header = LENGTH.pack(len(frame))
        try:
            sent = self.sock.sendmsg([header, frame])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._hang_up()
            self.dropped += 1
            return
        if sent < LENGTH.size + len(frame):
            self._out = memoryview(header + frame)[sent:]

    def flush(self) -> None:
        if not self._out or self.hung_up:
            return
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._hang_up()
            return
        self._out = self._out[sent:]

    def _hang_up(self) -> None:
        self.hung_up = True
        self._out = memoryview(b"")

    def close(self) -> None:
        self.sock.close()


class StreamListener:
    """QEMU's ``stream,listen=``: takes one peer at a time on a listening socket; frames
    sent while nobody is connected are dropped. Accepting never blocks the guest: the
    listening socket is just another descriptor the runner waits on."""

    def __init__(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.peer: StreamBackend | None = None
        self._dropped = 0  # by peers that have left, and while nobody was connected

    @property
    def dropped(self) -> int:
        return self._dropped + (self.peer.dropped if self.peer is not None else 0)

    def _connected(self) -> bool:
        return self.peer is not None and not self.peer.hung_up

    def fileno(self) -> int | None:
        return self.peer.fileno() if self._connected() else self.listener.fileno()

    def receive(self) -> bytes | None:
        if not self._connected() and not self._accept():
            return None
        return self.peer.receive()

    def _accept(self) -> bool:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # e.g. the peer reset the connection before we took it
            return False
        old, self.peer = self.peer, StreamBackend(conn)
        if old is not None:  # closed only now, so the new socket got another number
            self._dropped += old.dropped
            old.close()
        return True

    def ready_to_send(self) -> bool:
        return not self._connected() or self.peer.ready_to_send()

    def send(self, frame: bytes) -> None:
        if self._connected():
            self.peer.send(frame)
        else:
            self._dropped += 1

    def flush(self) -> None:
        if self._connected():
            self.peer.flush()

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.listener.close()
