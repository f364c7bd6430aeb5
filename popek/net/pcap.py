"""``pcap=FILE``: every frame a NIC sends or receives, in the libpcap format Wireshark and
tcpdump read (linktype Ethernet, microsecond timestamps).

Each frame is one ``writev`` straight to the file, so a capture is readable while the
guest runs and complete if popek dies. Capturing never stops the network: if the file
cannot be written (disk full), capturing stops and frames keep flowing.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from popek.net.backend import MAX_FRAME, NetBackend

MAGIC = 0xA1B2C3D4  # microsecond timestamps, in the writer's byte order
VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
_FILE_HEADER = struct.Struct("=IHHiIII")  # magic, version, zone, sigfigs, snaplen, linktype
_RECORD = struct.Struct("=IIII")  # seconds, microseconds, captured length, original length


class PcapWriter:
    """Appends frames to a capture file opened (and truncated) by whoever opened the NIC."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._write(_FILE_HEADER.pack(MAGIC, *VERSION, 0, 0, MAX_FRAME, LINKTYPE_ETHERNET))

    def write(self, frame: bytes) -> None:
        if self.fd >= 0:
            usec = time.time_ns() // 1000
            self._write(_RECORD.pack(usec // 1_000_000, usec % 1_000_000, len(frame),
                                     len(frame)), frame)

    def _write(self, *parts: bytes) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CapturedBackend:
    """A backend whose frames, both ways, also go to a capture file."""

    def __init__(self, inner: NetBackend, capture: PcapWriter) -> None:
        self.inner = inner
        self.capture = capture

    @property
    def dropped(self) -> int:
        return self.inner.dropped

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def replug(self, sock: socket.socket) -> None:
        self.inner.replug(sock)  # AttributeError if the inner one cannot

    def receive(self) -> bytes | None:
        frame = self.inner.receive()
        if frame is not None:
            self.capture.write(frame)
        return frame

    def ready_to_send(self) -> bool:
        return self.inner.ready_to_send()

    def send(self, frame: bytes) -> None:
        self.capture.write(frame)
        self.inner.send(frame)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()
        self.capture.close()
