"""A container's file namespace: its root directory, bind mounts and /proc, as one resolver.

Every guest path is resolved here, one component at a time, the way the kernel walks
a path under chroot: ``..`` stops at the root, an absolute symlink starts again at the
root, a relative one continues where it is, and a bind mount's directory replaces the
guest directory it is mounted on (its ``..`` is that directory's parent, in the guest).
What comes out names the resolved directory by a descriptor, opened one component at
a time from the mount's directory with O_NOFOLLOW (``/proc/self/fd/N/name``), so the
host call that uses it cannot leave the container even if another process swaps a
directory on the way for a symlink after the walk: gVisor's rule that every path
resolves inside the sandbox's root.

/proc is the host's, seen through the container's PID space: ``/proc/self`` and
``/proc/N`` name the container's own processes only, and the magic links under a
process (root, cwd, exe, fd/N) lead back into the guest's tree, never to the host's.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_SYMLINKS = 40  # Linux's limit on links followed in one resolution (ELOOP)
# Entries of a process in /proc that would reach popek itself rather than the guest.
PROC_HIDDEN = frozenset({b"mem", b"map_files", b"pagemap", b"environ", b"auxv", b"cmdline"})
DEVICES = (b"null", b"zero", b"full", b"random", b"urandom")  # bound into every /dev
DIRECTORY_FDS_KEPT = 4  # a call resolves at most two paths; older descriptors are closed
DIRECTORY_FD_MIN = 900  # out of the guest's way, below the signal layer's 1000
WALK_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
STANDARD_STREAMS = {b"stdin": b"/proc/self/fd/0", b"stdout": b"/proc/self/fd/1",
                    b"stderr": b"/proc/self/fd/2"}


class HeldObject(Exception):
    """A /proc/<pid>/fd link to what the process holds but the container cannot name (a
    pipe, a socket, a file outside handed in as a standard stream): it is reopened through
    /proc itself, which grants nothing the descriptor did not."""

    def __init__(self, target: bytes) -> None:
        super().__init__(target)
        self.target = target


@dataclass(frozen=True)
class Mount:
    """``host`` (a directory) seen at guest path ``guest`` (components); maybe read-only."""

    guest: tuple[bytes, ...]
    host: bytes
    read_only: bool = False


class RootFS:
    """Resolves guest paths to host paths inside ``root`` and the bind mounts.

    ``host_pid`` maps a guest pid to the host's (None if it is not the container's),
    ``guest_pid`` back (0 if it is not);
    ``self_pid`` is the calling process's guest pid and ``self_exe`` the host path of the
    program it runs (the host's /proc would name popek's interpreter); ``hidden_fds`` are
    popek's own descriptors, which /proc/self/fd does not show.
    """

    def __init__(self, root: str, mounts: list[Mount], *, host_pid: Callable[[int], int | None],
                 guest_pid: Callable[[int], int], self_pid: Callable[[], int],
                 self_exe: Callable[[], bytes],
                 hidden_fds: Callable[[], frozenset[int]] = frozenset) -> None:
        devices = [Mount((b"dev", name), b"/dev/" + name) for name in DEVICES]
        self.mounts = [Mount((), os.fsencode(os.path.realpath(root))), *devices, *mounts]
        self.mounts.sort(key=lambda m: len(m.guest))  # the deepest mount wins: searched last
        self.host_pid = host_pid
        self.guest_pid = guest_pid
        self.self_pid = self_pid
        self.self_exe = self_exe
        self.hidden_fds = hidden_fds
        self.directory_fds: deque[int] = deque()  # of the last resolutions, popek's own

    # -- guest to host ---------------------------------------------------------------------
    def resolve(self, path: bytes, base: bytes | None = None, *, follow: bool = True,
                write: bool = False) -> bytes:
        """The host path of guest ``path``; relative paths start at host directory ``base``
        (the current directory if None). Raises OSError(ENOENT...) as the kernel would,
        and EROFS for a call that would ``write`` to a read-only mount or /proc."""
        parts = self._walk(self._start(path, base), path.split(b"/"), follow)
        if isinstance(parts, bytes) or parts[:1] == [b"proc"]:
            host = parts if isinstance(parts, bytes) else self._host_of(parts)
            if write:
                self._check_proc_write(host)
        else:
            mount = self.mount_of(parts)
            if write and mount.read_only:
                raise OSError(errno.EROFS, "read-only file system")
            host = self._pinned(mount, parts[len(mount.guest):])
        return host + b"/" if path.endswith(b"/") and not host.endswith(b"/") else host

    def _pinned(self, mount: Mount, rest: list[bytes]) -> bytes:
        """``mount.host/rest`` as ``/proc/self/fd/N/last``, N the directory reached from the
        mount's one component at a time, never through a symlink."""
        if not rest:
            return mount.host
        fd = os.open(mount.host, WALK_FLAGS)
        try:
            for name in rest[:-1]:
                inner = os.open(name, WALK_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
            kept = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, DIRECTORY_FD_MIN)
        finally:
            os.close(fd)
        self.directory_fds.append(kept)
        while len(self.directory_fds) > DIRECTORY_FDS_KEPT:
            os.close(self.directory_fds.popleft())
        return b"/proc/self/fd/%d/%s" % (kept, rest[-1])

    def _start(self, path: bytes, base: bytes | None) -> list[bytes]:
        if not path:
            raise OSError(errno.ENOENT, "empty path")
        if path.startswith(b"/"):
            return []
        return list(self.guest_components(base if base is not None else os.getcwdb()))

    def _walk(self, done: list[bytes], todo: list[bytes], follow: bool) -> list[bytes] | bytes:
        """Resolved guest components, or a host path where the walk ends on a /proc link
        to an object with no name in any tree (a pipe, a socket)."""
        pending = list(reversed(todo))
        links = 0
        while pending:
            name = pending.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if done:
                    done.pop()
                continue
            last = not any(n not in (b"", b".") for n in pending)
            candidate = [*done, name]
            if not follow and last:
                done = candidate
                continue
            try:
                target = self._link_target(candidate)
            except HeldObject:
                if last:
                    return self._host_of(candidate)
                raise OSError(errno.ENOTDIR, "not a directory") from None
            if target is None:
                done = candidate
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links")
            if target.startswith(b"/"):
                done = []
            pending.extend(reversed(target.split(b"/")))
        return done

    def readlink(self, path: bytes, base: bytes | None = None) -> bytes:
        """What the symlink at guest ``path`` says, in guest terms (EINVAL if no link)."""
        parts = self._walk(self._start(path, base), path.split(b"/"), follow=False)
        try:
            target = None if isinstance(parts, bytes) or not parts else self._link_target(parts)
        except HeldObject as held:
            return held.target
        if target is None:
            raise OSError(errno.EINVAL, "not a symbolic link")
        return target

    def _link_target(self, parts: list[bytes]) -> bytes | None:
        """What the symlink at guest ``parts`` points to, in guest terms; None if no link."""
        if parts[0] == b"proc" and len(parts) >= 2:
            return self._proc_link(parts)
        if len(parts) == 2 and parts[0] == b"dev" and parts[1] in STANDARD_STREAMS and \
                not os.path.lexists(self._host_of(parts)):
            return STANDARD_STREAMS[parts[1]]
        try:
            target = os.readlink(self._host_of(parts))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return None  # not a link, or nothing there (yet)
            raise
        return target

    def _proc_link(self, parts: list[bytes]) -> bytes | None:
        """Links in /proc: ``self`` is the caller's guest pid; under a process, ``root`` is
        the guest's root and the others (cwd, exe, fd/N, task/T/...) are mapped back from
        host paths, or name objects without one (``pipe:[123]``)."""
        if len(parts) == 2 and parts[1] in (b"self", b"thread-self"):
            return b"/proc/%d" % self.self_pid()
        if len(parts) == 3 and parts[2] == b"exe":
            if parts[1] != b"%d" % self.self_pid():  # the host's would name popek's Python
                raise OSError(errno.ENOENT, "another process's program is not known")
            return self.to_guest(self.self_exe())
        try:
            target = os.readlink(self._host_of(parts))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return None
            raise
        if len(parts) == 2 or not parts[1].isdigit():
            return target  # /proc/mounts -> self/mounts, an ordinary link
        if parts[-1] == b"root":
            return b"/"
        guest = self.to_guest(target) if target.startswith(b"/") else None
        if guest is not None:
            return guest
        if parts[-2] == b"fd":
            raise HeldObject(target)
        raise OSError(errno.ENOENT, "outside the container")

    def _host_of(self, parts: list[bytes] | tuple[bytes, ...]) -> bytes:
        """The host path of resolved guest components (no symlinks left among them)."""
        if parts and parts[0] == b"proc" and len(parts) >= 2 and parts[1].isdigit():
            host = self.host_pid(int(parts[1]))
            if host is None:
                raise OSError(errno.ENOENT, "no such process in this container")
            if PROC_HIDDEN.intersection(parts[2:]):
                raise OSError(errno.EACCES, "popek's own memory and arguments stay hidden")
            if len(parts) >= 4 and parts[2] == b"fd" and parts[3].isdigit() and \
                    host == os.getpid() and int(parts[3]) in self.hidden_fds():
                raise OSError(errno.ENOENT, "no such descriptor")
            return b"/".join((b"/proc", b"%d" % host, *parts[2:]))
        if parts and parts[0] == b"proc":
            return b"/".join((b"/proc", *parts[1:]))
        mount = self.mount_of(parts)
        rest = parts[len(mount.guest):]
        return b"/".join((mount.host, *rest)) if rest else mount.host

    def mount_of(self, parts: list[bytes] | tuple[bytes, ...]) -> Mount:
        for mount in reversed(self.mounts):
            if tuple(parts[:len(mount.guest)]) == mount.guest:
                return mount
        raise AssertionError("the root mount holds every path")

    @staticmethod
    def _check_proc_write(host: bytes) -> None:
        """/proc is read-only but for a process's descriptors (/proc/sys would change the
        host)."""
        parts = host.split(b"/")
        if not (len(parts) == 5 and parts[2].isdigit() and parts[3] == b"fd"):
            raise OSError(errno.EROFS, "read-only file system")

    # -- host to guest ---------------------------------------------------------------------
    def to_guest(self, host: bytes) -> bytes | None:
        """The guest path of a host path inside the container's tree; None if outside."""
        host = os.path.normpath(host)
        for mount in reversed(self.mounts):
            if host == mount.host or host.startswith(mount.host.rstrip(b"/") + b"/"):
                rest = host[len(mount.host):].strip(b"/")
                return b"/" + b"/".join(p for p in (*mount.guest, rest) if p)
        return None

    def guest_components(self, host: bytes) -> tuple[bytes, ...]:
        """The guest components of host directory ``host`` (a relative path's start)."""
        if host == b"/proc" or host.startswith(b"/proc/"):
            parts = list(_components(host))
            if len(parts) > 1 and parts[1].isdigit():  # /proc/<host pid>/...
                parts[1] = b"%d" % self.guest_pid(int(parts[1]))
            return tuple(parts)
        guest = self.to_guest(host)
        if guest is None:
            raise OSError(errno.ENOENT, "the current directory is outside the container")
        return _components(guest)



def _components(path: bytes) -> tuple[bytes, ...]:
    return tuple(p for p in path.split(b"/") if p)
