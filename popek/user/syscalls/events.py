"""Event descriptors: epoll, eventfd, timerfd, inotify and signalfd, as event loops and
Go's netpoller use them.

Each is the host's own object behind a guest descriptor (guest descriptors are host
descriptors), so readiness, edge triggering, one-shot events, timer expiry and file
events are the host kernel's; popek translates the structures that differ (struct epoll_event
is packed on x86-64 and naturally aligned on riscv64) and waits through the
scheduler, so an epoll_pwait blocks only its own thread. signalfd is popek's own,
as signals are: a pipe the signal layer keeps readable while a signal of its mask is
pending, whose reads take those signals. Python's select.epoll keeps
no user data per descriptor and closes its descriptor when collected, so the calls
go to the C library directly.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
from typing import TYPE_CHECKING

from popek.user import fileflags as ff
from popek.user import structs
from popek.user.address_space import PROT_WRITE
from popek.user.hostlibc import check, libc
from popek.user.linux_errno import Errno, SyscallError
from popek.user.signals import SIGCHLD
from popek.user.syscalls.files import check_fd, temporary_mask, timeout_seconds
from popek.user.syscalls.filesystem import _path as guest_path
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

EPOLL_EVENT = structs.EPOLL_EVENT  # the guest's: events, 4 bytes of padding, data
EPOLL_MAX_EVENTS = 1 << 16
EFD_SEMAPHORE = 1
TFD_TIMER_FLAGS = 3
# struct signalfd_siginfo: signo, errno, code, pid, uid, then fd, tid, band, overrun,
# trapno, status (the only other field filled), padded to 128 bytes.
SIGNALFD_SIGINFO = structs.Struct("<IiiII20xi84x")  # TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET


class _HostEpollEvent(ctypes.Structure):
    _pack_ = 4 if os.uname().machine == "x86_64" else 8
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


def _fd_flags(flags: int, allowed: int) -> int:
    """CLOEXEC and NONBLOCK in guest encoding as the host's, rejecting anything else."""
    if flags & ~allowed:
        raise SyscallError(Errno.EINVAL)
    return ff.open_flags_to_host(flags & (ff.O_CLOEXEC | ff.O_NONBLOCK))


# -- epoll ------------------------------------------------------------------------------
@syscall("epoll_create1")
def epoll_create1(p: Process, flags: int) -> int:
    return check(libc.epoll_create1(_fd_flags(flags, ff.O_CLOEXEC)))


@syscall("epoll_ctl")
def epoll_ctl(p: Process, epfd: int, op: int, fd: int, event: int) -> int:
    epfd, fd = check_fd(p, epfd), check_fd(p, fd)
    host = _HostEpollEvent()
    if event:
        host.events, host.data = EPOLL_EVENT.unpack(p.space.read(event, EPOLL_EVENT.size))
    return check(libc.epoll_ctl(epfd, i32(op), fd, ctypes.byref(host)))


def _epoll_wait(p: Process, epfd: int, events: int, maxevents: int, timeout: float | None,
                sigmask: int) -> int:
    epfd = check_fd(p, epfd)
    maxevents = i32(maxevents)
    if not 0 < maxevents <= EPOLL_MAX_EVENTS:
        raise SyscallError(Errno.EINVAL)
    p.space.check(events, maxevents * EPOLL_EVENT.size, PROT_WRITE)
    temporary_mask(p, sigmask)
    deadline = None if timeout is None else time.monotonic() + timeout
    ready = (_HostEpollEvent * maxevents)()
    while True:
        count = check(libc.epoll_wait(epfd, ready, maxevents, 0))
        left = None if deadline is None else deadline - time.monotonic()
        if count or (left is not None and left <= 0):
            break
        p.scheduler.wait([(epfd, select.POLLIN)], left, restartable=False)
    p.space.write(events, b"".join(EPOLL_EVENT.pack(e.events, e.data) for e in ready[:count]))
    return count


@syscall("epoll_pwait")
def epoll_pwait(p: Process, epfd: int, events: int, maxevents: int, timeout: int,
                sigmask: int) -> int:
    ms = i32(timeout)
    return _epoll_wait(p, epfd, events, maxevents, None if ms < 0 else ms / 1000, sigmask)


@syscall("epoll_pwait2")
def epoll_pwait2(p: Process, epfd: int, events: int, maxevents: int, timeout: int,
                 sigmask: int) -> int:
    return _epoll_wait(p, epfd, events, maxevents, timeout_seconds(p, timeout), sigmask)


