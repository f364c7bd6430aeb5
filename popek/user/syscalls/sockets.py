"""Sockets: AF_INET, AF_INET6 and AF_UNIX, stream and datagram, on the host's own sockets.

A guest socket is a host socket under the same descriptor. Linux lays out
sockaddr_in, sockaddr_in6, sockaddr_un, struct msghdr's control messages (SCM_RIGHTS
carries descriptors, which are the same numbers on both sides), option values and
the SOCK_*/MSG_* flags the same on riscv64 as on a 64-bit little-endian host, so
addresses and options pass as raw bytes through the C library; only msghdr's and
iovec's guest pointers become host buffers. A call on a blocking socket never blocks
the host: it is made with MSG_DONTWAIT (connect on a socket made non-blocking for the
moment), and if it would block, the thread waits in the scheduler for the socket (as
long as SO_RCVTIMEO or SO_SNDTIMEO allow) and tries again while the other threads run.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from popek.user import structs
from popek.user.address_space import PROT_WRITE, GuestFault
from popek.user.hostlibc import check, libc
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.files import (
    IO_LIMIT,
    IOV_MAX,
    MSG_DONTWAIT,
    SOL_SOCKET,
    check_fd,
    gather,
    scatter,
    socket_timeout,
    timeout_seconds,
    wait_ready,
)
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage)
OPTION_MAX = 4096
MMSGHDR_SIZE = structs.MSGHDR.size + 8  # struct mmsghdr: the msghdr, msg_len, padding
MSG_WAITFORONE = 0x10000
CONTROL_MAX = 1 << 16
SO_ERROR, SO_ACCEPTCONN = 4, 30
EINPROGRESS = 115  # Linux's number on every architecture


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_IoVec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


def _u32(p: Process, addr: int) -> int:
    return structs.U32.unpack(p.space.read(addr, 4))[0]


def _sockaddr(p: Process, addr: int, length: int) -> bytes | None:
    length = i32(length)
    if not addr:
        return None
    if not 0 <= length <= SOCKADDR_MAX:
        raise SyscallError(Errno.EINVAL)
    name = p.space.read(addr, length)
    return p.options.container.sockaddr(name) if p.options.container else name


class _NameOut:
    """A sockaddr the host fills in and its length, copied to the guest's (addr, addrlen)."""

    def __init__(self, p: Process, addr: int, addrlen: int) -> None:
        self.p, self.addr, self.addrlen = p, addr, addrlen
        self.capacity = 0
        if addr and addrlen:
            self.capacity = i32(_u32(p, addrlen))
            if self.capacity < 0:
                raise SyscallError(Errno.EINVAL)
        self.buffer = ctypes.create_string_buffer(SOCKADDR_MAX)
        self.length = ctypes.c_uint32(SOCKADDR_MAX)

    @property
    def args(self) -> tuple:
        if not self.addr:
            return None, None
        return self.buffer, ctypes.byref(self.length)

    def store(self) -> None:
        if self.addr:
            self.p.space.write(self.addr, self.buffer.raw[:min(self.capacity, self.length.value)])
            self.p.space.write(self.addrlen, structs.U32.pack(self.length.value))


def _option(fd: int, name: int) -> int:
    """An int socket option of the host socket (0 if it is no socket)."""
    value = ctypes.c_int(0)
    size = ctypes.c_uint32(4)
    if libc.getsockopt(fd, SOL_SOCKET, name, ctypes.byref(value), ctypes.byref(size)) < 0:
        return 0
    return value.value


def _without_blocking(p: Process, fd: int, events: int, flags: int,
                      call: Callable[[int], int]) -> int:
    """``call(flags | MSG_DONTWAIT)``; on a blocking socket, waits and retries until it
    would no longer block, or until the socket's SO_RCVTIMEO or SO_SNDTIMEO passes."""
    blocking = not flags & MSG_DONTWAIT and os.get_blocking(fd)
    deadline: float | None = None
    while True:
        try:
            return check(call(flags | MSG_DONTWAIT))
        except BlockingIOError:
            if not blocking:
                raise
        if deadline is None:
            limit = socket_timeout(fd, events)
            deadline = float("inf") if limit is None else time.monotonic() + limit
        left = deadline - time.monotonic()
        if left <= 0:
            raise SyscallError(Errno.EAGAIN)
        p.scheduler.wait([(fd, events)], None if left == float("inf") else left)


@syscall("socket")
def socket(p: Process, domain: int, type_: int, protocol: int) -> int:
    return check(libc.socket(i32(domain), i32(type_), i32(protocol)))


@syscall("socketpair")
def socketpair(p: Process, domain: int, type_: int, protocol: int, sv: int) -> int:
    p.space.check(sv, 8, PROT_WRITE)
    fds = (ctypes.c_int * 2)()
    check(libc.socketpair(i32(domain), i32(type_), i32(protocol), fds))
    p.space.write(sv, structs.I32.pack(fds[0]) + structs.I32.pack(fds[1]))
    return 0


