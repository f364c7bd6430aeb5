"""virtio-rng, the entropy device (virtio 1.1 section 5.4): host randomness for the guest."""

from __future__ import annotations

import os
from typing import Any

from popek.devices.virtio.queue import Virtqueue

DEVICE_ID_ENTROPY = 4
QUEUE_SIZE = 64
MAX_REQUEST = 1 << 16  # the spec lets the device fill less: bounds host work per buffer


class VirtioRng:
    """Fills every device-writable buffer it is given from ``os.urandom``."""

    device_id = DEVICE_ID_ENTROPY
    features = 0
    queue_sizes = (QUEUE_SIZE,)
    config = b""

    def process(self, index: int, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            n = min(chain.writable_len, MAX_REQUEST)
            queue.push_used(chain.head, chain.write(0, os.urandom(n)))

    def save_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Stateless: all there is to restore lives in the transport and the queue."""