# -- eventfd ----------------------------------------------------------------------------
@syscall("eventfd2")
def eventfd2(p: Process, initval: int, flags: int) -> int:
    host = _fd_flags(flags & ~EFD_SEMAPHORE, ff.O_CLOEXEC | ff.O_NONBLOCK)
    return os.eventfd(initval & 0xFFFFFFFF,
                      (os.EFD_SEMAPHORE if flags & EFD_SEMAPHORE else 0)
                      | (os.EFD_CLOEXEC if host & os.O_CLOEXEC else 0)
                      | (os.EFD_NONBLOCK if host & os.O_NONBLOCK else 0))


# -- timerfd ----------------------------------------------------------------------------
@syscall("timerfd_create")
def timerfd_create(p: Process, clock: int, flags: int) -> int:
    return check(libc.timerfd_create(i32(clock), _fd_flags(flags, ff.O_CLOEXEC | ff.O_NONBLOCK)))


@syscall("timerfd_settime")
def timerfd_settime(p: Process, fd: int, flags: int, new: int, old: int) -> int:
    # struct itimerspec is four 64-bit fields on both sides; Linux reads it first.
    value = ctypes.create_string_buffer(p.space.read(new, structs.ITIMERSPEC.size))
    fd = check_fd(p, fd)
    if flags & ~TFD_TIMER_FLAGS:
        raise SyscallError(Errno.EINVAL)
    previous = ctypes.create_string_buffer(structs.ITIMERSPEC.size)
    check(libc.timerfd_settime(fd, i32(flags), value, previous))
    if old:
        p.space.write(old, previous.raw)
    return 0


@syscall("timerfd_gettime")
def timerfd_gettime(p: Process, fd: int, current: int) -> int:
    fd = check_fd(p, fd)
    value = ctypes.create_string_buffer(structs.ITIMERSPEC.size)
    check(libc.timerfd_gettime(fd, value))
    p.space.write(current, value.raw)
    return 0


# -- inotify ----------------------------------------------------------------------------
@syscall("inotify_init1")
def inotify_init1(p: Process, flags: int) -> int:
    return check(libc.inotify_init1(_fd_flags(flags, ff.O_CLOEXEC | ff.O_NONBLOCK)))


@syscall("inotify_add_watch")
def inotify_add_watch(p: Process, fd: int, path: int, mask: int) -> int:
    """struct inotify_event, which read() returns, is laid out the same on both sides."""
    name = guest_path(p, path)  # resolved as every path-taking call resolves it
    return check(libc.inotify_add_watch(check_fd(p, fd), name, ctypes.c_uint32(mask)))


@syscall("inotify_rm_watch")
def inotify_rm_watch(p: Process, fd: int, wd: int) -> int:
    return check(libc.inotify_rm_watch(check_fd(p, fd), i32(wd)))


# -- signalfd ---------------------------------------------------------------------------
@syscall("signalfd4")
def signalfd4(p: Process, fd: int, mask: int, sizemask: int, flags: int) -> int:
    if sizemask != 8:
        raise SyscallError(Errno.EINVAL)
    wanted = p.space.read_u64(mask)
    host = _fd_flags(flags, ff.O_CLOEXEC | ff.O_NONBLOCK)
    fd = i32(fd)
    if fd == -1:
        return p.signals.open_signalfd(wanted, host)
    if check_fd(p, fd) not in p.signals.signalfds:
        raise SyscallError(Errno.EINVAL)
    p.signals.set_signalfd_mask(fd, wanted)
    return fd


def read_signalfd(p: Process, fd: int, count: int) -> bytes:
    """As many struct signalfd_siginfo as fit in ``count`` bytes, one per signal taken."""
    if count < SIGNALFD_SIGINFO.size:
        raise SyscallError(Errno.EINVAL)
    signals = p.signals
    while True:
        out = []
        while len(out) < count // SIGNALFD_SIGINFO.size:
            got = signals.take(signals.signalfds[fd].mask)
            if got is None:
                break
            sig, info = got
            _, errno, code, pid, uid, status = structs.SIGINFO_FIELDS.unpack_from(info)
            out.append(SIGNALFD_SIGINFO.pack(sig, errno, code, pid, uid,
                                             status if sig == SIGCHLD else 0))
        if out:
            return b"".join(out)
        if not os.get_blocking(fd):
            raise SyscallError(Errno.EAGAIN)
        p.scheduler.wait([(fd, select.POLLIN)], None)