@syscall("bind")
def bind(p: Process, fd: int, addr: int, addrlen: int) -> int:
    name = _sockaddr(p, addr, addrlen)
    return check(libc.bind(check_fd(p, fd), name, len(name or b"")))


@syscall("listen")
def listen(p: Process, fd: int, backlog: int) -> int:
    return check(libc.listen(check_fd(p, fd), i32(backlog)))


@syscall("accept4")
def accept4(p: Process, fd: int, addr: int, addrlen: int, flags: int) -> int:
    fd = check_fd(p, fd)
    name = _NameOut(p, addr, addrlen)
    if _option(fd, SO_ACCEPTCONN):  # else accept fails at once, as it should
        wait_ready(p, fd, select.POLLIN)
    new = check(libc.accept4(fd, *name.args, i32(flags)))
    name.store()
    return new


@syscall("accept")
def accept(p: Process, fd: int, addr: int, addrlen: int) -> int:
    return accept4(p, fd, addr, addrlen, 0)


@syscall("connect")
def connect(p: Process, fd: int, addr: int, addrlen: int) -> int:
    """A blocking connect starts non-blocking, then waits in the scheduler for the result."""
    fd = check_fd(p, fd)
    name = _sockaddr(p, addr, addrlen)
    length = len(name or b"")
    if not os.get_blocking(fd):
        return check(libc.connect(fd, name, length))
    os.set_blocking(fd, False)
    try:
        result = libc.connect(fd, name, length)
        error = ctypes.get_errno()
    finally:
        os.set_blocking(fd, True)
    if result == 0:
        return 0
    if error != EINPROGRESS:
        raise OSError(error, os.strerror(error))
    p.scheduler.wait([(fd, select.POLLOUT)], None, restartable=False)
    error = _option(fd, SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))
    return 0


def _get_name(p: Process, fd: int, addr: int, addrlen: int, call: Callable[..., int]) -> int:
    name = _NameOut(p, addr, addrlen)
    check(call(check_fd(p, fd), *name.args))
    name.store()
    return 0


@syscall("getsockname")
def getsockname(p: Process, fd: int, addr: int, addrlen: int) -> int:
    return _get_name(p, fd, addr, addrlen, libc.getsockname)


@syscall("getpeername")
def getpeername(p: Process, fd: int, addr: int, addrlen: int) -> int:
    return _get_name(p, fd, addr, addrlen, libc.getpeername)


@syscall("sendto")
def sendto(p: Process, fd: int, buf: int, length: int, flags: int, addr: int,
           addrlen: int) -> int:
    fd = check_fd(p, fd)
    data = p.space.read(buf, min(length, IO_LIMIT))
    name = _sockaddr(p, addr, addrlen)
    return _without_blocking(p, fd, select.POLLOUT, i32(flags), lambda f: libc.sendto(
        fd, data, len(data), f, name, len(name or b"")))


@syscall("recvfrom")
def recvfrom(p: Process, fd: int, buf: int, length: int, flags: int, addr: int,
             addrlen: int) -> int:
    fd = check_fd(p, fd)
    length = min(length, IO_LIMIT)
    p.space.check(buf, length, PROT_WRITE)
    data = ctypes.create_string_buffer(length)
    name = _NameOut(p, addr, addrlen)
    count = _without_blocking(p, fd, select.POLLIN, i32(flags), lambda f: libc.recvfrom(
        fd, data, length, f, *name.args))
    p.space.write(buf, data.raw[:min(count, length)])  # MSG_TRUNC may report more
    name.store()
    return count


def _message(p: Process, msg: int) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """The guest msghdr at ``msg``: its iovecs and its fields."""
    fields = structs.MSGHDR.unpack(p.space.read(msg, structs.MSGHDR.size))
    _, _, iov, iovlen, _, controllen, _ = fields
    if iovlen > IOV_MAX:
        raise SyscallError(Errno.EMSGSIZE)
    if controllen > CONTROL_MAX:
        raise SyscallError(Errno.ENOBUFS)
    raw = p.space.read(iov, iovlen * structs.IOVEC.size)
    vecs = [structs.IOVEC.unpack_from(raw, i * structs.IOVEC.size) for i in range(iovlen)]
    return vecs, fields


@syscall("sendmsg")
def sendmsg(p: Process, fd: int, msg: int, flags: int) -> int:
    fd = check_fd(p, fd)
    vecs, (name, namelen, _, _, control, controllen, _) = _message(p, msg)
    data = gather(p, vecs)[:IO_LIMIT]
    name_bytes = _sockaddr(p, name, namelen) or b""
    control_bytes = p.space.read(control, controllen) if control else b""
    buffers = [ctypes.create_string_buffer(b, len(b)) for b in (data, name_bytes, control_bytes)]
    iovec = _IoVec(ctypes.cast(buffers[0], ctypes.c_void_p), len(data))
    header = _MsgHdr(ctypes.cast(buffers[1], ctypes.c_void_p) if name else None,
                     len(name_bytes), ctypes.pointer(iovec), 1,
                     ctypes.cast(buffers[2], ctypes.c_void_p) if control else None,
                     len(control_bytes), 0)
    return _without_blocking(p, fd, select.POLLOUT, i32(flags),
                             lambda f: libc.sendmsg(fd, ctypes.byref(header), f))


