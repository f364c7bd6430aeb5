"""The host's C library, for the system calls Python's os and socket modules do not offer
in the form the guest needs (raw sockaddr and msghdr bytes, epoll's user data, timerfd)."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
for _name in ("send", "sendto", "recvfrom", "sendmsg", "recvmsg"):
    getattr(libc, _name).restype = ctypes.c_ssize_t
libc.send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
libc.sendto.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_char_p, ctypes.c_uint32]
libc.recvfrom.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_char_p, ctypes.c_void_p]


def check(result: int) -> int:
    """``result`` of a C library call, or its errno as an OSError."""
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result
