"""virtio-console (the guest agent's port) driven as Linux's virtio_console driver drives it,
and the host's agent link fed by a guest that breaks the agent's protocol.

The driver side is written from the virtio 1.1 spec (section 5.3: the multiport control
messages, their order and layout), not from the device.
"""

from __future__ import annotations

import struct
import subprocess

import pytest

from popek.cpu.physmem import PhysicalMemory
from popek.devices.virtio import VirtioMMIO
from popek.devices.virtio.console import AGENT_PORT_NAME, VirtioConsole
from popek.devices.virtio.mmio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
    Reg,
)
from popek.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from popek.machine.agent import AgentError, AgentLink, frame

RAM = 0x8000_0000
NUM = 16
PORT_IN, PORT_OUT, CONTROL_IN, CONTROL_OUT = range(4)  # as the spec numbers the queues
MULTIPORT = 1 << 1
# struct virtio_console_control events
DEVICE_READY, DEVICE_ADD, PORT_READY, PORT_OPEN, PORT_NAME = 0, 1, 3, 6, 7
NO_PORT = 0xFFFF_FFFF


class ConsoleDriver:
    """Four queues, each ring at RAM + 0x4000 * queue; one-descriptor buffers."""

    def __init__(self, device: VirtioConsole | None = None) -> None:
        self.mem = PhysicalMemory(RAM, 1 << 20)
        self.device = device or VirtioConsole()
        self.dev = VirtioMMIO(self.mem, self.device, lambda level: None)
        self.device.attach(self.dev)
        self.heap = RAM + 0x20000
        self.made = [0] * 4  # buffers made available per queue
        self.seen = [0] * 4  # used entries taken per queue
        self.buffers: dict[tuple[int, int], tuple[int, int]] = {}  # (queue, head) -> buffer
        for value in (STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER):
            self.wr(Reg.STATUS, value)
        self.wr(Reg.DRIVER_FEATURES_SEL, 0)
        self.wr(Reg.DRIVER_FEATURES, MULTIPORT)
        self.wr(Reg.DRIVER_FEATURES_SEL, 1)
        self.wr(Reg.DRIVER_FEATURES, VIRTIO_F_VERSION_1 >> 32)
        self.wr(Reg.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        for queue in range(4):
            ring = RAM + 0x4000 * queue
            self.wr(Reg.QUEUE_SEL, queue)
            self.wr(Reg.QUEUE_NUM, NUM)
            for reg, offset in ((Reg.QUEUE_DESC_LOW, 0), (Reg.QUEUE_DRIVER_LOW, 0x1000),
                                (Reg.QUEUE_DEVICE_LOW, 0x2000)):
                self.wr(reg, (ring + offset) & 0xFFFF_FFFF)
                self.wr(reg + 4, (ring + offset) >> 32)
            self.wr(Reg.QUEUE_READY, 1)
        self.wr(Reg.STATUS, self.rd(Reg.STATUS) | STATUS_DRIVER_OK)

    def rd(self, reg: int) -> int:
        return self.dev.read(reg, 4)

    def wr(self, reg: int, value: int) -> None:
        self.dev.write(reg, 4, value)

    def offer(self, queue: int, data: bytes = b"", room: int = 0, kick: bool = True) -> None:
        """One buffer: ``data`` for the device to read, or ``room`` bytes for it to fill."""
        addr = self.heap
        self.mem.write(addr, data or bytes(room))
        self.heap += max(len(data), room) + 15 & ~15
        ring, head = RAM + 0x4000 * queue, self.made[queue] % NUM
        self.mem.write(ring + 16 * head, struct.pack(
            "<QIHH", addr, len(data) or room, VIRTQ_DESC_F_WRITE if room else 0, 0))
        self.mem.write(ring + 0x1000 + 4 + 2 * head, struct.pack("<H", head))
        self.made[queue] += 1
        self.mem.write(ring + 0x1000 + 2, struct.pack("<H", self.made[queue] & 0xFFFF))
        self.buffers[queue, head] = (addr, len(data) or room)
        if kick:
            self.wr(Reg.QUEUE_NOTIFY, queue)

    def used(self, queue: int) -> list[bytes]:
        """What the device wrote into each buffer it returned since the last call."""
        ring = RAM + 0x4000 * queue + 0x2000
        out = []
        while self.seen[queue] != struct.unpack("<H", self.mem.read(ring + 2, 2))[0]:
            head, length = struct.unpack("<II", self.mem.read(
                ring + 4 + 8 * (self.seen[queue] % NUM), 8))
            out.append(self.mem.read(self.buffers[queue, head][0], length))
            self.seen[queue] += 1
        return out

    def control(self, port: int, event: int, value: int) -> None:
        self.offer(CONTROL_OUT, struct.pack("<IHH", port, event, value))

    def handshake(self) -> list[tuple[int, int, int, bytes]]:
        """What Linux does at probe and port add; the device's control messages."""
        for _ in range(4):
            self.offer(CONTROL_IN, room=256)
        self.control(NO_PORT, DEVICE_READY, 1)
        self.control(0, PORT_READY, 1)
        return [(*struct.unpack_from("<IHH", m), m[8:]) for m in self.used(CONTROL_IN)]


def test_the_port_is_announced_named_and_opened_as_the_spec_orders() -> None:
    drv = ConsoleDriver()
    assert drv.rd(Reg.DEVICE_ID) == 3
    assert struct.unpack("<HHII", bytes(drv.dev.read(0x100 + i, 1) for i in range(12))) == \
        (0, 0, 1, 0)  # cols, rows, max_nr_ports, emerg_wr
    assert drv.handshake() == [(0, DEVICE_ADD, 1, b""),
                               (0, PORT_NAME, 1, AGENT_PORT_NAME.encode()),
                               (0, PORT_OPEN, 1, b"")]


def test_bytes_pass_unchanged_both_ways_and_wait_for_buffers() -> None:
    drv = ConsoleDriver()
    got, opens = [], []
    drv.device.on_output = got.append
    drv.device.on_open = opens.append
    drv.handshake()
    drv.control(0, PORT_OPEN, 1)  # a guest program opened the port
    assert opens == [True] and drv.device.guest_open
    everything = bytes(range(256))
    drv.device.send(everything * 3)  # no receive buffers yet: it waits
    drv.offer(PORT_IN, room=500)
    drv.offer(PORT_IN, room=500)
    assert b"".join(drv.used(PORT_IN)) == everything * 3
    drv.offer(PORT_OUT, b"\0\r\n\x1b[6n" + everything)
    assert got == [b"\0\r\n\x1b[6n" + everything]
    drv.control(0, PORT_OPEN, 0)
    assert opens == [True, False] and not drv.device.guest_open


def test_a_snapshot_mid_transfer_delivers_the_rest_after_restore() -> None:
    drv = ConsoleDriver()
    drv.handshake()
    drv.control(0, PORT_OPEN, 1)
    drv.device.send(b"x" * 300)
    drv.offer(PORT_IN, room=100)
    state, ram = drv.dev.save_state(), drv.mem.read(RAM, 0x40000)
    clone = ConsoleDriver()
    clone.mem.write(RAM, ram)
    clone.dev.load_state(state)
    clone.seen = list(drv.seen)
    clone.made, clone.buffers, clone.heap = list(drv.made), dict(drv.buffers), drv.heap
    assert clone.device.guest_open
    clone.offer(PORT_IN, room=400)
    assert clone.used(PORT_IN) == [b"x" * 100, b"x" * 200]
    with pytest.raises(ValueError, match="version"):
        VirtioConsole().load_state({**state["backend"], "version": 99})


@pytest.mark.parametrize("queue", [PORT_IN, CONTROL_IN])
def test_a_read_only_receive_buffer_needs_a_reset(queue: int) -> None:
    drv = ConsoleDriver()
    drv.offer(CONTROL_IN, room=64)
    drv.control(NO_PORT, DEVICE_READY, 1)
    drv.control(0, PORT_READY, 1)
    drv.device.send(b"data")
    drv.offer(queue, b"the device must not write here")
    assert drv.rd(Reg.STATUS) & STATUS_DEVICE_NEEDS_RESET
    assert "device-writable" in drv.dev.s.error


def test_control_messages_a_guest_floods_are_bounded() -> None:
    drv = ConsoleDriver()
    for _ in range(100):  # each asks for an answer; no buffer takes one
        drv.control(NO_PORT, DEVICE_READY, 1)
        drv.control(0, PORT_READY, 1)
    assert len(drv.device.s.control) <= 16
    drv.control(7, PORT_OPEN, 1)  # a port that does not exist: ignored
    drv.control(0, 0xBEEF, 1)
    assert not drv.device.s.guest_open


# -- the host's agent link against a hostile guest ------------------------------------------
def _open_link(max_output: int = 1 << 20) -> tuple[ConsoleDriver, AgentLink, list]:
    drv = ConsoleDriver()
    drv.handshake()
    link = AgentLink(drv.device, max_output)
    drv.control(0, PORT_OPEN, 1)
    assert link.opened.is_set()
    outcomes: list = []
    link.start(["cat"], b"in", outcomes.append)
    drv.offer(PORT_IN, room=4096)
    assert drv.used(PORT_IN) == [frame(b"E", b"cat\0") + frame(b"I", b"in") + frame(b"C")]
    return drv, link, outcomes


def test_the_agent_link_assembles_frames_split_anywhere() -> None:
    drv, _, outcomes = _open_link()
    reply = frame(b"O", b"in") + frame(b"R", b"warn") + frame(b"X", struct.pack("<i", 3))
    for i in range(0, len(reply), 3):
        drv.offer(PORT_OUT, reply[i:i + 3])
    (done,) = outcomes
    assert isinstance(done, subprocess.CompletedProcess)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"in", b"warn")


@pytest.mark.parametrize("junk", [frame(b"Z", b"??"), frame(b"X", b"12345"),
                                  struct.pack("<cI", b"O", 0xFFFF_FFFF)])
def test_a_malformed_frame_fails_the_command_not_the_host(junk: bytes) -> None:
    drv, link, outcomes = _open_link()
    drv.offer(PORT_OUT, junk)
    (error,) = outcomes
    assert isinstance(error, AgentError) and "malformed frame" in str(error)
    link.start(["true"], b"", outcomes.append)  # the link is usable again
    drv.offer(PORT_OUT, frame(b"X", struct.pack("<i", 0)))
    assert outcomes[1].returncode == 0


def test_output_beyond_the_limit_ends_the_command() -> None:
    drv, _, outcomes = _open_link(max_output=1000)
    drv.offer(PORT_OUT, frame(b"O", b"y" * 600))
    drv.offer(PORT_OUT, frame(b"O", b"y" * 600))
    (error,) = outcomes
    assert isinstance(error, AgentError) and "output passed" in str(error)
