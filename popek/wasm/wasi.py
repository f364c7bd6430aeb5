"""WASI preview1: the system interface a WebAssembly program built with wasi-libc calls.

A :class:`Wasi` is one program's view of the host: its arguments and environment, the
standard streams, and the directories it was given (``--dir HOSTDIR[::GUESTDIR]``), as
capabilities. Every path a program names is resolved by the kernel under one of those
directories (openat2's RESOLVE_BENEATH: no ``..``, absolute path or symlink leads out),
so nothing else on the host is reachable, whatever the module does. The program's
pointers are checked against its linear memory here: a bad one ends the program with
:class:`WasiAbort`, as in wasmtime, never a host exception.

Each call is a method whose annotations (:data:`I32`, :data:`I64`) declare its wasm
signature; :meth:`Wasi.imports` turns them into the host functions of the
``wasi_snapshot_preview1`` import module.
"""

from __future__ import annotations

import errno
import fcntl
import inspect
import os
import select
import stat
import termios
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from popek import wasm
from popek.user.hostlibc import open_beneath
from popek.wasm import wasi_abi as abi

I32 = int  # a wasm i32 argument (unsigned)
I64 = int  # a wasm i64 argument (unsigned)
WASM_TYPES = {"I32": "i32", "I64": "i64"}
MAX_TRANSFER = 1 << 24  # bytes one read or write moves at most (a short count, as POSIX allows)
CLOCKS = (time.CLOCK_REALTIME, time.CLOCK_MONOTONIC, time.CLOCK_PROCESS_CPUTIME_ID,
          time.CLOCK_THREAD_CPUTIME_ID)  # WASI's clock ids 0-3
WHENCE = (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END)
MAX_EXIT_STATUS = 126  # wasmtime refuses this status and larger ones (shells reserve them)


class WasiError(Exception):
    """A call fails with WASI errno ``code`` (a name of :data:`wasi_abi.ERRNO`)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.code = abi.ERRNO[name]


class WasiAbort(wasm.WasmError):
    """A call the program cannot go on from (a pointer outside its linear memory, an exit
    status WASI does not allow): it ends, as in wasmtime (an error, not a trap, so its
    command line exits with 1)."""


class WasiExit(Exception):  # noqa: N818 - an exit, not an error
    """``proc_exit``: unwinds the program's call; ``status`` is its exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True)
class Preopen:
    """Host directory ``host`` given to the program as ``guest``."""

    host: str
    guest: str

    @classmethod
    def parse(cls, spec: str) -> Preopen:
        """wasmtime's ``--dir`` syntax: ``HOSTDIR`` or ``HOSTDIR::GUESTDIR``."""
        host, _, guest = spec.partition("::")
        return cls(host, guest or host)


@dataclass
class Descriptor:
    """An open file of the program: the host's descriptor and what WASI adds to it."""

    host_fd: int
    directory: bool = False
    preopen: bytes | None = None  # the guest name of a preopened directory
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)  # fd_readdir's


class GuestMemory:
    """The calling instance's linear memory, every access checked before any is made."""

    def __init__(self, memory: wasm.Memory | None) -> None:
        self.memory = memory

    def read(self, addr: int, n: int) -> bytes:
        self.check(addr, n)
        return self.memory.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        self.check(addr, len(data))
        self.memory.write(addr, data)

    def check(self, addr: int, n: int) -> None:
        if self.memory is None or addr + n > self.memory.size:
            raise WasiAbort(f"pointer out of bounds: {n} bytes at {addr:#x}")

    def set_u32(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(4, "little"))

    def set_u64(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(8, "little"))

    def path(self, addr: int, n: int) -> bytes:
        """A path the program passes: UTF-8, as WASI requires."""
        raw = self.read(addr, n)
        try:
            raw.decode()
        except UnicodeDecodeError:
            raise WasiError("ILSEQ") from None
        return raw

    def iovecs(self, addr: int, count: int) -> list[tuple[int, int]]:
        """(address, length) of each buffer of an iovec array, each checked."""
        table = self.read(addr, count * abi.IOVEC.size)
        vectors = list(abi.IOVEC.iter_unpack(table))
        for base, length in vectors:
            self.check(base, length)
        return vectors

    def gather(self, addr: int, count: int) -> bytes:
        """The buffers' bytes, up to MAX_TRANSFER of them."""
        parts, left = [], MAX_TRANSFER
        for base, n in self.iovecs(addr, count):
            parts.append(self.read(base, min(n, left)))
            left -= len(parts[-1])
        return b"".join(parts)

    def scatter(self, addr: int, count: int, read: Callable[[int], bytes]) -> int:
        """Fills the buffers with what one ``read(n)`` returns; the bytes placed."""
        vectors = self.iovecs(addr, count)
        data = read(min(sum(n for _, n in vectors), MAX_TRANSFER))
        done = 0
        for base, n in vectors:
            if done >= len(data):
                break
            self.write(base, data[done:done + n])
            done += n
        return len(data)


