"""virtio-console with one named port (virtio 1.1 section 5.3, ``VIRTIO_CONSOLE_F_MULTIPORT``):
a binary-safe byte stream between the VMM and a program in the guest, popek's guest agent.

Linux shows the port as ``/dev/vport0p0`` (a character device, not a terminal, so no
line discipline touches the bytes) with its name in ``/sys/class/virtio-ports/*/name``.
Queues: 0 and 1 carry the port's data (guest receive, guest transmit), 2 and 3 the
control messages (to the driver, from the driver) by which the device announces the
port and its name and learns when the guest opens or closes it.

The host end is two callbacks, as TinyEMU's ``CharacterDevice``: :meth:`send` queues
bytes for the guest (delivered as it posts receive buffers), ``on_output`` gets what the
guest writes and ``on_open`` when a guest program opens or closes the port. Bytes waiting
for the guest and control messages waiting for buffers are part of the device's state,
so a snapshot taken mid-transfer resumes it. A malformed chain puts the device in
DEVICE_NEEDS_RESET (the transport's path); an unknown control message is ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from popek.devices.device import pack_state, unpack_state
from popek.devices.virtio.mmio import VirtioMMIO
from popek.devices.virtio.queue import Virtqueue, VirtqueueError

DEVICE_ID_CONSOLE = 3
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
PORT_RX, PORT_TX, CONTROL_RX, CONTROL_TX = 0, 1, 2, 3
QUEUE_SIZE = 64
PORT_ID = 0
AGENT_PORT_NAME = "org.popek.agent.0"

# Control events (struct virtio_console_control: le32 id, le16 event, le16 value).
DEVICE_READY, DEVICE_ADD, PORT_READY, PORT_OPEN, PORT_NAME = 0, 1, 3, 6, 7
CONTROL = struct.Struct("<IHH")
# cols, rows, max_nr_ports, emerg_wr: one port, no console size, no emergency write.
CONFIG = struct.pack("<HHII", 0, 0, 1, 0)
MAX_CONTROL_PENDING = 16  # the driver's messages that need answers are few; more is abuse
STATE_VERSION = 1


@dataclass
class ConsoleState:
    """The port's handshake, whether a guest program holds it open, and bytes in flight."""

    port_ready: bool = False  # the driver set the port up
    guest_open: bool = False  # a guest program has the port open
    to_guest: str = ""  # hex: bytes for the guest waiting for its receive buffers
    control: list[str] = field(default_factory=list)  # hex: messages waiting for buffers


class VirtioConsole:
    """The agent's port; :meth:`attach` it to its transport."""

    device_id = DEVICE_ID_CONSOLE
    features = VIRTIO_CONSOLE_F_MULTIPORT
    queue_sizes = (QUEUE_SIZE,) * 4
    config = CONFIG

    def __init__(self, name: str = AGENT_PORT_NAME) -> None:
        self.name = name
        self.s = ConsoleState()
        self._to_guest = bytearray()
        self.transport: VirtioMMIO | None = None
        self.on_output: Callable[[bytes], None] = lambda data: None
        self.on_open: Callable[[bool], None] = lambda is_open: None

    def attach(self, transport: VirtioMMIO) -> None:
        self.transport = transport

    @property
    def guest_open(self) -> bool:
        return self.s.guest_open and self.transport is not None and self.transport.driver_ok

    # -- the host's side --------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Bytes for the guest program on the port, delivered in order as it takes them."""
        self._to_guest += data
        if self.transport is not None:
            self.transport.serve(PORT_RX, self._fill)

    # -- the guest's kicks ------------------------------------------------------------------
    def process(self, index: int, queue: Virtqueue) -> None:
        if index == PORT_TX:
            while (chain := queue.pop()) is not None:
                data = chain.read(0, chain.readable_len)
                queue.push_used(chain.head, 0)
                if data:
                    self.on_output(data)
        elif index == CONTROL_TX:
            while (chain := queue.pop()) is not None:
                message = chain.read(0, CONTROL.size)
                queue.push_used(chain.head, 0)
                if len(message) == CONTROL.size:
                    self._control(*CONTROL.unpack(message))
            self.transport.serve(CONTROL_RX, self._deliver_control)
        elif index == PORT_RX:
            self._fill(index, queue)
        elif index == CONTROL_RX:
            self._deliver_control(index, queue)

    def _control(self, port: int, event: int, value: int) -> None:
        """A message from the driver: the handshake that announces the port, and opens."""
        if event == DEVICE_READY and value:  # a driver (re)starts: announce the port anew
            self.s = ConsoleState()
            self._queue_control(PORT_ID, DEVICE_ADD, 1)
        elif event == PORT_READY and port == PORT_ID and value:
            self.s.port_ready = True
            self._queue_control(PORT_ID, PORT_NAME, 1, self.name.encode())
            self._queue_control(PORT_ID, PORT_OPEN, 1)  # the host end is always connected
        elif event == PORT_OPEN and port == PORT_ID:
            was = self.s.guest_open
            self.s.guest_open = bool(value)
            if was != self.s.guest_open:
                self.on_open(self.s.guest_open)

    def _queue_control(self, port: int, event: int, value: int, extra: bytes = b"") -> None:
        if len(self.s.control) < MAX_CONTROL_PENDING:
            self.s.control.append((CONTROL.pack(port, event, value) + extra).hex())

    def _deliver_control(self, index: int, queue: Virtqueue) -> None:
        while self.s.control:
            chain = queue.pop()
            if chain is None:
                return
            message = bytes.fromhex(self.s.control[0])
            if chain.readable_len or chain.writable_len < len(message):
                raise VirtqueueError("control buffer is not a device-writable area of "
                                     f"{len(message)} bytes")
            queue.push_used(chain.head, chain.write(0, message))
            self.s.control.pop(0)

    def _fill(self, index: int, queue: Virtqueue) -> None:
        while self._to_guest and self.s.port_ready:
            chain = queue.pop()
            if chain is None:
                return
            if chain.readable_len or not chain.writable_len:
                raise VirtqueueError("receive buffer is not a device-writable area")
            written = chain.write(0, bytes(self._to_guest[:chain.writable_len]))
            del self._to_guest[:written]
            queue.push_used(chain.head, written)

    # -- snapshots --------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        self.s.to_guest = self._to_guest.hex()
        return pack_state(STATE_VERSION, self.s)

    def load_state(self, state: dict[str, Any]) -> None:
        self.s = unpack_state(ConsoleState, STATE_VERSION, state)
        self._to_guest = bytearray.fromhex(self.s.to_guest)
