"""Calls that name files by path: open, stat, links, directories, permissions, times.

Paths are bytes, passed to the host unchanged except for what
:meth:`Process.host_path` redirects (/proc/self/exe, sysroot libraries), or, in a
container, resolved by it inside the container (then absolute, so the host ignores
the directory fd). A directory fd of AT_FDCWD means the current directory, as for
Python's ``dir_fd=None``. Ids in stat results are the ones the guest sees.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from popek.user import fileflags as ff
from popek.user import structs
from popek.user.address_space import PROT_WRITE
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.files import check_fd
from popek.user.syscalls.registry import i32, i64, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

PATH_MAX = 4096


def _dirfd(p: Process, dirfd: int) -> int | None:
    fd = i32(dirfd)
    return None if fd == ff.AT_FDCWD else check_fd(p, fd)


def _path(p: Process, ptr: int, dirfd: int = ff.AT_FDCWD, *, follow: bool = True,
          write: bool = False) -> bytes:
    """The host path of the guest path at ``ptr``, relative to ``dirfd`` (see host_path)."""
    path = p.space.read_cstr(ptr, PATH_MAX)
    base = None
    if p.options.container and i32(dirfd) != ff.AT_FDCWD and not path.startswith(b"/"):
        base = os.readlink(f"/proc/self/fd/{check_fd(p, dirfd)}")
    return p.host_path(path, os.fsencode(base) if base else None, follow=follow, write=write)


def _stat(p: Process, dirfd: int, path_ptr: int, flags: int) -> os.stat_result:
    follow = not flags & ff.AT_SYMLINK_NOFOLLOW
    if flags & ff.AT_EMPTY_PATH and not p.space.read_cstr(path_ptr, PATH_MAX):
        fd = i32(dirfd)
        return p.guest_stat(os.stat(os.getcwd() if fd == ff.AT_FDCWD else check_fd(p, fd)))
    path = _path(p, path_ptr, dirfd, follow=follow)
    return p.guest_stat(os.stat(path, dir_fd=_dirfd(p, dirfd), follow_symlinks=follow))


@syscall("openat")
def openat(p: Process, dirfd: int, path: int, flags: int, mode: int) -> int:
    named = ff.GUEST_OPEN_FLAGS
    exclusive = flags & named["O_CREAT"] and flags & named["O_EXCL"]
    writes = flags & (ff.O_ACCMODE | named["O_CREAT"] | named["O_TRUNC"])
    host = _path(p, path, dirfd, follow=not (exclusive or flags & named["O_NOFOLLOW"]),
                 write=bool(writes))
    text = p.options.container.proc_file(host) if p.options.container else None
    if text is not None:
        fd = os.memfd_create("proc")  # a copy with the container's pids and ids
        os.write(fd, text)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        fd = os.open(host, ff.open_flags_to_host(flags), mode & 0o7777,
                     dir_fd=_dirfd(p, dirfd))
    if not flags & ff.O_CLOEXEC:
        os.set_inheritable(fd, True)
    p.dir_streams.pop(fd, None)
    return fd


@syscall("newfstatat")
def newfstatat(p: Process, dirfd: int, path: int, buf: int, flags: int) -> int:
    p.space.check(buf, structs.STAT.size, PROT_WRITE)
    p.space.write(buf, structs.pack_stat(_stat(p, dirfd, path, flags)))
    return 0


@syscall("fstat")
def fstat(p: Process, fd: int, buf: int) -> int:
    p.space.check(buf, structs.STAT.size, PROT_WRITE)
    p.space.write(buf, structs.pack_stat(p.guest_stat(os.fstat(check_fd(p, fd)))))
    return 0


@syscall("statx")
def statx(p: Process, dirfd: int, path: int, flags: int, mask: int, buf: int) -> int:
    p.space.check(buf, structs.STATX.size, PROT_WRITE)
    p.space.write(buf, structs.pack_statx(_stat(p, dirfd, path, flags)))
    return 0


@syscall("readlinkat")
def readlinkat(p: Process, dirfd: int, path: int, buf: int, size: int) -> int:
    if i32(size) <= 0:
        raise SyscallError(Errno.EINVAL)
    name = p.space.read_cstr(path, PATH_MAX)
    if p.is_self_exe(name):
        target = os.fsencode(p.exe)
    elif p.options.container:
        link = _path(p, path, dirfd, follow=False)  # the checks a path gets; then its text
        target = p.options.container.rootfs.readlink(name, os.path.dirname(link))
    else:
        target = os.readlink(p.host_path(name), dir_fd=_dirfd(p, dirfd))
    target = target[:size]
    p.space.write(buf, target)
    return len(target)


def _access(p: Process, dirfd: int, path: int, mode: int, flags: int) -> int:
    host = _path(p, path, dirfd, follow=not flags & ff.AT_SYMLINK_NOFOLLOW)
    kwargs = {"dir_fd": _dirfd(p, dirfd), "follow_symlinks": not flags & ff.AT_SYMLINK_NOFOLLOW}
    os.stat(host, **kwargs)  # raises ENOENT, ENOTDIR, ELOOP... as the kernel would
    if os.access(host, mode & 7, effective_ids=bool(flags & ff.AT_EACCESS), **kwargs):
        return 0
    raise SyscallError(Errno.EACCES)


@syscall("faccessat")
def faccessat(p: Process, dirfd: int, path: int, mode: int) -> int:
    return _access(p, dirfd, path, mode, 0)


@syscall("faccessat2")
def faccessat2(p: Process, dirfd: int, path: int, mode: int, flags: int) -> int:
    return _access(p, dirfd, path, mode, flags)


@syscall("getcwd")
def getcwd(p: Process, buf: int, size: int) -> int:
    cwd = os.getcwdb()
    if p.options.container:
        cwd = p.options.container.rootfs.to_guest(cwd) or b"(unreachable)/"
    cwd += b"\0"
    if len(cwd) > size:
        raise SyscallError(Errno.ERANGE)
    p.space.write(buf, cwd)
    return len(cwd)


@syscall("chdir")
def chdir(p: Process, path: int) -> int:
    os.chdir(_path(p, path))
    return 0


@syscall("fchdir")
def fchdir(p: Process, fd: int) -> int:
    os.chdir(check_fd(p, fd))
    return 0


@syscall("mkdirat")
def mkdirat(p: Process, dirfd: int, path: int, mode: int) -> int:
    os.mkdir(_path(p, path, dirfd, follow=False, write=True), mode & 0o7777,
             dir_fd=_dirfd(p, dirfd))
    return 0


@syscall("unlinkat")
def unlinkat(p: Process, dirfd: int, path: int, flags: int) -> int:
    remove = os.rmdir if flags & ff.AT_REMOVEDIR else os.unlink
    remove(_path(p, path, dirfd, follow=False, write=True), dir_fd=_dirfd(p, dirfd))
    return 0


@syscall("renameat2")
def renameat2(p: Process, olddirfd: int, oldpath: int, newdirfd: int, newpath: int,
              flags: int) -> int:
    src = _path(p, oldpath, olddirfd, follow=False, write=True)
    dst = _path(p, newpath, newdirfd, follow=False, write=True)
    src_dir, dst_dir = _dirfd(p, olddirfd), _dirfd(p, newdirfd)
    if flags & ~ff.RENAME_NOREPLACE:
        raise SyscallError(Errno.EINVAL)
    if flags & ff.RENAME_NOREPLACE:
        try:
            os.stat(dst, dir_fd=dst_dir, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            raise SyscallError(Errno.EEXIST)
    os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
    return 0


@syscall("linkat")
def linkat(p: Process, olddirfd: int, oldpath: int, newdirfd: int, newpath: int,
           flags: int) -> int:
    follow = bool(flags & ff.AT_SYMLINK_FOLLOW)
    os.link(_path(p, oldpath, olddirfd, follow=follow),
            _path(p, newpath, newdirfd, follow=False, write=True), src_dir_fd=_dirfd(p, olddirfd),
            dst_dir_fd=_dirfd(p, newdirfd), follow_symlinks=follow)
    return 0


@syscall("symlinkat")
def symlinkat(p: Process, target: int, newdirfd: int, linkpath: int) -> int:
    os.symlink(p.space.read_cstr(target, PATH_MAX),
               _path(p, linkpath, newdirfd, follow=False, write=True),
               dir_fd=_dirfd(p, newdirfd))
    return 0


@syscall("fchmodat")
def fchmodat(p: Process, dirfd: int, path: int, mode: int) -> int:
    os.chmod(_path(p, path, dirfd, write=True), mode & 0o7777, dir_fd=_dirfd(p, dirfd))
    return 0


@syscall("fchmod")
def fchmod(p: Process, fd: int, mode: int) -> int:
    os.chmod(check_fd(p, fd), mode & 0o7777)
    return 0


@syscall("fchownat")
def fchownat(p: Process, dirfd: int, path: int, uid: int, gid: int, flags: int) -> int:
    follow = not flags & ff.AT_SYMLINK_NOFOLLOW
    os.chown(_path(p, path, dirfd, follow=follow, write=True), *p.host_ids(i32(uid), i32(gid)),
             dir_fd=_dirfd(p, dirfd), follow_symlinks=follow)
    return 0


@syscall("fchown")
def fchown(p: Process, fd: int, uid: int, gid: int) -> int:
    os.chown(check_fd(p, fd), *p.host_ids(i32(uid), i32(gid)))
    return 0


@syscall("utimensat")
def utimensat(p: Process, dirfd: int, path: int, times: int, flags: int) -> int:
    follow = not flags & ff.AT_SYMLINK_NOFOLLOW
    target: bytes | int = _path(p, path, dirfd, follow=follow, write=True) if path \
        else check_fd(p, dirfd)
    kwargs = {} if path == 0 else {
        "dir_fd": _dirfd(p, dirfd), "follow_symlinks": follow}
    now = time.time_ns()
    if times == 0:
        os.utime(target, ns=(now, now), **kwargs)
        return 0
    raw = p.space.read(times, 2 * structs.TIMESPEC.size)
    stamps = [structs.TIMESPEC.unpack_from(raw, i * structs.TIMESPEC.size) for i in (0, 1)]
    if all(nsec == ff.UTIME_OMIT for _, nsec in stamps):
        return 0
    current = os.stat(target, **kwargs)
    result = []
    for (sec, nsec), old in zip(stamps, (current.st_atime_ns, current.st_mtime_ns), strict=True):
        if nsec == ff.UTIME_NOW:
            result.append(now)
        elif nsec == ff.UTIME_OMIT:
            result.append(old)
        elif 0 <= nsec < 10**9:
            result.append(sec * 10**9 + nsec)
        else:
            raise SyscallError(Errno.EINVAL)
    os.utime(target, ns=(result[0], result[1]), **kwargs)
    return 0


@syscall("truncate")
def truncate(p: Process, path: int, length: int) -> int:
    os.truncate(_path(p, path, write=True), i64(length))
    return 0


def _statfs(p: Process, buf: int, vfs: os.statvfs_result) -> int:
    p.space.write(buf, structs.STATFS.pack(
        0, vfs.f_bsize, vfs.f_blocks, vfs.f_bfree, vfs.f_bavail, vfs.f_files, vfs.f_ffree,
        vfs.f_fsid & 0xFFFFFFFF, vfs.f_fsid >> 32 & 0xFFFFFFFF, vfs.f_namemax, vfs.f_frsize,
        vfs.f_flag))
    return 0


@syscall("statfs")
def statfs(p: Process, path: int, buf: int) -> int:
    return _statfs(p, buf, os.statvfs(_path(p, path)))


@syscall("fstatfs")
def fstatfs(p: Process, fd: int, buf: int) -> int:
    return _statfs(p, buf, os.statvfs(check_fd(p, fd)))
