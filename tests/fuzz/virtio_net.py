"""Fuzz target: virtio-net's frame path, both ways (``popek.devices.virtio.net``).

The guest's driver and the host's peer are both attackers. The driver (the virtio
target's fake driver and its checks: ``tests/fuzz/virtio.py``) builds transmit chains
and receive buffers of any shape; the peer, on the other end of the NIC's stream socket,
sends frames of any length (runts, oversized ones, raw bytes that break QEMU's framing)
and drains what the NIC sent only when the input says, so both directions meet flow
control. Acceptable outcomes are frames passed, frames dropped and counted, and
DEVICE_NEEDS_RESET for a chain that breaks the protocol; the host must only ever receive
whole frames of legal length, and the device must write guest RAM only in its used rings
and the receive buffers it took.

The first byte's top bit picks a NIC whose driver offers mergeable receive buffers
(Linux's choice) or one that must fit each frame in one buffer.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from popek.devices.virtio.mmio import Reg
from popek.devices.virtio.net import (
    DEFAULT_MAC,
    HEADER,
    RX,
    TX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VirtioNet,
)
from popek.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from popek.machine.runner import EventSources
from popek.net.stream import StreamBackend
from tests.fuzz import virtio
from tests.fuzz.harness import Target
from tests.fuzz.virtio import HOST, REG_WRITE, SETUP, Device, _chain, _record


@contextmanager
def _net(_: bool, events: EventSources) -> Iterator[Device]:
    """A NIC whose cable is a stream socket; the host holds the other end."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    with ours, theirs:
        yield VirtioNet(StreamBackend(ours), DEFAULT_MAC, events), theirs


def one(data: bytes) -> None:
    virtio.one(data, {"net": _net})


# -- seeds: a driver that sets both queues up, sends and receives ------------------------
_VERSION_1 = 1 << 32
_FEATURES = _VERSION_1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_MRG_RXBUF
_TX_DESC, _TX_AVAIL, _TX_USED = 0x1000, 0x1400, 0x1800
_RX_DESC, _RX_AVAIL, _RX_USED = 0x2000, 0x2400, 0x2800
_FRAME, _BUFFERS = 0x4000, 0x8000
_ETHERNET = bytes.fromhex("ffffffffffff525400123456") + b"\x08\x00"


def _rx_queue(num: int) -> bytes:
    """Queue RX made ready after SETUP made TX ready (SETUP resets the device first)."""
    out = _record(REG_WRITE, Reg.QUEUE_SEL, 0, RX) + _record(REG_WRITE, Reg.QUEUE_NUM, 0, num)
    for low, addr in ((Reg.QUEUE_DESC_LOW, _RX_DESC), (Reg.QUEUE_DRIVER_LOW, _RX_AVAIL),
                      (Reg.QUEUE_DEVICE_LOW, _RX_USED)):
        out += _record(REG_WRITE, low, 0, virtio.RAM_BASE + addr)
        out += _record(REG_WRITE, low + 4, 0, 0)
    return out + _record(REG_WRITE, Reg.QUEUE_READY, 0, 1)


def _host_frame(payload: bytes) -> bytes:
    return _record(HOST, 0, len(payload), tail=payload)


def _tx(frame: bytes, header: bytes) -> bytes:
    packet = header + frame
    return _record(virtio.RAM_WRITE, _FRAME, len(packet), tail=packet) + \
        _chain(TX, [(_FRAME, len(packet), 0)], _TX_DESC)


def seeds() -> dict[str, bytes]:
    setup = _record(SETUP, _FEATURES, TX, 16, _TX_DESC, _TX_AVAIL, _TX_USED) + _rx_queue(16)
    plain = HEADER.pack(0, 0, 0, 0, 0, 0, 0)
    udp = _ETHERNET + bytes.fromhex("4500001c0000000040110000c0a80002c0a80001") + \
        struct.pack("!HHHH", 68, 67, 8, 0)
    needs_csum = HEADER.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6, 0)
    buffers = b"".join(_chain(RX, [(_BUFFERS + 0x800 * i, 0x800, VIRTQ_DESC_F_WRITE)],
                              _RX_DESC) for i in range(2))
    return {
        "transmit": bytes([0]) + setup + _tx(_ETHERNET + bytes(50), plain)
        + _record(HOST, 0, 0),
        "transmit-checksum": bytes([0]) + setup + _tx(udp, needs_csum) + _record(HOST, 0, 0),
        "receive-merged": bytes([0]) + setup + buffers + _host_frame(_ETHERNET + bytes(3000)),
        "receive-oversized": bytes([0]) + setup + buffers
        + _record(HOST, virtio.PADDED, 0x900, tail=_ETHERNET + bytes(0x900 - 14)),
        "receive-no-buffers": bytes([0]) + setup + _host_frame(_ETHERNET + bytes(60)) + buffers,
        "receive-broken-framing": bytes([0]) + setup + buffers
        + _record(HOST, virtio.RAW_BYTES, 6, tail=b"\xff\xff\xff\xff\0\0"),
    }


TARGET = Target(one=one, ci_runs=1_000, max_len=4096, seeds=seeds)