def _wasi_call(method: Callable) -> Callable:
    method.wasi_call = True
    return method


class Wasi:
    """One WASI program's host: arguments, environment, stdio and preopened directories."""

    def __init__(self, args: Iterable[str | bytes], env: dict[str, str] | None = None,
                 preopens: Iterable[Preopen] = (), stdio: tuple[int, int, int] = (0, 1, 2)) -> None:
        self.args = [os.fsencode(a) for a in args]
        self.env = [f"{k}={v}".encode() for k, v in (env or {}).items()]
        self.fds: dict[int, Descriptor] = {}
        try:
            for fd, host_fd in enumerate(stdio):
                self.fds[fd] = Descriptor(os.dup(host_fd))
            for preopen in preopens:
                host_fd = os.open(preopen.host, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self.fds[len(self.fds)] = Descriptor(host_fd, True, os.fsencode(preopen.guest))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        for descriptor in self.fds.values():
            os.close(descriptor.host_fd)
        self.fds.clear()

    def __enter__(self) -> Wasi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def imports(self) -> dict[str, dict[str, wasm.HostFunction]]:
        """The ``wasi_snapshot_preview1`` module, to link a program's imports against."""
        functions = {}
        for name, method in inspect.getmembers(self, inspect.ismethod):
            if getattr(method, "wasi_call", False):
                functions[name] = self._host_function(name, method)
        return {abi.MODULE: functions}

    @staticmethod
    def _host_function(name: str, method: Callable) -> wasm.HostFunction:
        """``method`` as a host function (popek.wasm passes integers unsigned): the
        caller's memory checked, host and WASI errors returned as WASI's errno."""
        params = [WASM_TYPES[p.annotation] for p in
                  inspect.signature(method).parameters.values() if p.name != "mem"]
        if name == "proc_exit":
            return wasm.HostFunction(params, [], lambda caller, status: method(None, status))

        def call(caller: object, *args: int) -> int:
            try:
                method(GuestMemory(getattr(caller, "memory", None)), *args)
            except WasiError as e:
                return e.code
            except OSError as e:
                return abi.FROM_HOST_ERRNO.get(e.errno, abi.ERRNO["IO"])
            except (OverflowError, ValueError):  # an offset or size the host cannot take
                return abi.ERRNO["INVAL"]
            return 0
        return wasm.HostFunction(params, ["i32"], call)

    # -- descriptors -----------------------------------------------------------------------
    def _get(self, fd: int) -> Descriptor:
        try:
            return self.fds[fd]
        except KeyError:
            raise WasiError("BADF") from None

    def _add(self, host_fd: int) -> int:
        fd = next(n for n in range(len(self.fds) + 1) if n not in self.fds)
        self.fds[fd] = Descriptor(host_fd, stat.S_ISDIR(os.fstat(host_fd).st_mode))
        return fd

    def _directory(self, fd: int) -> int:
        """The host descriptor of directory ``fd`` that a path is resolved under."""
        descriptor = self._get(fd)
        if not descriptor.directory:
            raise WasiError("NOTDIR")
        return descriptor.host_fd

    def _file(self, fd: int) -> int:
        """The host descriptor of ``fd`` to read or write bytes: not a directory's (EBADF,
        as wasmtime says)."""
        descriptor = self._get(fd)
        if descriptor.directory:
            raise WasiError("BADF")
        return descriptor.host_fd

    # -- paths: every one resolved beneath a directory the program holds ------------------
    @staticmethod
    def _open(dir_fd: int, path: bytes, flags: int, mode: int = 0) -> int:
        try:
            return open_beneath(dir_fd, path, flags, mode)
        except OSError as e:
            if e.errno == errno.EXDEV:  # the path leads out of the directory
                raise WasiError("PERM") from None
            raise

    def _parent(self, fd: int, path: bytes) -> tuple[int, bytes]:
        """(a host descriptor of the directory holding the last component, that
        component): the caller closes it. A last ``.`` or ``..`` is resolved as a whole,
        so an operation on the name touches the resolved directory itself."""
        dir_fd = self._directory(fd)
        head, _, name = path.rstrip(b"/").rpartition(b"/")
        if not path:
            raise WasiError("NOENT")
        if name in (b"", b".", b".."):
            return self._open(dir_fd, path, os.O_PATH | os.O_DIRECTORY), b"."
        trailing = b"/" if path.endswith(b"/") else b""
        return self._open(dir_fd, head or b".", os.O_PATH | os.O_DIRECTORY), name + trailing

    def _path_call(self, fd: int, path: bytes, action: Callable[[int, bytes], object]) -> object:
        parent, name = self._parent(fd, path)
        try:
            return action(parent, name)
        finally:
            os.close(parent)

    def _stat_path(self, fd: int, flags: int, path: bytes) -> os.stat_result:
        follow = 0 if flags & abi.LOOKUP_SYMLINK_FOLLOW else os.O_NOFOLLOW
        target = self._open(self._directory(fd), path, os.O_PATH | follow)
        try:
            return os.fstat(target)
        finally:
            os.close(target)

    # -- arguments, environment, clocks, randomness, process --------------------------------
    @staticmethod
    def _put_strings(mem: GuestMemory, strings: list[bytes], pointers: int, buf: int) -> None:
        for i, s in enumerate(strings):
            mem.set_u32(pointers + 4 * i, buf)
            mem.write(buf, s + b"\0")
            buf += len(s) + 1

    @staticmethod
    def _put_sizes(mem: GuestMemory, strings: list[bytes], count: int, size: int) -> None:
        mem.set_u32(count, len(strings))
        mem.set_u32(size, sum(len(s) + 1 for s in strings))

    @_wasi_call
    def args_get(self, mem: GuestMemory, argv: I32, argv_buf: I32) -> None:
        self._put_strings(mem, self.args, argv, argv_buf)

    @_wasi_call
    def args_sizes_get(self, mem: GuestMemory, argc: I32, argv_buf_size: I32) -> None:
        self._put_sizes(mem, self.args, argc, argv_buf_size)

    @_wasi_call
    def environ_get(self, mem: GuestMemory, environ: I32, environ_buf: I32) -> None:
        self._put_strings(mem, self.env, environ, environ_buf)

    @_wasi_call
    def environ_sizes_get(self, mem: GuestMemory, count: I32, buf_size: I32) -> None:
        self._put_sizes(mem, self.env, count, buf_size)

    @staticmethod
    def _clock(clock_id: int) -> int:
        if clock_id >= len(CLOCKS):
            raise WasiError("INVAL")
        return CLOCKS[clock_id]

    @_wasi_call
    def clock_res_get(self, mem: GuestMemory, clock_id: I32, resolution: I32) -> None:
        mem.set_u64(resolution, max(1, round(time.clock_getres(self._clock(clock_id)) * 1e9)))

    @_wasi_call
    def clock_time_get(self, mem: GuestMemory, clock_id: I32, precision: I64,
                       timestamp: I32) -> None:
        mem.set_u64(timestamp, time.clock_gettime_ns(self._clock(clock_id)))

    @_wasi_call
    def random_get(self, mem: GuestMemory, buf: I32, buf_len: I32) -> None:
        mem.check(buf, buf_len)  # before the host makes up that many bytes
        mem.write(buf, os.urandom(buf_len))

    @_wasi_call
    def proc_exit(self, mem: object, status: I32) -> None:
        if status >= MAX_EXIT_STATUS:
            raise WasiAbort(f"exit with invalid exit status {status} outside of [0..126)")
        raise WasiExit(status)

    @_wasi_call
    def proc_raise(self, mem: GuestMemory, signal: I32) -> None:
        raise WasiError("NOSYS")

    @_wasi_call
    def sched_yield(self, mem: GuestMemory) -> None:
        os.sched_yield()

    # -- descriptors: reading, writing, state ----------------------------------------------
    @_wasi_call
    def fd_read(self, mem: GuestMemory, fd: I32, iovs: I32, iovs_len: I32, nread: I32) -> None:
        host_fd = self._file(fd)
        mem.set_u32(nread, mem.scatter(iovs, iovs_len, lambda n: os.read(host_fd, n)))

    @_wasi_call
    def fd_pread(self, mem: GuestMemory, fd: I32, iovs: I32, iovs_len: I32, offset: I64,
                 nread: I32) -> None:
        host_fd = self._file(fd)
        mem.set_u32(nread, mem.scatter(iovs, iovs_len, lambda n: os.pread(host_fd, n, offset)))

    @_wasi_call
    def fd_write(self, mem: GuestMemory, fd: I32, iovs: I32, iovs_len: I32,
                 nwritten: I32) -> None:
        host_fd = self._file(fd)
        mem.set_u32(nwritten, os.write(host_fd, mem.gather(iovs, iovs_len)))

    @_wasi_call
    def fd_pwrite(self, mem: GuestMemory, fd: I32, iovs: I32, iovs_len: I32, offset: I64,
                  nwritten: I32) -> None:
        host_fd = self._file(fd)
        mem.set_u32(nwritten, os.pwrite(host_fd, mem.gather(iovs, iovs_len), offset))

    @_wasi_call
    def fd_seek(self, mem: GuestMemory, fd: I32, offset: I64, whence: I32,
                newoffset: I32) -> None:
        if whence >= len(WHENCE):
            raise WasiError("INVAL")
        signed = offset - (1 << 64) if offset >> 63 else offset
        mem.set_u64(newoffset, os.lseek(self._get(fd).host_fd, signed, WHENCE[whence]))

    @_wasi_call
    def fd_tell(self, mem: GuestMemory, fd: I32, offset: I32) -> None:
        mem.set_u64(offset, os.lseek(self._get(fd).host_fd, 0, os.SEEK_CUR))

    @_wasi_call
    def fd_close(self, mem: GuestMemory, fd: I32) -> None:
        os.close(self._get(fd).host_fd)
        del self.fds[fd]

    @_wasi_call
    def fd_renumber(self, mem: GuestMemory, fd: I32, to: I32) -> None:
        moved, replaced = self._get(fd), self._get(to)
        if fd != to:
            os.close(replaced.host_fd)
            self.fds[to] = moved
            del self.fds[fd]

    @_wasi_call
    def fd_sync(self, mem: GuestMemory, fd: I32) -> None:
        os.fsync(self._get(fd).host_fd)

    @_wasi_call
    def fd_datasync(self, mem: GuestMemory, fd: I32) -> None:
        os.fdatasync(self._get(fd).host_fd)

    @_wasi_call
    def fd_advise(self, mem: GuestMemory, fd: I32, offset: I64, length: I64,
                  advice: I32) -> None:
        if advice >= len(abi.ADVICE):
            raise WasiError("INVAL")
        os.posix_fadvise(self._get(fd).host_fd, offset, length, getattr(os, abi.ADVICE[advice]))

    @_wasi_call
    def fd_allocate(self, mem: GuestMemory, fd: I32, offset: I64, length: I64) -> None:
        os.posix_fallocate(self._get(fd).host_fd, offset, length)

    @_wasi_call
    def fd_fdstat_get(self, mem: GuestMemory, fd: I32, buf: I32) -> None:
        host_fd = self._get(fd).host_fd
        kind = abi.filetype(os.fstat(host_fd).st_mode)
        status = fcntl.fcntl(host_fd, fcntl.F_GETFL)
        flags = ((abi.FDFLAG_APPEND if status & os.O_APPEND else 0)
                 | (abi.FDFLAG_NONBLOCK if status & os.O_NONBLOCK else 0))
        if kind == abi.DIRECTORY:
            rights, inheriting = abi.DIRECTORY_RIGHTS, abi.ALL_RIGHTS
        else:
            access = status & os.O_ACCMODE
            rights = abi.FILE_RIGHTS & ~(abi.READ_RIGHTS if access == os.O_WRONLY else 0) \
                & ~(abi.WRITE_RIGHTS if access == os.O_RDONLY else 0)
            if os.isatty(host_fd) or kind != abi.REGULAR_FILE:
                rights &= ~abi.SEEK_RIGHTS  # how wasi-libc's isatty knows a terminal
            inheriting = 0
        mem.write(buf, abi.FDSTAT.pack(kind, flags, rights, inheriting))

    @_wasi_call
    def fd_fdstat_set_flags(self, mem: GuestMemory, fd: I32, flags: I32) -> None:
        host_fd = self._get(fd).host_fd
        status = fcntl.fcntl(host_fd, fcntl.F_GETFL) & ~(os.O_APPEND | os.O_NONBLOCK)
        status |= (os.O_APPEND if flags & abi.FDFLAG_APPEND else 0) \
            | (os.O_NONBLOCK if flags & abi.FDFLAG_NONBLOCK else 0)
        fcntl.fcntl(host_fd, fcntl.F_SETFL, status)

    @_wasi_call
    def fd_fdstat_set_rights(self, mem: GuestMemory, fd: I32, rights: I64,
                             inheriting: I64) -> None:
        self._get(fd)
        raise WasiError("NOTSUP")  # rights are not kept per descriptor (nor by wasmtime)

    @_wasi_call
    def fd_filestat_get(self, mem: GuestMemory, fd: I32, buf: I32) -> None:
        mem.write(buf, _filestat(os.fstat(self._get(fd).host_fd)))

    @_wasi_call
    def fd_filestat_set_size(self, mem: GuestMemory, fd: I32, size: I64) -> None:
        os.ftruncate(self._get(fd).host_fd, size)

    @_wasi_call
    def fd_filestat_set_times(self, mem: GuestMemory, fd: I32, atim: I64, mtim: I64,
                              fst_flags: I32) -> None:
        host_fd = self._get(fd).host_fd
        os.utime(host_fd, ns=_new_times(os.fstat(host_fd), atim, mtim, fst_flags))

    @_wasi_call
    def fd_prestat_get(self, mem: GuestMemory, fd: I32, buf: I32) -> None:
        name = self._preopen(fd)
        mem.write(buf, abi.PRESTAT.pack(abi.PREOPENTYPE_DIR, len(name)))

    @_wasi_call
    def fd_prestat_dir_name(self, mem: GuestMemory, fd: I32, path: I32, path_len: I32) -> None:
        name = self._preopen(fd)
        if path_len < len(name):
            raise WasiError("NAMETOOLONG")
        mem.write(path, name)

    def _preopen(self, fd: int) -> bytes:
        name = self._get(fd).preopen
        if name is None:
            raise WasiError("BADF")
        return name

    @_wasi_call
    def fd_readdir(self, mem: GuestMemory, fd: I32, buf: I32, buf_len: I32, cookie: I64,
                   bufused: I32) -> None:
        """Entries from number ``cookie`` on, the last one cut at the end of the buffer
        (the program reads again from there); ``.`` and ``..`` first, as in wasmtime."""
        descriptor = self._get(fd)
        if cookie == 0 or not descriptor.entries:
            descriptor.entries = _directory_entries(descriptor.host_fd)
        mem.check(buf, buf_len)
        out = bytearray()
        for number, (name, inode, kind) in enumerate(descriptor.entries[cookie:], cookie + 1):
            if len(out) >= buf_len:
                break
            out += abi.DIRENT.pack(number, inode, len(name), kind) + name
        mem.write(buf, bytes(out[:buf_len]))
        mem.set_u32(bufused, min(len(out), buf_len))

    # -- paths -----------------------------------------------------------------------------
    @_wasi_call
    def path_open(self, mem: GuestMemory, fd: I32, dirflags: I32, path: I32, path_len: I32,
                  oflags: I32, rights_base: I64, rights_inheriting: I64, fdflags: I32,
                  opened: I32) -> None:
        name = mem.path(path, path_len)
        mem.check(opened, 4)
        read = rights_base & abi.READ_RIGHTS
        write = rights_base & abi.WRITE_RIGHTS
        flags = os.O_RDWR if read and write else os.O_WRONLY if write else os.O_RDONLY
        for bit, host in ((abi.OFLAG_CREAT, os.O_CREAT), (abi.OFLAG_DIRECTORY, os.O_DIRECTORY),
                          (abi.OFLAG_EXCL, os.O_EXCL), (abi.OFLAG_TRUNC, os.O_TRUNC)):
            flags |= host if oflags & bit else 0
        for bit, host in ((abi.FDFLAG_APPEND, os.O_APPEND), (abi.FDFLAG_NONBLOCK, os.O_NONBLOCK),
                          (abi.FDFLAG_DSYNC, os.O_DSYNC), (abi.FDFLAG_SYNC, os.O_SYNC),
                          (abi.FDFLAG_RSYNC, os.O_RSYNC)):
            flags |= host if fdflags & bit else 0
        if not dirflags & abi.LOOKUP_SYMLINK_FOLLOW:
            flags |= os.O_NOFOLLOW
        host_fd = self._open(self._directory(fd), name, flags | os.O_NOCTTY, 0o666)
        mem.set_u32(opened, self._add(host_fd))

    @_wasi_call
    def path_filestat_get(self, mem: GuestMemory, fd: I32, flags: I32, path: I32,
                          path_len: I32, buf: I32) -> None:
        mem.write(buf, _filestat(self._stat_path(fd, flags, mem.path(path, path_len))))

    @_wasi_call
    def path_filestat_set_times(self, mem: GuestMemory, fd: I32, flags: I32, path: I32,
                                path_len: I32, atim: I64, mtim: I64, fst_flags: I32) -> None:
        name = mem.path(path, path_len)
        times = _new_times(self._stat_path(fd, flags, name), atim, mtim, fst_flags)
        if flags & abi.LOOKUP_SYMLINK_FOLLOW:
            target = self._open(self._directory(fd), name, os.O_PATH)
            try:
                os.utime(f"/proc/self/fd/{target}", ns=times)
            finally:
                os.close(target)
        else:
            self._path_call(fd, name, lambda parent, last: os.utime(
                last, ns=times, dir_fd=parent, follow_symlinks=False))

    @_wasi_call
    def path_create_directory(self, mem: GuestMemory, fd: I32, path: I32, path_len: I32) -> None:
        self._path_call(fd, mem.path(path, path_len),
                        lambda parent, name: os.mkdir(name, 0o777, dir_fd=parent))

    @_wasi_call
    def path_remove_directory(self, mem: GuestMemory, fd: I32, path: I32, path_len: I32) -> None:
        self._path_call(fd, mem.path(path, path_len),
                        lambda parent, name: os.rmdir(name, dir_fd=parent))

    @_wasi_call
    def path_unlink_file(self, mem: GuestMemory, fd: I32, path: I32, path_len: I32) -> None:
        self._path_call(fd, mem.path(path, path_len),
                        lambda parent, name: os.unlink(name, dir_fd=parent))

    @_wasi_call
    def path_readlink(self, mem: GuestMemory, fd: I32, path: I32, path_len: I32, buf: I32,
                      buf_len: I32, bufused: I32) -> None:
        target = self._path_call(fd, mem.path(path, path_len),
                                 lambda parent, name: os.readlink(name, dir_fd=parent))
        mem.write(buf, target[:buf_len])
        mem.set_u32(bufused, min(len(target), buf_len))

    @_wasi_call
    def path_symlink(self, mem: GuestMemory, old_path: I32, old_path_len: I32, fd: I32,
                     new_path: I32, new_path_len: I32) -> None:
        target = mem.path(old_path, old_path_len)
        if target.startswith(b"/"):
            raise WasiError("PERM")  # it could never be followed (wasmtime refuses it too)
        self._path_call(fd, mem.path(new_path, new_path_len),
                        lambda parent, name: os.symlink(target, name, dir_fd=parent))

    @_wasi_call
    def path_rename(self, mem: GuestMemory, fd: I32, old_path: I32, old_path_len: I32,
                    new_fd: I32, new_path: I32, new_path_len: I32) -> None:
        old, new = mem.path(old_path, old_path_len), mem.path(new_path, new_path_len)
        self._path_call(fd, old, lambda old_parent, old_name: self._path_call(
            new_fd, new, lambda new_parent, new_name: os.rename(
                old_name, new_name, src_dir_fd=old_parent, dst_dir_fd=new_parent)))

    @_wasi_call
    def path_link(self, mem: GuestMemory, old_fd: I32, old_flags: I32, old_path: I32,
                  old_path_len: I32, new_fd: I32, new_path: I32, new_path_len: I32) -> None:
        old, new = mem.path(old_path, old_path_len), mem.path(new_path, new_path_len)
        if old_flags & abi.LOOKUP_SYMLINK_FOLLOW:
            raise WasiError("INVAL")  # as wasmtime: a hard link to a symlink's target
        self._path_call(old_fd, old, lambda old_parent, old_name: self._path_call(
            new_fd, new, lambda new_parent, new_name: os.link(
                old_name, new_name, src_dir_fd=old_parent, dst_dir_fd=new_parent,
                follow_symlinks=False)))

    # -- waiting ---------------------------------------------------------------------------
    @_wasi_call
    def poll_oneoff(self, mem: GuestMemory, subscriptions: I32, events: I32,
                    nsubscriptions: I32, nevents: I32) -> None:
        """Waits until a descriptor is ready or the first clock expires (sleep, select)."""
        if nsubscriptions == 0:
            raise WasiError("INVAL")
        raw = mem.read(subscriptions, nsubscriptions * abi.SUBSCRIPTION.size)
        mem.check(events, nsubscriptions * abi.EVENT.size)
        poller = select.poll()
        ready: list[bytes] = []
        clocks: list[tuple[int, int]] = []  # (deadline on the monotonic clock, userdata)
        watched: dict[int, list[tuple[int, int]]] = {}  # host fd: (userdata, event type)
        now = time.monotonic_ns()
        for userdata, tag, ident, timeout, _precision, flags in \
                abi.SUBSCRIPTION.iter_unpack(raw):
            if tag == abi.EVENTTYPE_CLOCK:
                if flags & abi.SUBSCRIPTION_CLOCK_ABSTIME:
                    timeout -= time.clock_gettime_ns(self._clock(ident))
                clocks.append((now + max(0, timeout), userdata))
            elif tag in (abi.EVENTTYPE_FD_READ, abi.EVENTTYPE_FD_WRITE) and ident in self.fds:
                host_fd = self.fds[ident].host_fd
                mask = select.POLLIN if tag == abi.EVENTTYPE_FD_READ else select.POLLOUT
                poller.register(host_fd, mask | _registered(watched, host_fd))
                watched.setdefault(host_fd, []).append((userdata, tag))
            else:
                error = "BADF" if tag in (abi.EVENTTYPE_FD_READ, abi.EVENTTYPE_FD_WRITE) \
                    else "INVAL"
                ready.append(abi.EVENT.pack(userdata, abi.ERRNO[error], tag, 0, 0))
        wait = None if ready or not clocks else min(clocks)[0] - now
        if ready:
            wait = 0
        if watched:
            results = poller.poll(None if wait is None else -(-wait // 1_000_000))
        else:
            time.sleep(max(0, wait or 0) / 1e9)
            results = []
        for host_fd, revents in results:
            for userdata, tag in watched[host_fd]:
                wanted = select.POLLIN if tag == abi.EVENTTYPE_FD_READ else select.POLLOUT
                if revents & (wanted | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    hangup = abi.EVENT_FD_READWRITE_HANGUP if revents & select.POLLHUP else 0
                    ready.append(abi.EVENT.pack(userdata, 0, tag, _pending(host_fd, tag),
                                                hangup))
        if not ready and clocks:  # the wait ended at the first deadline (or just before it)
            now = max(time.monotonic_ns(), min(clocks)[0])
            ready = [abi.EVENT.pack(userdata, 0, abi.EVENTTYPE_CLOCK, 0, 0)
                     for deadline, userdata in clocks if deadline <= now]
        mem.write(events, b"".join(ready))
        mem.set_u32(nevents, len(ready))

    # -- sockets: a program is handed none, so no descriptor is one ------------------------
    @_wasi_call
    def sock_accept(self, mem: GuestMemory, fd: I32, flags: I32, opened: I32) -> None:
        self._not_socket(fd)

    @_wasi_call
    def sock_recv(self, mem: GuestMemory, fd: I32, ri_data: I32, ri_data_len: I32,
                  ri_flags: I32, ro_datalen: I32, ro_flags: I32) -> None:
        self._not_socket(fd)

    @_wasi_call
    def sock_send(self, mem: GuestMemory, fd: I32, si_data: I32, si_data_len: I32,
                  si_flags: I32, so_datalen: I32) -> None:
        self._not_socket(fd)

    @_wasi_call
    def sock_shutdown(self, mem: GuestMemory, fd: I32, how: I32) -> None:
        self._not_socket(fd)

    def _not_socket(self, fd: int) -> None:
        self._get(fd)
        raise WasiError("NOTSOCK")


def _filestat(st: os.stat_result) -> bytes:
    return abi.FILESTAT.pack(st.st_dev, st.st_ino, abi.filetype(st.st_mode), st.st_nlink,
                             st.st_size, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)


def _new_times(st: os.stat_result, atim: int, mtim: int, flags: int) -> tuple[int, int]:
    """(atime, mtime) in ns for ``set_times``: a given time, now, or unchanged."""
    if (flags & abi.FST_ATIM and flags & abi.FST_ATIM_NOW) or \
            (flags & abi.FST_MTIM and flags & abi.FST_MTIM_NOW):
        raise WasiError("INVAL")
    now = time.time_ns()
    access = atim if flags & abi.FST_ATIM else now if flags & abi.FST_ATIM_NOW else st.st_atime_ns
    modify = mtim if flags & abi.FST_MTIM else now if flags & abi.FST_MTIM_NOW else st.st_mtime_ns
    return access, modify


def _directory_entries(host_fd: int) -> list[tuple[bytes, int, int]]:
    """(name, inode, filetype) of each entry of the directory, ``.`` and ``..`` first."""
    own = os.fstat(host_fd).st_ino
    entries = [(b".", own, abi.DIRECTORY), (b"..", own, abi.DIRECTORY)]
    with os.scandir(host_fd) as listing:
        for entry in listing:
            try:
                kind = abi.filetype(entry.stat(follow_symlinks=False).st_mode)
            except OSError:
                continue  # removed meanwhile
            entries.append((os.fsencode(entry.name), entry.inode(), kind))
    return entries


def _registered(watched: dict[int, list[tuple[int, int]]], host_fd: int) -> int:
    """The poll events already asked for ``host_fd`` (a program may watch both ways)."""
    mask = 0
    for _userdata, tag in watched.get(host_fd, []):
        mask |= select.POLLIN if tag == abi.EVENTTYPE_FD_READ else select.POLLOUT
    return mask


def _pending(host_fd: int, tag: int) -> int:
    """Bytes ready to read (what fd_readwrite's nbytes reports); 0 if unknown."""
    if tag != abi.EVENTTYPE_FD_READ:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(host_fd, termios.FIONREAD, b"\0" * 4), "little")
    except OSError:
        return 0
