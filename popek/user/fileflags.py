"""Flag words of the file system calls, translated between the guest and the host.

The guest's values are asm-generic's; the host's come from Python's ``os`` module,
so the translation is by name and works whatever numbering the host uses.
"""

from __future__ import annotations

import os

# open(2) flags (asm-generic/fcntl.h); the access mode (low two bits) is the same everywhere.
O_ACCMODE = 0o3
GUEST_OPEN_FLAGS: dict[str, int] = {
    "O_CREAT": 0o100, "O_EXCL": 0o200, "O_NOCTTY": 0o400, "O_TRUNC": 0o1000,
    "O_APPEND": 0o2000, "O_NONBLOCK": 0o4000, "O_DSYNC": 0o10000, "O_ASYNC": 0o20000,
    "O_DIRECT": 0o40000, "O_LARGEFILE": 0o100000, "O_DIRECTORY": 0o200000,
    "O_NOFOLLOW": 0o400000, "O_NOATIME": 0o1000000, "O_CLOEXEC": 0o2000000,
    "O_SYNC": 0o4010000, "O_PATH": 0o10000000, "O_TMPFILE": 0o20200000,
}
O_CLOEXEC = GUEST_OPEN_FLAGS["O_CLOEXEC"]
O_NONBLOCK = GUEST_OPEN_FLAGS["O_NONBLOCK"]
# Flags whose guest meaning the host gets implicitly (64-bit offsets).
_IMPLIED = {"O_LARGEFILE"}

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_EACCESS = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000

# fcntl(2) commands.
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL = 0, 1, 2, 3, 4
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_DUPFD_CLOEXEC = 1030
FD_CLOEXEC = 1

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1


def _pairs() -> list[tuple[int, int]]:
    pairs = []
    for name, guest in GUEST_OPEN_FLAGS.items():
        host = getattr(os, name, 0)
        if name not in _IMPLIED and host:
            pairs.append((guest, host))
    # Composite flags (O_SYNC includes O_DSYNC, O_TMPFILE includes O_DIRECTORY) go first.
    pairs.sort(key=lambda p: -bin(p[0]).count("1"))
    return pairs


_FLAG_PAIRS = _pairs()


def open_flags_to_host(flags: int) -> int:
    """Host open flags for guest ``flags``, without O_CLOEXEC's inheritance effect."""
    host = flags & O_ACCMODE
    rest = flags & ~O_ACCMODE
    for guest_bits, host_bits in _FLAG_PAIRS:
        if rest & guest_bits == guest_bits:
            host |= host_bits
            rest &= ~guest_bits
    return host


def open_flags_to_guest(flags: int) -> int:
    """Guest open flags for host ``flags`` (F_GETFL)."""
    guest = flags & O_ACCMODE
    rest = flags & ~O_ACCMODE
    for guest_bits, host_bits in _FLAG_PAIRS:
        if rest & host_bits == host_bits:
            guest |= guest_bits
            rest &= ~host_bits
    return guest | GUEST_OPEN_FLAGS["O_LARGEFILE"]


def open_flag_names(flags: int) -> str:
    """``O_RDONLY|O_CLOEXEC``: how strace shows open flags."""
    names = [("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[flags & O_ACCMODE]]
    rest = flags & ~O_ACCMODE
    for name, bits in sorted(GUEST_OPEN_FLAGS.items(), key=lambda p: -bin(p[1]).count("1")):
        if rest & bits == bits:
            names.append(name)
            rest &= ~bits
    if rest:
        names.append(hex(rest))
    return "|".join(names)
