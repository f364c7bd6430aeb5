"""What a NIC needs from the host end of its network: the interface every backend implements.

A backend is already open when a machine gets it (TinyEMU's ``EthernetDevice``, handed to
the board ready-made): opening a host end (spawning passt, connecting, binding) is
:mod:`popek.net.endpoint`'s business and may happen in another process (the VMM) than
the one using it (a worker). Using one is non-blocking: the machine runner waits on
:meth:`NetBackend.fileno` together with every other host event source, and the device
calls :meth:`~NetBackend.receive` when it turned readable and :meth:`~NetBackend.flush`
when it turned writable, so nothing here ever polls or stalls the guest.
"""

from __future__ import annotations

from typing import Protocol

ETH_HEADER = 14
# The largest frame either side may pass: a 65535-byte payload (the largest MTU Linux
# allows a virtio-net device without VIRTIO_NET_F_MTU) behind a VLAN-tagged header.
MAX_FRAME = 0xFFFF + ETH_HEADER + 4
MIN_FRAME = ETH_HEADER  # shorter is a runt: not even a whole Ethernet header


class NetBackend(Protocol):
    """The host end of one NIC: frames in, frames out, one descriptor to wait on."""

    dropped: int  # frames the host end lost on its own (no peer, oversized on the wire)

    def fileno(self) -> int | None:
        """The descriptor that turns readable when frames (or a new peer) arrive, and
        writable when a held-back frame can go; None when there is nothing to wait for
        (the peer is gone for good). It may change (a listening backend's peer)."""

    def receive(self) -> bytes | None:
        """One frame from the network, or None when no whole frame is ready now."""

    def ready_to_send(self) -> bool:
        """False while a frame is still held back by a full socket: wait for the
        descriptor to turn writable, then :meth:`flush`."""

    def send(self, frame: bytes) -> None:
        """Pass ``frame`` on (only while :meth:`ready_to_send`). Frames nobody can take
        are dropped and counted, as on a cable with nothing at the other end."""

    def flush(self) -> None:
        """Push out what a full socket held back (the descriptor turned writable)."""

    def close(self) -> None: ...
