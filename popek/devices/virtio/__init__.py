"""virtio devices: the mmio transport and split virtqueue shared by every device type."""

from popek.devices.virtio.blk import ImageNotFoundError, VirtioBlk
from popek.devices.virtio.mmio import FIRST_IRQ, SLOT_BASE, SLOT_COUNT, SLOT_SIZE, VirtioMMIO
from popek.devices.virtio.queue import Chain, Segment, Virtqueue, VirtqueueError
from popek.devices.virtio.rng import VirtioRng

__all__ = [
    "FIRST_IRQ", "SLOT_BASE", "SLOT_COUNT", "SLOT_SIZE", "Chain", "ImageNotFoundError",
    "Segment", "VirtioBlk", "VirtioMMIO", "VirtioRng", "Virtqueue", "VirtqueueError",
]