@syscall("recvmsg")
def recvmsg(p: Process, fd: int, msg: int, flags: int) -> int:
    fd = check_fd(p, fd)
    vecs, (name, namelen, iov, iovlen, control, controllen, _) = _message(p, msg)
    for base, length in vecs:
        p.space.check(base, length, PROT_WRITE)
    size = min(sum(length for _, length in vecs), IO_LIMIT)
    data = ctypes.create_string_buffer(size)
    name_buf = ctypes.create_string_buffer(SOCKADDR_MAX)
    control_buf = ctypes.create_string_buffer(max(controllen, 1))
    iovec = _IoVec(ctypes.cast(data, ctypes.c_void_p), size)
    header = _MsgHdr(ctypes.cast(name_buf, ctypes.c_void_p) if name else None,
                     SOCKADDR_MAX if name else 0, ctypes.pointer(iovec), 1,
                     ctypes.cast(control_buf, ctypes.c_void_p) if control else None,
                     controllen if control else 0, 0)
    count = _without_blocking(p, fd, select.POLLIN, i32(flags),
                              lambda f: libc.recvmsg(fd, ctypes.byref(header), f))
    scatter(p, vecs, data.raw[:min(count, size)])
    if name:
        p.space.write(name, name_buf.raw[:min(namelen, header.namelen)])
    if control:
        p.space.write(control, control_buf.raw[:header.controllen])
    p.space.write(msg, structs.MSGHDR.pack(name, header.namelen if name else 0, iov, iovlen,
                                           control, header.controllen if control else 0,
                                           header.flags))
    return count


def _batch(p: Process, msgvec: int, vlen: int, one: Callable[[int, int], int],
           more: Callable[[], bool] = lambda: True) -> int:
    """``one(entry, done)`` for each struct mmsghdr of the vector, its result stored in the
    entry's msg_len; an error after the first ends the batch, as does ``more()`` false."""
    done = 0
    for i in range(min(vlen, IOV_MAX)):
        entry = msgvec + i * MMSGHDR_SIZE
        try:
            count = one(entry, done)
        except (SyscallError, OSError, GuestFault):
            if done:
                break
            raise
        p.space.write(entry + structs.MSGHDR.size, structs.U32.pack(count))
        done += 1
        if not more():
            break
    return done


@syscall("sendmmsg")
def sendmmsg(p: Process, fd: int, msgvec: int, vlen: int, flags: int) -> int:
    """Several sendmsg (glibc's resolver sends its A and AAAA queries this way)."""
    return _batch(p, msgvec, vlen, lambda entry, done: sendmsg(p, fd, entry, flags))


@syscall("recvmmsg")
def recvmmsg(p: Process, fd: int, msgvec: int, vlen: int, flags: int, timeout: int) -> int:
    """Several recvmsg; MSG_WAITFORONE waits for the first only. As in Linux, the timeout
    is looked at between messages, never while waiting for one."""
    seconds = timeout_seconds(p, timeout)
    deadline = None if seconds is None else time.monotonic() + seconds
    flags = i32(flags)
    each = flags & ~MSG_WAITFORONE

    def one(entry: int, done: int) -> int:
        nowait = MSG_DONTWAIT if done and flags & MSG_WAITFORONE else 0
        return recvmsg(p, fd, entry, each | nowait)

    return _batch(p, msgvec, vlen, one,
                  lambda: deadline is None or time.monotonic() < deadline)


@syscall("setsockopt")
def setsockopt(p: Process, fd: int, level: int, name: int, value: int, length: int) -> int:
    length = i32(length)
    if length < 0:
        raise SyscallError(Errno.EINVAL)
    length = min(length, OPTION_MAX)  # no option is longer: Linux reads what it needs
    data = p.space.read(value, length) if value else None
    return check(libc.setsockopt(check_fd(p, fd), i32(level), i32(name), data, length))


@syscall("getsockopt")
def getsockopt(p: Process, fd: int, level: int, name: int, value: int, lenptr: int) -> int:
    capacity = i32(_u32(p, lenptr))
    if capacity < 0:
        raise SyscallError(Errno.EINVAL)
    buffer = ctypes.create_string_buffer(OPTION_MAX)
    length = ctypes.c_uint32(min(capacity, OPTION_MAX))
    check(libc.getsockopt(check_fd(p, fd), i32(level), i32(name), buffer, ctypes.byref(length)))
    p.space.write(value, buffer.raw[:min(capacity, length.value)])
    p.space.write(lenptr, structs.U32.pack(length.value))
    return 0


@syscall("shutdown")
def shutdown(p: Process, fd: int, how: int) -> int:
    return check(libc.shutdown(check_fd(p, fd), i32(how)))
