"""The live-migration stream: versioned, framed, every frame checksummed.

A migration is one connection between the source's worker and the destination's. The
source writes a preamble, then frames; the destination answers with frames on the same
connection. Integers are little-endian::

    preamble   magic "POPEKMIG", u32 format version, u32 CRC-32 of those 12 bytes
    frame      u8 kind, 3 zero bytes, u32 payload length, u32 CRC-32 (of the first 8
               bytes and the payload), payload

Frames, in the order the source sends them: ``HELLO`` (JSON: the machine's
configuration and RAM size, and the sizes of the disks it copies, if any), ``PAGES`` (u32
first page, u32 count, the pages' bytes), ``ZERO`` (u32 first page, u32 count: pages that
are zero now) and ``DISK`` (u32 disk index, u64 byte offset, the bytes there), many times
over as the pre-copy rounds go, then ``STATE`` (JSON: harts, firmware, devices, console,
counters, taken while the guest is paused; for a post-copy, the pages still to come)
and ``END``. The destination answers ``READY`` once it has built the machine (or
``ERROR``, JSON ``{"error": ...}``, and closes); the source then sends ``GO``, its
commitment never to run the guest again. In a post-copy the connection stays open after
GO: the destination asks for pages its guest touched with ``REQUEST`` (u32 first page,
u32 count, repeated), the source sends them and pushes the rest as ``PAGES`` and ends
with ``DONE``.

Reading is split in two. :func:`decode_preamble` and :func:`decode_frame` are pure
functions of bytes: they check the magic, the version (a newer format is refused with
advice, before anything else is read), the length bound, the checksum and each kind's
payload shape, and raise :class:`WireError` with a one-line reason. :func:`decode_stream`
reads a whole stream that way. :class:`Connection` only moves bytes between a socket and
those functions, so a corrupt or forged stream is refused exactly as the decoders say.
"""

from __future__ import annotations

import json
import socket
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from popek.cpu.physmem import PAGE_SIZE

MAGIC = b"POPEKMIG"
FORMAT_VERSION = 2  # 2: DISK, REQUEST and DONE
HELLO, PAGES, ZERO, STATE, END, READY, GO, ERROR, DISK, REQUEST, DONE = range(1, 12)
KIND_NAMES = {HELLO: "HELLO", PAGES: "PAGES", ZERO: "ZERO", STATE: "STATE", END: "END",
              READY: "READY", GO: "GO", ERROR: "ERROR", DISK: "DISK", REQUEST: "REQUEST",
              DONE: "DONE"}
MAX_PAGES_PER_FRAME = 256  # 1 MiB of pages: a frame's checksum covers a bounded amount
MAX_PAYLOAD = 32 << 20  # JSON state (hex hart buffers, a console ring) stays far below
MAX_DISK_BYTES = 1 << 20  # of a DISK frame
MAX_REQUEST_RUNS = 256
_PREAMBLE = struct.Struct("<8sI")
_CRC = struct.Struct("<I")
_HEADER = struct.Struct("<B3xII")  # kind, length, CRC
_RUN = struct.Struct("<II")  # first page, count
_DISK = struct.Struct("<IQ")  # disk index, byte offset
PREAMBLE_SIZE = _PREAMBLE.size + _CRC.size
HEADER_SIZE = _HEADER.size
_JSON_KINDS = (HELLO, STATE, ERROR)
_EMPTY_KINDS = (END, READY, GO, DONE)


class WireError(Exception):
    """A stream that is not a migration this popek can take; the message says why."""


@dataclass(frozen=True)
class Frame:
    kind: int
    payload: bytes

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]

    def json(self) -> dict[str, Any]:
        """The object a HELLO, STATE or ERROR frame carries (checked by the decoder)."""
        return json.loads(self.payload)

    def run(self) -> tuple[int, int]:
        """(first page, count) of a PAGES or ZERO frame."""
        return _RUN.unpack_from(self.payload)

    def pages(self) -> memoryview:
        """The bytes of a PAGES frame's pages."""
        return memoryview(self.payload)[_RUN.size:]

    def disk(self) -> tuple[int, int, memoryview]:
        """(disk index, byte offset, bytes) of a DISK frame."""
        index, offset = _DISK.unpack_from(self.payload)
        return index, offset, memoryview(self.payload)[_DISK.size:]

    def runs(self) -> list[tuple[int, int]]:
        """The (first page, count) runs a REQUEST frame asks for."""
        return list(_RUN.iter_unpack(self.payload))


