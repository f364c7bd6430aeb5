"""Guest networks on the host side: backends (passt's user networking, QEMU's stream and
dgram framing, packet capture) behind one small interface, and the opening of their
host ends, kept apart from their use."""

from popek.net.backend import MAX_FRAME, MIN_FRAME, NetBackend
from popek.net.endpoint import HostEnd, OpenedNic, open_nic, open_nics

__all__ = ["MAX_FRAME", "MIN_FRAME", "HostEnd", "NetBackend", "OpenedNic", "open_nic",
           "open_nics"]
