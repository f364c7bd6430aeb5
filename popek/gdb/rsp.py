"""The GDB remote serial protocol's framing: ``$payload#checksum`` packets, acks and the
interrupt byte. Input is untrusted (anyone may connect): every malformed frame becomes
an event the stub answers, never an exception."""

from __future__ import annotations

from dataclasses import dataclass

PACKET_SIZE = 0x4000  # the largest packet popek accepts (advertised as PacketSize)
INTERRUPT = 0x03  # Ctrl-C while the target runs
_ESCAPED = b"#$}*"


@dataclass(frozen=True)
class Packet:
    payload: bytes


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Malformed:
    """A frame with a wrong checksum, or one too long: the sender is asked to resend."""

    reason: str


@dataclass(frozen=True)
class Nak:
    """The debugger did not get our last packet intact."""


Event = Packet | Interrupt | Malformed | Nak


class PacketReader:
    """Splits a byte stream into protocol events."""

    def __init__(self, limit: int = PACKET_SIZE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf
        buf += data
        events: list[Event] = []
        while buf:
            first = buf[0]
            if first != ord("$"):
                del buf[0]  # acks, and garbage between packets
                if first == INTERRUPT:
                    events.append(Interrupt())
                elif first == ord("-"):
                    events.append(Nak())
                continue
            end = buf.find(b"#", 1, self.limit + 2)
            if end < 0:
                if len(buf) > self.limit + 1:
                    del buf[:1]  # resynchronise on the next '$'
                    events.append(Malformed(f"packet longer than {self.limit} bytes"))
                    continue
                break
            if len(buf) < end + 3:
                break
            payload, digits = bytes(buf[1:end]), bytes(buf[end + 1:end + 3])
            del buf[:end + 3]
            try:
                ok = int(digits, 16) == checksum(payload)
            except ValueError:
                ok = False
            events.append(Packet(payload) if ok else Malformed("bad checksum"))
        return events


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``payload`` as a packet on the wire (the payload must already be escaped)."""
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    """Binary data for a packet (qXfer replies): '#', '$', '}' and '*' escaped."""
    out = bytearray()
    for byte in data:
        if byte in _ESCAPED:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The bytes of an X packet's binary data."""
    out = bytearray()
    it = iter(data)
    for byte in it:
        if byte == 0x7D:
            byte = next(it, 0x20 ^ 0x7D) ^ 0x20
        out.append(byte)
    return bytes(out)