# -- writing ---------------------------------------------------------------------------------------
def preamble(version: int = FORMAT_VERSION) -> bytes:
    head = _PREAMBLE.pack(MAGIC, version)
    return head + _CRC.pack(zlib.crc32(head))


def header(kind: int, payload: bytes | memoryview, *, first: int | None = None,
           count: int = 0) -> bytes:
    """The header of a frame of ``kind`` whose payload is ``payload``; for PAGES and ZERO
    the run (``first``, ``count``) is part of the payload and goes into the header bytes
    returned (which then end with the run), so page bytes are never copied to frame them."""
    run = _RUN.pack(first, count) if first is not None else b""
    length = len(run) + len(payload)
    head = _HEADER.pack(kind, length, 0)[:8]
    crc = zlib.crc32(payload, zlib.crc32(run, zlib.crc32(head)))
    return head + _CRC.pack(crc) + run


def encode_disk(index: int, offset: int, data: bytes) -> bytes:
    return encode(DISK, _DISK.pack(index, offset) + data)


def encode_request(runs: list[tuple[int, int]]) -> bytes:
    return encode(REQUEST, b"".join(_RUN.pack(first, count) for first, count in runs))


def encode(kind: int, payload: bytes = b"") -> bytes:
    return header(kind, payload) + payload


def encode_json(kind: int, obj: dict[str, Any]) -> bytes:
    return encode(kind, json.dumps(obj, separators=(",", ":")).encode())


# -- reading: pure functions of bytes --------------------------------------------------------------
def decode_preamble(data: bytes) -> int:
    """The format version of a stream that begins with ``data``
    (:data:`PREAMBLE_SIZE` bytes); WireError unless it is one this popek reads."""
    if len(data) < _PREAMBLE.size or data[:8] != MAGIC:
        raise WireError("not a popek migration stream (bad magic)")
    version = _PREAMBLE.unpack_from(data)[1]
    if version > FORMAT_VERSION:
        raise WireError(f"migration format {version} is newer than this popek reads (up to "
                        f"{FORMAT_VERSION}); upgrade popek on the destination")
    if len(data) < PREAMBLE_SIZE:
        raise WireError("truncated migration preamble")
    if zlib.crc32(data[:_PREAMBLE.size]) != _CRC.unpack_from(data, _PREAMBLE.size)[0]:
        raise WireError("migration preamble fails its checksum")
    if version != FORMAT_VERSION:
        raise WireError(f"unknown migration format {version}")
    return version


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(kind, payload length, CRC) from a frame's first :data:`HEADER_SIZE` bytes;
    WireError for an unknown kind or a length beyond what any frame needs."""
    if len(data) < HEADER_SIZE:
        raise WireError("truncated frame header")
    kind, length, crc = _HEADER.unpack_from(data)
    if kind not in KIND_NAMES or data[1:4] != b"\0\0\0":
        raise WireError(f"unknown frame kind {kind} (corrupt stream)")
    limit = _RUN.size + MAX_PAGES_PER_FRAME * PAGE_SIZE if kind == PAGES else \
        _RUN.size if kind == ZERO else 0 if kind in _EMPTY_KINDS else \
        _DISK.size + MAX_DISK_BYTES if kind == DISK else \
        _RUN.size * MAX_REQUEST_RUNS if kind == REQUEST else MAX_PAYLOAD
    if length > limit:
        raise WireError(f"{KIND_NAMES[kind]} frame of {length} bytes, more than the "
                        f"{limit} it may hold (corrupt stream)")
    return kind, length, crc


def decode_frame(data: bytes, offset: int = 0) -> tuple[Frame, int] | None:
    """The frame at ``data[offset:]`` and the offset after it, or None if ``data`` ends
    before the frame does; WireError if the frame is corrupt or malformed."""
    if len(data) - offset < HEADER_SIZE:
        return None
    kind, length, crc = decode_header(data[offset:offset + HEADER_SIZE])
    end = offset + HEADER_SIZE + length
    if len(data) < end:
        return None
    payload = bytes(data[offset + HEADER_SIZE:end])
    return check_frame(kind, crc, data[offset:offset + 8], payload), end


def check_frame(kind: int, crc: int, head: bytes, payload: bytes) -> Frame:
    """The frame whose header began with ``head`` (8 bytes) and carried ``crc``, once its
    checksum and its payload's shape are right; WireError otherwise."""
    name = KIND_NAMES[kind]
    if zlib.crc32(payload, zlib.crc32(head)) != crc:
        raise WireError(f"a {name} frame fails its checksum (corrupt stream)")
    if kind in (PAGES, ZERO):
        if len(payload) < _RUN.size:
            raise WireError(f"{name} frame without its page run (corrupt stream)")
        first, count = _RUN.unpack_from(payload)
        expected = _RUN.size + (count * PAGE_SIZE if kind == PAGES else 0)
        if not 0 < count <= MAX_PAGES_PER_FRAME or len(payload) != expected:
            raise WireError(f"{name} frame of {count} pages in {len(payload)} bytes "
                            "(corrupt stream)")
    elif kind == DISK and len(payload) < _DISK.size:
        raise WireError("DISK frame without its disk and offset (corrupt stream)")
    elif kind == REQUEST and (not payload or len(payload) % _RUN.size or any(
            not 0 < count <= MAX_PAGES_PER_FRAME for _, count in _RUN.iter_unpack(payload))):
        raise WireError(f"REQUEST frame of {len(payload)} bytes is not page runs "
                        "(corrupt stream)")
    elif kind in _JSON_KINDS:
        try:
            obj = json.loads(payload)
        except ValueError:
            raise WireError(f"{name} frame is not JSON (corrupt stream)") from None
        if not isinstance(obj, dict):
            raise WireError(f"{name} frame is not a JSON object (corrupt stream)")
    return Frame(kind, payload)


