"""Guest networks on the host side: backends (passt's user networking, QEMU's stream and
dgram framing, packet capture) behind one small interface, and the opening of their
host ends, kept apart from their use."""

# Nothing is imported here: the machine's virtio-net needs only the backend interface
# (popek.net.backend), not the host ends (popek.net.endpoint), whose sockets, passt and
# multiprocessing cost a boot without NICs ~8 ms.
