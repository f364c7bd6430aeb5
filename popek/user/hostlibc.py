"""The host's C library, for the system calls Python's os and socket modules do not offer
in the form the guest needs (raw sockaddr and msghdr bytes, epoll's user data, timerfd)."""

from __future__ import annotations

import ctypes
import errno
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


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


SYS_OPENAT2 = 437  # one number on every architecture (added after the tables were unified)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
libc.syscall.restype = ctypes.c_long


def open_beneath(dir_fd: int, path: bytes, flags: int, mode: int = 0) -> int:
    """openat2(RESOLVE_BENEATH): ``path`` opened under ``dir_fd`` by the kernel's own walk,
    which fails with EXDEV where ``..``, an absolute path or a symlink would lead out of
    it (and ELOOP for /proc's magic links), with no window for a rename race to exploit."""
    if b"\0" in path:
        raise OSError(errno.EINVAL, "a path holds a NUL byte")
    if not flags & os.O_CREAT:
        mode = 0  # openat2 refuses a mode it would not use
    how = _OpenHow(flags | os.O_CLOEXEC, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    while True:
        result = libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dir_fd),
                              ctypes.c_char_p(path), ctypes.byref(how),
                              ctypes.c_size_t(ctypes.sizeof(how)))
        if result >= 0 or ctypes.get_errno() != errno.EAGAIN:  # EAGAIN: a rename raced it
            return check(result)