def decode_stream(data: bytes) -> list[Frame]:
    """Every frame of a complete stream (preamble first); WireError at the first thing
    wrong, a stream that ends inside a frame included."""
    decode_preamble(data[:PREAMBLE_SIZE])
    frames, offset = [], PREAMBLE_SIZE
    while offset < len(data):
        decoded = decode_frame(data, offset)
        if decoded is None:
            raise WireError("the stream ends inside a frame (truncated)")
        frame, offset = decoded
        frames.append(frame)
    return frames


def os_reason(err: OSError) -> str:
    """A failed link's reason, in a few words."""
    return err.strerror or str(err) or type(err).__name__


# -- a socket --------------------------------------------------------------------------------------
class Connection:
    """Frames over a connected, blocking stream socket. OSError (a timeout included)
    means the link failed; WireError, that the other end sent something wrong."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0  # bytes, preamble and headers included

    def send_preamble(self) -> None:
        self._send(preamble())

    def send(self, kind: int, payload: bytes = b"") -> None:
        self._send(encode(kind, payload))

    def send_json(self, kind: int, obj: dict[str, Any]) -> None:
        self._send(encode_json(kind, obj))

    def send_request(self, runs: list[tuple[int, int]]) -> None:
        self._send(encode_request(runs))

    def send_disk(self, index: int, offset: int, data: bytes) -> None:
        self._send(encode_disk(index, offset, data))

    def send_run(self, kind: int, first: int, count: int, pages: memoryview | bytes = b"") -> None:
        """A PAGES frame (``pages``: the bytes of ``count`` pages) or a ZERO frame."""
        head = header(kind, pages, first=first, count=count)
        if not pages:
            self._send(head)
            return
        parts = [memoryview(head), memoryview(pages)]
        total = len(head) + len(pages)
        while parts:  # one system call a frame, unless the socket takes only part of it
            done = self.sock.sendmsg(parts)
            while parts and done >= len(parts[0]):
                done -= len(parts.pop(0))
            if parts:
                parts[0] = parts[0][done:]
        self.sent += total

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def receive_preamble(self) -> int:
        return decode_preamble(self._exactly(PREAMBLE_SIZE))

    def receive(self) -> Frame:
        head = self._exactly(HEADER_SIZE)
        kind, length, crc = decode_header(head)
        return check_frame(kind, crc, head[:8], self._exactly(length))

    def _exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            chunk = self.sock.recv_into(view[got:])
            if not chunk:
                raise ConnectionResetError("the other end closed the migration connection")
            got += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()
