"""virtio-mmio version 2 transport (virtio 1.1 section 4.2), shared by every virtio device.

The transport owns everything the spec puts in the transport and the device-independent
part of a device: feature negotiation, device status, the virtqueues and the interrupt.
A backend (block, entropy, ...) only describes itself and consumes its queues, so the
register file is written once. Like QEMU's virt board, slot ``n`` sits at
``SLOT_BASE + n * SLOT_SIZE`` and interrupts on PLIC source ``FIRST_IRQ + n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from popek.cpu.physmem import PhysicalMemory
from popek.devices.device import IrqLine, bits, check_version, pack_state, unpack_state
from popek.devices.virtio.queue import Virtqueue, VirtqueueError

SLOT_BASE = 0x1000_1000
SLOT_SIZE = 0x1000
SLOT_COUNT = 8
FIRST_IRQ = 1


class Reg(IntEnum):
    """Register offsets of the version 2 layout."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_QEMU = 0x554D4551  # "QEMU", so guests see what they would under QEMU

# Device status bits.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40

# InterruptStatus bits.
INT_VRING = 1
INT_CONFIG = 2

# Device-independent feature bits.
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_VERSION_1

STATE_VERSION = 1


@dataclass
class TransportState:
    """The transport's registers, as a snapshot carries them."""

    status: int = field(default=0, metadata=bits(8))
    device_features_sel: int = field(default=0, metadata=bits(32))
    driver_features_sel: int = field(default=0, metadata=bits(32))
    driver_features: int = field(default=0, metadata=bits(64))
    queue_sel: int = field(default=0, metadata=bits(32))
    interrupt_status: int = field(default=0, metadata=bits(32))
    error: str | None = None  # why the device last entered DEVICE_NEEDS_RESET


