"""Fuzz target: the destination of a live migration (``popek.vmm.migration.immigrate``
reading the stream through ``migration_wire``, then building the machine it describes).

A migration stream comes from another VMM over a socket: it may be truncated, corrupt,
from another version or forged. Whatever it holds, the destination ends in
:class:`MigrationError` (having told the source why) or in a machine that works; never in
another exception, and never in an allocation that a length field asked for. "Works" is
what the snapshot target checks of a restored machine: every device register a guest may
touch, a slice of its code, its host events, and saving it again.

Every frame carries a CRC-32, so mutating streams blindly would only ever test the
checksums. The first byte of an input therefore says how to read the rest (``flags & 3``):

- raw: the rest is the stream, as it is;
- frames: the rest is records (kind byte, u32 length, payload) that the target frames
  with right checksums (kind bit 7: the checksum is wrong), after a right preamble;
- edit: the rest is a list of edits (:class:`JsonEdits`) to a real migration's HELLO
  and STATE objects, sent with the real migration's pages.

The real migration is taken at start-up from a tiny bare-metal guest (16 MiB) waiting for
interrupts, as the snapshot target's is.
"""

from __future__ import annotations

import functools
import json
import socket
import struct
from typing import Any

from popek.cpu.physmem import PAGE_SIZE
from popek.machine.config import MachineConfig, config_to_json
from popek.machine.runner import EventSources
from popek.machine.virt import VirtMachine
from popek.vmm import migration_wire as wire
from popek.vmm.migration import MigrationError, immigrate
from popek.vmm.snapshot import nonzero_runs
from tests.fuzz.harness import JsonEdits, Target
from tests.fuzz.snapshot import _probe
from tests.vmm_guests import guest

RAW, FRAMES, EDIT = 0, 1, 2
BAD_CRC = 0x80
_RECORD = struct.Struct("<BI")
# The whole stream waits in the socket before the destination reads it: no thread, and a
# destination that stops reading early cannot block the target.
SOCKET_BUFFER = 4 << 20


@functools.cache
def _source() -> tuple[MachineConfig, dict[str, Any], list[bytes], dict[str, Any]]:
    """(configuration, HELLO, the PAGES frames, STATE) of a real migration."""
    out = bytearray()
    config = MachineConfig(kernel=guest("idle"), mem=16 << 20)
    machine = VirtMachine(config, out.extend, events=EventSources())
    while b"idle ready" not in out:
        machine.run_slice()
    hello = {"config": config_to_json(config), "ram_bytes": machine.mem.size}
    pages = []
    for first, count in nonzero_runs(machine.mem):
        for start in range(first, first + count, wire.MAX_PAGES_PER_FRAME):
            n = min(wire.MAX_PAGES_PER_FRAME, first + count - start)
            data = machine.mem.ram[start * PAGE_SIZE:(start + n) * PAGE_SIZE]
            pages.append(wire.header(wire.PAGES, data, first=start, count=n) + data)
    return config, hello, pages, {"machine": machine.save_state()}


def _framed(body: bytes) -> bytes:
    stream, pos = [wire.preamble()], 0
    while pos + _RECORD.size <= len(body):
        kind, length = _RECORD.unpack_from(body, pos)
        pos += _RECORD.size
        payload = body[pos:pos + length]
        pos += len(payload)
        frame = bytearray(wire.encode(kind & 0x7F, payload))
        if kind & BAD_CRC:
            frame[8] ^= 1
        stream.append(bytes(frame))
    return b"".join(stream)


def _edited(body: bytes) -> bytes:
    _, hello, pages, state = _source()
    tree = JsonEdits(body).apply({"hello": hello, "state": state})
    if not isinstance(tree, dict):
        tree = {}
    hello, state = tree.get("hello"), tree.get("state")
    frames = [wire.preamble()]
    frames.append(wire.encode_json(wire.HELLO, hello) if isinstance(hello, dict)
                  else wire.encode(wire.HELLO, b"null"))
    frames += pages
    frames.append(wire.encode_json(wire.STATE, state) if isinstance(state, dict)
                  else wire.encode(wire.END))
    frames += [wire.encode(wire.END), wire.encode(wire.GO)]
    return b"".join(frames)


def one(data: bytes) -> None:
    if not data:
        return
    flags, body = data[0], data[1:]
    stream = body if flags & 3 == RAW else _framed(body) if flags & 3 == FRAMES \
        else _edited(body)
    config = _source()[0]
    sources = EventSources()

    def build(memory: Any) -> VirtMachine:
        return VirtMachine(config, lambda _: None, memory=memory, blank=True, events=sources)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        ours.sendall(stream)
        ours.shutdown(socket.SHUT_WR)
        try:
            arrival = immigrate(theirs, config, build)
        except MigrationError:
            return
        arrival.wait_for_go()
    _probe(arrival.machine, sources)


def seeds() -> dict[str, bytes]:
    _, hello, pages, state = _source()

    def record(kind: int, payload: bytes) -> bytes:
        return _RECORD.pack(kind, len(payload)) + payload

    hello_bytes, state_bytes = json.dumps(hello).encode(), json.dumps(state).encode()
    real = [record(wire.HELLO, hello_bytes), record(wire.ZERO, struct.pack("<II", 8, 4)),
            record(wire.STATE, state_bytes), record(wire.END, b""), record(wire.GO, b"")]
    return {"edit-none": bytes([EDIT]), "edit-pc": bytes([EDIT, 0x80, 1, 4]),
            "frames-real": bytes([FRAMES]) + b"".join(real),
            "frames-bad-crc": bytes([FRAMES]) + record(wire.HELLO | BAD_CRC, hello_bytes),
            "raw-real": bytes([RAW]) + _edited(b"")}


TARGET = Target(one=one, ci_runs=2000, max_len=1 << 17, seeds=seeds)
