"""File descriptors: reading, writing, duplicating, pipes, directories, polling.

Guest descriptors are host descriptors, as in qemu-user: inheritance across fork
and redirection by dup2 then work with no bookkeeping. Python makes every new
descriptor close-on-exec, so calls that should not do that say so explicitly.
Calls that can block wait in the scheduler first, so other threads run meanwhile and
a signal the guest handles interrupts them as the kernel would.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from popek.user import fileflags as ff
from popek.user import structs
from popek.user.address_space import PROT_WRITE
from popek.user.control import Interrupted
from popek.user.hostlibc import check, libc
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.registry import i32, i64, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

SOL_SOCKET, SO_RCVTIMEO, SO_SNDTIMEO = 1, 20, 21
PIPE_BUF = 4096  # a pipe that polls writable takes this much without blocking
MSG_DONTWAIT = 0x40
IO_LIMIT = 1 << 24  # bytes moved per call at most; callers loop, as with any short read
IOV_MAX = 1024
CLOSE_RANGE_CLOEXEC = 4
POLL_MAX = 1 << 16  # descriptors per poll or select, like RLIMIT_NOFILE's usual bound


@dataclass
class DirStream:
    """getdents64 state of one open directory: its entries, read once, and a cursor."""

    ident: tuple[int, int]
    records: list[bytes] = field(default_factory=list)
    cursor: int = 0


def check_fd(p: Process, fd: int) -> int:
    """Reject descriptors the guest does not own (negative, or the emulator's own)."""
    fd = i32(fd)
    if fd < 0 or fd in p.internal_fds:
        raise SyscallError(Errno.EBADF)
    return fd


def wait_ready(p: Process, fd: int, events: int) -> None:
    """Block until ``fd`` is ready, unless it is non-blocking (then the call says EAGAIN);
    a socket waits no longer than its SO_RCVTIMEO or SO_SNDTIMEO (then EAGAIN too)."""
    if not os.get_blocking(fd) or _ready_now(fd, events):
        return
    if not p.scheduler.wait([(fd, events)], socket_timeout(fd, events)):
        raise SyscallError(Errno.EAGAIN)


def _ready_now(fd: int, events: int) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


def socket_timeout(fd: int, events: int) -> float | None:
    """The socket's SO_RCVTIMEO (waiting to read) or SO_SNDTIMEO in seconds; None if it
    has none or is no socket. struct timeval is laid out alike on both sides."""
    name = SO_RCVTIMEO if events & select.POLLIN else SO_SNDTIMEO
    value = ctypes.create_string_buffer(structs.TIMESPEC.size)
    size = ctypes.c_uint32(structs.TIMESPEC.size)
    if libc.getsockopt(fd, SOL_SOCKET, name, value, ctypes.byref(size)) < 0:
        return None
    sec, usec = structs.TIMESPEC.unpack(value.raw)
    return sec + usec / 1e6 or None


def _read(p: Process, fd: int, count: int) -> bytes:
    if fd in p.signals.signalfds:
        from popek.user.syscalls.events import read_signalfd  # events builds on this module

        return read_signalfd(p, fd, count)
    wait_ready(p, fd, select.POLLIN)
    return os.read(fd, min(count, IO_LIMIT))


@syscall("read")
def read(p: Process, fd: int, buf: int, count: int) -> int:
    fd = check_fd(p, fd)
    p.space.check(buf, min(count, IO_LIMIT), PROT_WRITE)
    data = _read(p, fd, count)
    p.space.write(buf, data)
    return len(data)


def _write(p: Process, fd: int, data: bytes) -> int:
    """write(2). With other threads, a blocking write into a pipe or socket goes in
    pieces that cannot block the host, as the reader may be one of those threads."""
    if len(p.scheduler.threads) == 1 or not os.get_blocking(fd):
        return os.write(fd, data)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return os.write(fd, data)
    written = 0
    limit = socket_timeout(fd, select.POLLOUT)
    while written < len(data):
        try:
            if not p.scheduler.wait([(fd, select.POLLOUT)], limit):
                raise SyscallError(Errno.EAGAIN)  # SO_SNDTIMEO passed
        except (Interrupted, SyscallError):
            if written:
                return written
            raise
        piece = data[written:written + PIPE_BUF]
        if stat.S_ISSOCK(mode):
            try:
                written += check(libc.send(fd, piece, len(piece), MSG_DONTWAIT))
            except BlockingIOError:
                pass  # another writer took the room first: wait again
        else:
            written += os.write(fd, piece)  # poll said a pipe buffer is free: cannot block
    return written


@syscall("write")
def write(p: Process, fd: int, buf: int, count: int) -> int:
    fd = check_fd(p, fd)
    return _write(p, fd, p.space.read(buf, min(count, IO_LIMIT)))


@syscall("pread64")
def pread64(p: Process, fd: int, buf: int, count: int, offset: int) -> int:
    fd = check_fd(p, fd)
    p.space.check(buf, min(count, IO_LIMIT), PROT_WRITE)
    data = os.pread(fd, min(count, IO_LIMIT), i64(offset))
    p.space.write(buf, data)
    return len(data)


@syscall("pwrite64")
def pwrite64(p: Process, fd: int, buf: int, count: int, offset: int) -> int:
    fd = check_fd(p, fd)
    return os.pwrite(fd, p.space.read(buf, min(count, IO_LIMIT)), i64(offset))


def _iovecs(p: Process, iov: int, iovcnt: int) -> list[tuple[int, int]]:
    iovcnt = i32(iovcnt)
    if not 0 <= iovcnt <= IOV_MAX:
        raise SyscallError(Errno.EINVAL)
    raw = p.space.read(iov, iovcnt * structs.IOVEC.size)
    return [structs.IOVEC.unpack_from(raw, i * structs.IOVEC.size) for i in range(iovcnt)]


def scatter(p: Process, vecs: list[tuple[int, int]], data: bytes) -> None:
    pos = 0
    for base, length in vecs:
        if pos >= len(data):
            break
        p.space.write(base, data[pos:pos + length])
        pos += length


def gather(p: Process, vecs: list[tuple[int, int]]) -> bytes:
    return b"".join(p.space.read(base, length) for base, length in vecs)


@syscall("readv")
def readv(p: Process, fd: int, iov: int, iovcnt: int) -> int:
    fd = check_fd(p, fd)
    vecs = _iovecs(p, iov, iovcnt)
    for base, length in vecs:
        p.space.check(base, length, PROT_WRITE)
    data = _read(p, fd, sum(length for _, length in vecs))
    scatter(p, vecs, data)
    return len(data)


@syscall("writev")
def writev(p: Process, fd: int, iov: int, iovcnt: int) -> int:
    fd = check_fd(p, fd)
    return _write(p, fd, gather(p, _iovecs(p, iov, iovcnt)))


@syscall("preadv")
def preadv(p: Process, fd: int, iov: int, iovcnt: int, offset: int) -> int:
    fd = check_fd(p, fd)
    vecs = _iovecs(p, iov, iovcnt)
    data = os.pread(fd, min(sum(length for _, length in vecs), IO_LIMIT), i64(offset))
    scatter(p, vecs, data)
    return len(data)


@syscall("pwritev")
def pwritev(p: Process, fd: int, iov: int, iovcnt: int, offset: int) -> int:
    fd = check_fd(p, fd)
    return os.pwrite(fd, gather(p, _iovecs(p, iov, iovcnt)), i64(offset))


@syscall("sendfile")
def sendfile(p: Process, out_fd: int, in_fd: int, offset_ptr: int, count: int) -> int:
    out_fd, in_fd = check_fd(p, out_fd), check_fd(p, in_fd)
    count = min(count, IO_LIMIT)
    if offset_ptr:
        offset = i64(p.space.read_u64(offset_ptr))
        data = os.pread(in_fd, count, offset)
    else:
        data = os.read(in_fd, count)
    written = os.write(out_fd, data)
    if offset_ptr:
        p.space.write(offset_ptr, structs.U64.pack(offset + written))
    elif written < len(data):
        os.lseek(in_fd, written - len(data), os.SEEK_CUR)
    return written


@syscall("lseek")
def lseek(p: Process, fd: int, offset: int, whence: int) -> int:
    fd = check_fd(p, fd)
    result = os.lseek(fd, i64(offset), i32(whence))
    if result == 0:
        p.dir_streams.pop(fd, None)  # rewinddir
    return result


@syscall("close")
def close(p: Process, fd: int) -> int:
    fd = check_fd(p, fd)
    os.close(fd)
    p.forget_fd(fd)
    return 0


@syscall("close_range")
def close_range(p: Process, first: int, last: int, flags: int) -> int:
    internal = p.internal_fds
    for fd in p.open_fds():
        if first <= fd <= last and fd not in internal:
            try:
                if flags & CLOSE_RANGE_CLOEXEC:
                    os.set_inheritable(fd, False)
                else:
                    os.close(fd)
                    p.forget_fd(fd)
            except OSError:
                pass
    return 0


@syscall("dup")
def dup(p: Process, fd: int) -> int:
    return fcntl.fcntl(check_fd(p, fd), fcntl.F_DUPFD, 0)


@syscall("dup3")
def dup3(p: Process, oldfd: int, newfd: int, flags: int) -> int:
    oldfd, newfd = check_fd(p, oldfd), check_fd(p, newfd)
    if oldfd == newfd or flags & ~ff.O_CLOEXEC:
        raise SyscallError(Errno.EINVAL)
    p.forget_fd(newfd)
    return os.dup2(oldfd, newfd, inheritable=not flags & ff.O_CLOEXEC)


@syscall("fcntl")
def fcntl_(p: Process, fd: int, cmd: int, arg: int) -> int:
    fd = check_fd(p, fd)
    cmd = i32(cmd)
    if cmd in (ff.F_DUPFD, ff.F_DUPFD_CLOEXEC):
        host_cmd = fcntl.F_DUPFD if cmd == ff.F_DUPFD else fcntl.F_DUPFD_CLOEXEC
        return fcntl.fcntl(fd, host_cmd, i32(arg))
    if cmd == ff.F_GETFD:
        return ff.FD_CLOEXEC if not os.get_inheritable(fd) else 0
    if cmd == ff.F_SETFD:
        os.set_inheritable(fd, not arg & ff.FD_CLOEXEC)
        return 0
    if cmd == ff.F_GETFL:
        return ff.open_flags_to_guest(fcntl.fcntl(fd, fcntl.F_GETFL))
    if cmd == ff.F_SETFL:
        return fcntl.fcntl(fd, fcntl.F_SETFL, ff.open_flags_to_host(arg & ~ff.O_ACCMODE))
    if cmd in (ff.F_GETLK, ff.F_SETLK, ff.F_SETLKW):
        raise SyscallError(Errno.ENOLCK)  # record locks are not emulated
    raise SyscallError(Errno.EINVAL)


@syscall("pipe2")
def pipe2(p: Process, fds: int, flags: int) -> int:
    if flags & ~(ff.O_CLOEXEC | ff.O_NONBLOCK):
        raise SyscallError(Errno.EINVAL)
    p.space.check(fds, 8, PROT_WRITE)
    r, w = os.pipe2(ff.open_flags_to_host(flags))
    p.space.write(fds, structs.I32.pack(r) + structs.I32.pack(w))
    return 0


@syscall("getdents64")
def getdents64(p: Process, fd: int, dirp: int, count: int) -> int:
    fd = check_fd(p, fd)
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise SyscallError(Errno.ENOTDIR)
    stream = p.dir_streams.get(fd)
    if stream is None or stream.ident != (st.st_dev, st.st_ino):
        stream = p.dir_streams[fd] = DirStream((st.st_dev, st.st_ino),
                                               _dir_records(fd, st, _entry_filter(p, fd)))
    out = bytearray()
    while stream.cursor < len(stream.records):
        record = stream.records[stream.cursor]
        if len(out) + len(record) > count:
            if not out:
                raise SyscallError(Errno.EINVAL)
            break
        out += record
        stream.cursor += 1
    p.space.write(dirp, bytes(out))
    return len(out)


def _entry_filter(p: Process, fd: int) -> Callable[[bytes], bytes | None] | None:
    """In a container, /proc lists the container's processes only, by their guest pids,
    and /proc/self/fd the guest's descriptors only."""
    if not p.options.container:
        return None
    directory = os.readlink(f"/proc/self/fd/{fd}")
    if directory == f"/proc/{os.getpid()}/fd":
        internal = p.internal_fds
        return lambda name: None if int(name) in internal else name
    if directory != "/proc":
        return None

    def rename(name: bytes) -> bytes | None:
        if not name.isdigit():
            return name
        guest = p.guest_pid(int(name))
        return b"%d" % guest if guest else None
    return rename


def _dir_records(fd: int, st: os.stat_result,
                 rename: Callable[[bytes], bytes | None] | None = None) -> list[bytes]:
    """The directory's entries in the host's readdir order, with . and .. first; ``rename``
    gives an entry's name as the guest sees it, or None to hide it."""
    try:
        parent = os.stat("..", dir_fd=fd).st_ino
    except OSError:
        parent = st.st_ino
    dt_dir = structs.DT_BY_FORMAT[stat.S_IFDIR]
    entries = [(st.st_ino, dt_dir, b"."), (parent, dt_dir, b"..")]
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            shown = rename(name) if rename else name
            if shown is not None:
                entries.append((entry.inode(), _dtype(entry), shown))
    return [structs.pack_dirent64(ino, i + 1, dtype, name)
            for i, (ino, dtype, name) in enumerate(entries)]


def _dtype(entry: os.DirEntry) -> int:
    try:
        if entry.is_symlink():
            return structs.DT_BY_FORMAT[stat.S_IFLNK]
        if entry.is_dir(follow_symlinks=False):
            return structs.DT_BY_FORMAT[stat.S_IFDIR]
        if entry.is_file(follow_symlinks=False):
            return structs.DT_BY_FORMAT[stat.S_IFREG]
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return structs.DT_UNKNOWN
    return structs.DT_BY_FORMAT.get(stat.S_IFMT(mode), structs.DT_UNKNOWN)


@syscall("fsync", "fdatasync")
def fsync(p: Process, fd: int) -> int:
    os.fsync(check_fd(p, fd))
    return 0


@syscall("ftruncate")
def ftruncate(p: Process, fd: int, length: int) -> int:
    os.ftruncate(check_fd(p, fd), i64(length))
    return 0


def timeout_seconds(p: Process, timeout_ptr: int) -> float | None:
    """The struct timespec at ``timeout_ptr`` in seconds (None for NULL: no timeout)."""
    if not timeout_ptr:
        return None
    sec, nsec = structs.TIMESPEC.unpack(p.space.read(timeout_ptr, structs.TIMESPEC.size))
    if sec < 0 or not 0 <= nsec < 10**9:
        raise SyscallError(Errno.EINVAL)
    return sec + nsec / 1e9


def temporary_mask(p: Process, mask_ptr: int) -> None:
    """ppoll/pselect's mask for the duration of the wait (the caller's returns after)."""
    if mask_ptr:
        mask = p.space.read_u64(mask_ptr)
        p.signals.restore_mask = p.signals.mask
        p.signals.set_mask(mask)


@syscall("ppoll")
def ppoll(p: Process, fds: int, nfds: int, timeout_ptr: int, sigmask: int) -> int:
    size = structs.POLLFD.size
    if nfds > POLL_MAX:
        raise SyscallError(Errno.EINVAL)
    raw = bytearray(p.space.read(fds, nfds * size))
    polled = [structs.POLLFD.unpack_from(raw, i * size) for i in range(nfds)]
    timeout = timeout_seconds(p, timeout_ptr)
    temporary_mask(p, sigmask)
    watched = [(fd, events) for fd, events, _ in polled if fd >= 0]
    ready = dict(p.scheduler.wait(watched, timeout, restartable=False))
    count = 0
    for i, (fd, events, _) in enumerate(polled):
        revents = ready.get(fd, 0) if fd >= 0 else 0
        count += bool(revents)
        structs.POLLFD.pack_into(raw, i * size, fd, events, revents)
    p.space.write(fds, bytes(raw))
    return count


# fd_set membership as poll events, and which poll results mark an fd in each set.
SELECT_EVENTS = (select.POLLIN, select.POLLOUT, select.POLLPRI)
SELECT_READY = (select.POLLIN | select.POLLHUP | select.POLLERR, select.POLLOUT | select.POLLERR,
                select.POLLPRI)


@syscall("pselect6")
def pselect6(p: Process, nfds: int, readfds: int, writefds: int, exceptfds: int,
             timeout_ptr: int, sigdata: int) -> int:
    nfds = i32(nfds)
    if not 0 <= nfds <= POLL_MAX:
        raise SyscallError(Errno.EINVAL)
    size = (nfds + 63) // 64 * 8
    pointers = (readfds, writefds, exceptfds)
    sets = [int.from_bytes(p.space.read(ptr, size), "little") if ptr else 0 for ptr in pointers]
    events: dict[int, int] = {}
    for fd in range(nfds):
        for bits, event in zip(sets, SELECT_EVENTS, strict=True):
            if bits >> fd & 1:
                events[fd] = events.get(fd, 0) | event
    timeout = timeout_seconds(p, timeout_ptr)
    if sigdata:
        mask_ptr, _ = structs.IOVEC.unpack(p.space.read(sigdata, structs.IOVEC.size))
        temporary_mask(p, mask_ptr)
    start = time.monotonic()
    ready = dict(p.scheduler.wait(list(events.items()), timeout, restartable=False))
    if any(revents & select.POLLNVAL for revents in ready.values()):
        raise SyscallError(Errno.EBADF)
    results = [0, 0, 0]
    for fd, revents in ready.items():
        for i, wanted in enumerate(SELECT_READY):
            if revents & wanted and sets[i] >> fd & 1:
                results[i] |= 1 << fd
    for ptr, bits in zip(pointers, results, strict=True):
        if ptr:
            p.space.write(ptr, bits.to_bytes(size, "little"))
    if timeout is not None:  # Linux reports the time left
        left = max(timeout - (time.monotonic() - start), 0)
        p.space.write(timeout_ptr, structs.TIMESPEC.pack(int(left), int(left % 1 * 1e9)))
    return sum(bin(bits).count("1") for bits in results)