class VirtioBackend(Protocol):
    """What a device type supplies to the transport."""

    device_id: int
    features: int  # device-type feature bits; the transport adds its own
    queue_sizes: tuple[int, ...]  # QueueNumMax of each virtqueue
    config: bytes  # the device configuration space, read-only to the driver

    def process(self, index: int, queue: Virtqueue) -> None:
        """Consume the available chains of queue ``index``; VirtqueueError if it is broken."""

    def save_state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class VirtioMMIO:
    """One virtio-mmio slot: the bus device the board maps at a slot's address."""

    def __init__(self, mem: PhysicalMemory, backend: VirtioBackend,
                 irq: IrqLine) -> None:
        self.mem = mem
        self.backend = backend
        self.irq = irq
        self.device_features = backend.features | TRANSPORT_FEATURES
        self.queues = [Virtqueue(mem, size) for size in backend.queue_sizes]
        self._config_generation = 0  # changes with the device's configuration space
        self.reset()

    def reset(self) -> None:
        """Device reset (Status written with 0, or the board's): what a fresh driver expects."""
        self.s = TransportState()
        for queue in self.queues:
            queue.reset()
        self._update_irq()

    # -- bus interface --------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= Reg.CONFIG:
            start = offset - Reg.CONFIG
            # Byte-granular; whatever lies past the end of the config space reads as zero.
            return int.from_bytes(self.backend.config[start:start + size], "little")
        if size != 4 or offset & 3:  # the spec allows only aligned 32-bit register access
            return 0
        queue = self._selected()
        match offset:
            case Reg.MAGIC_VALUE:
                return MAGIC
            case Reg.VERSION:
                return MMIO_VERSION
            case Reg.DEVICE_ID:
                return self.backend.device_id
            case Reg.VENDOR_ID:
                return VENDOR_QEMU
            case Reg.DEVICE_FEATURES if self.s.device_features_sel < 2:
                return (self.device_features >> (32 * self.s.device_features_sel)) & 0xFFFF_FFFF
            case Reg.QUEUE_NUM_MAX if queue:
                return queue.num_max
            case Reg.QUEUE_READY if queue:
                return int(queue.s.ready)
            case Reg.INTERRUPT_STATUS:
                return self.s.interrupt_status
            case Reg.STATUS:
                return self.s.status
            case Reg.SHM_LEN_LOW | Reg.SHM_LEN_HIGH | Reg.SHM_BASE_LOW | Reg.SHM_BASE_HIGH:
                return 0xFFFF_FFFF  # no shared memory regions: length and base read as -1
            case Reg.CONFIG_GENERATION:
                return self._config_generation
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= Reg.CONFIG:
            # Most devices' configuration is read-only; a device with a driver-writable
            # field (the balloon's ``actual``) takes the write itself.
            write_config = getattr(self.backend, "write_config", None)
            if write_config is not None:
                write_config(offset - Reg.CONFIG, size, value)
            return
        if size != 4 or offset & 3:
            return
        value &= 0xFFFF_FFFF
        queue = self._selected()
        match offset:
            case Reg.DEVICE_FEATURES_SEL:
                self.s.device_features_sel = value
            case Reg.DRIVER_FEATURES:
                self._write_driver_features(value)
            case Reg.DRIVER_FEATURES_SEL:
                self.s.driver_features_sel = value
            case Reg.QUEUE_SEL:
                self.s.queue_sel = value
            case Reg.QUEUE_NOTIFY:
                self._notify(value)
            case Reg.INTERRUPT_ACK:
                self.s.interrupt_status &= ~value
                self._update_irq()
            case Reg.STATUS:
                self._write_status(value & 0xFF)
            case Reg.QUEUE_READY if queue:
                self._write_queue_ready(queue, value)
            case _ if queue and not queue.s.ready:  # a live queue's layout cannot change
                self._write_queue_layout(queue, offset, value)

    # -- registers with side effects ------------------------------------------------------
    def _selected(self) -> Virtqueue | None:
        return self.queues[self.s.queue_sel] if self.s.queue_sel < len(self.queues) else None

    def _write_driver_features(self, value: int) -> None:
        s = self.s
        if s.status & STATUS_FEATURES_OK or s.driver_features_sel >= 2:
            return  # features are frozen once accepted
        shift = 32 * s.driver_features_sel
        s.driver_features = (s.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & STATUS_FEATURES_OK and not self.s.status & STATUS_FEATURES_OK:
            # Refuse what we did not offer. A driver that leaves out VERSION_1 still gets
            # this modern interface, as from QEMU's virtio-mmio (xv6 never sets it).
            if self.s.driver_features & ~self.device_features:
                value &= ~STATUS_FEATURES_OK
        self.s.status = value | (self.s.status & STATUS_DEVICE_NEEDS_RESET)

    def _write_queue_ready(self, queue: Virtqueue, value: int) -> None:
        if not value:
            queue.s.ready = False
        elif not queue.s.ready:
            try:
                queue.enable(event_idx=bool(self.s.driver_features & VIRTIO_F_RING_EVENT_IDX),
                             indirect=bool(self.s.driver_features & VIRTIO_F_INDIRECT_DESC))
            except VirtqueueError as err:
                self._needs_reset(queue, err)

    @staticmethod
    def _write_queue_layout(queue: Virtqueue, offset: int, value: int) -> None:
        match offset:
            case Reg.QUEUE_NUM:
                queue.s.num = value
            case Reg.QUEUE_DESC_LOW:
                queue.s.desc_addr = _set_low(queue.s.desc_addr, value)
            case Reg.QUEUE_DESC_HIGH:
                queue.s.desc_addr = _set_high(queue.s.desc_addr, value)
            case Reg.QUEUE_DRIVER_LOW:
                queue.s.driver_addr = _set_low(queue.s.driver_addr, value)
            case Reg.QUEUE_DRIVER_HIGH:
                queue.s.driver_addr = _set_high(queue.s.driver_addr, value)
            case Reg.QUEUE_DEVICE_LOW:
                queue.s.device_addr = _set_low(queue.s.device_addr, value)
            case Reg.QUEUE_DEVICE_HIGH:
                queue.s.device_addr = _set_high(queue.s.device_addr, value)

    def _notify(self, index: int) -> None:
        if index < len(self.queues):
            self.serve(index, self.backend.process)

    def serve(self, index: int, work: Callable[[int, Virtqueue], None]) -> None:
        """Let ``work`` consume queue ``index``, then interrupt the driver if it asked to
        hear of the buffers used. Guest kicks come here, and so does work that host
        events start (a frame arrived, a socket drained), so a broken ring ends in
        DEVICE_NEEDS_RESET whoever walked it."""
        queue = self.queues[index]
        try:
            work(index, queue)
        except VirtqueueError as err:
            self._needs_reset(queue, err)
        if queue.needs_interrupt():
            self.s.interrupt_status |= INT_VRING
            self._update_irq()

    def config_changed(self) -> None:
        """The device changed its configuration space (the balloon's target): bump the
        generation the driver checks its reads against and interrupt it."""
        self._config_generation = (self._config_generation + 1) & 0xFFFF_FFFF
        if self.s.status & STATUS_DRIVER_OK:
            self.s.interrupt_status |= INT_CONFIG
            self._update_irq()

    @property
    def driver_ok(self) -> bool:
        """The driver has set the device up and the device has not asked for a reset."""
        return self.s.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET) \
            == STATUS_DRIVER_OK

    def _needs_reset(self, queue: Virtqueue, err: VirtqueueError) -> None:
        """Stop the queue and tell the driver, as virtio 1.1 section 2.1.2 asks."""
        import logging  # ~3 ms of import that only this rare path needs

        logging.getLogger(__name__).debug("virtio device %d needs reset: %s",
                                          self.backend.device_id, err)
        queue.s.broken = True
        self.s.error = str(err)
        self.s.status |= STATUS_DEVICE_NEEDS_RESET
        if self.s.status & STATUS_DRIVER_OK:
            self.s.interrupt_status |= INT_CONFIG
            self._update_irq()

    def _update_irq(self) -> None:
        """Drive the line at each notification and acknowledgement, as QEMU's
        virtio-mmio does: raised again while high, it asks the PLIC for another
        interrupt (see Plic)."""
        self.irq(self.s.interrupt_status != 0)

    # -- snapshots ------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        return {
            **pack_state(STATE_VERSION, self.s),
            "device_id": self.backend.device_id,
            "queues": [queue.save_state() for queue in self.queues],
            "backend": self.backend.save_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        saved = unpack_state(TransportState, STATE_VERSION, state)
        if state["device_id"] != self.backend.device_id or \
                len(state["queues"]) != len(self.queues):
            raise ValueError(f"snapshot holds virtio device {state['device_id']} with "
                             f"{len(state['queues'])} queues, this slot has device "
                             f"{self.backend.device_id} with {len(self.queues)}")
        self.backend.load_state(state["backend"])
        for queue, queue_state in zip(self.queues, state["queues"], strict=True):
            queue.load_state(queue_state)
        self.s = saved
        self._update_irq()  # the line's level is part of the state being restored


class EmptySlot:
    """A virtio-mmio slot with no device behind it, as QEMU's virt board leaves its unused
    ones: magic, version and vendor as on any transport and DeviceID 0, "nothing here",
    which drivers skip; every other register reads 0 and takes no writes. Bare-metal code
    that probes all eight slots finds what it finds under QEMU, not an access fault."""

    def read(self, offset: int, size: int) -> int:
        if size != 4:
            return 0
        return {Reg.MAGIC_VALUE: MAGIC, Reg.VERSION: MMIO_VERSION,
                Reg.VENDOR_ID: VENDOR_QEMU}.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        """Nothing to drive."""

    def reset(self) -> None:
        """Nothing to reset: the slot has no state."""

    def save_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION}

    def load_state(self, state: dict[str, Any]) -> None:
        check_version(state, STATE_VERSION)


def _set_low(addr: int, value: int) -> int:
    return (addr & ~0xFFFF_FFFF) | value


def _set_high(addr: int, value: int) -> int:
    return (addr & 0xFFFF_FFFF) | (value << 32)
