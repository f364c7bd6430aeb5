"""Process life cycle and identity: exit, fork (clone), execve, wait4, kill, ids, futex.

fork is the host's fork: the child is a copy of the whole emulator, guest memory
included, which is what fork means. A vfork-style clone is a fork whose parent
waits until the child has executed or exited, so the order of their output is
what the program expects. execve runs a RISC-V program in place and hands
anything else (a native binary, a script for a native interpreter) to the host's
execve, as qemu-user does. A clone with CLONE_THREAD is a thread (thread_calls).
"""

from __future__ import annotations

import fcntl
import os
import resource
from typing import TYPE_CHECKING

from popek.user import elf_loader, signals, structs
from popek.user.address_space import StringTooLong
from popek.user.control import Resume
from popek.user.linux_errno import Errno, SyscallError
from popek.user.signals import WAKEUP_FD_MIN
from popek.user.syscalls.registry import i32, syscall
from popek.user.syscalls.thread_calls import (
    CLONE_CHILD_SETTID,
    CLONE_PARENT_SETTID,
    CLONE_SETTLS,
    CLONE_THREAD,
    CLONE_VM,
    clone_thread,
    signal_thread,
)

if TYPE_CHECKING:
    from popek.user.process import Process

CLONE_VFORK = 0x4000
WNOHANG, WUNTRACED, WCONTINUED = 1, 2, 8
PR_SET_NAME, PR_GET_NAME = 15, 16
SHEBANG_LIMIT = 256
PATH_MAX = 4096
MAX_ARG_STRLEN = 32 * 4096  # one argument or environment string, at most
WAIT4_POLL = 0.25  # seconds


@syscall("getpid")
def getpid(p: Process) -> int:
    return p.pid


@syscall("getppid")
def getppid(p: Process) -> int:
    return p.guest_pid(os.getppid())


@syscall("getuid")
def getuid(p: Process) -> int:
    return p.guest_ids(os.getuid(), os.getgid())[0]


@syscall("geteuid")
def geteuid(p: Process) -> int:
    return p.guest_ids(os.geteuid(), os.getegid())[0]


@syscall("getgid")
def getgid(p: Process) -> int:
    return p.guest_ids(os.getuid(), os.getgid())[1]


@syscall("getegid")
def getegid(p: Process) -> int:
    return p.guest_ids(os.geteuid(), os.getegid())[1]


@syscall("getgroups")
def getgroups(p: Process, size: int, groups: int) -> int:
    ids = os.getgroups() if not p.options.container else [0]
    size = i32(size)
    if size == 0:
        return len(ids)
    if size < len(ids):
        raise SyscallError(Errno.EINVAL)
    p.space.write(groups, b"".join(structs.U32.pack(g) for g in ids))
    return len(ids)


@syscall("setpgid")
def setpgid(p: Process, pid: int, pgid: int) -> int:
    pid, pgid = i32(pid), i32(pgid)
    os.setpgid(p.host_pid(pid) if pid else 0, p.host_pid(pgid) if pgid else 0)
    return 0


@syscall("getpgid")
def getpgid(p: Process, pid: int) -> int:
    pid = i32(pid)
    return p.guest_pid(os.getpgid(p.host_pid(pid) if pid else 0))


@syscall("getsid")
def getsid(p: Process, pid: int) -> int:
    pid = i32(pid)
    return p.guest_pid(os.getsid(p.host_pid(pid) if pid else 0))


@syscall("setsid")
def setsid(p: Process) -> int:
    os.setsid()
    return p.pid


@syscall("rseq")
def not_provided(p: Process) -> int:
    """An optional feature the C library falls back from when it fails with ENOSYS."""
    return -Errno.ENOSYS


@syscall("prctl")
def prctl(p: Process, option: int, arg2: int) -> int:
    option = i32(option)
    if option == PR_SET_NAME:
        p.set_comm(p.space.read_cstr(arg2, 4096))
        return 0
    if option == PR_GET_NAME:
        p.space.write(arg2, p.scheduler.current.comm.ljust(16, b"\0"))
        return 0
    raise SyscallError(Errno.EINVAL)


# -- fork -----------------------------------------------------------------------------
@syscall("clone")
def clone(p: Process, flags: int, newsp: int, ptid: int, tls: int, ctid: int) -> int:
    if flags & CLONE_THREAD:
        return clone_thread(p, flags, newsp, ptid, tls, ctid)
    if flags & CLONE_VM and not flags & CLONE_VFORK:
        raise SyscallError(Errno.EINVAL)  # a process sharing memory: not emulated
    done_r = done_w = -1
    if flags & CLONE_VFORK:
        r, w = os.pipe2(os.O_CLOEXEC)
        done_r = r
        done_w = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, WAKEUP_FD_MIN)
        os.close(w)
    pid = os.fork()
    if pid == 0:
        p.scheduler.keep_only_current(p.pid)
        p.set_comm(p.scheduler.current.comm)
        _child(p, flags, newsp, tls, ctid, done_r, done_w)
        return 0
    pid = p.new_child(pid)
    if done_r >= 0:
        os.close(done_w)
        while os.read(done_r, 1):  # EOF once the child executes or exits
            pass
        os.close(done_r)
    if flags & CLONE_PARENT_SETTID:
        p.space.write(ptid, structs.I32.pack(pid))
    return pid


def _child(p: Process, flags: int, newsp: int, tls: int, ctid: int, done_r: int,
           done_w: int) -> None:
    if p.vfork_done_fd >= 0:  # a vfork child that forks: the grandchild must not hold it
        os.close(p.vfork_done_fd)
    p.vfork_done_fd = done_w
    if done_r >= 0:
        os.close(done_r)
    p.signals.open_wakeup_pipe()
    x = p.hart.x
    if newsp:
        x[2] = newsp
    if flags & CLONE_SETTLS:
        x[4] = tls
    if flags & CLONE_CHILD_SETTID:
        p.space.write(ctid, structs.I32.pack(p.pid))


@syscall("clone3")
def clone3(p: Process, args: int, size: int) -> int:
    """clone3 as the equivalent clone: glibc creates threads and spawns with it."""
    if size < structs.CLONE_ARGS.size:
        raise SyscallError(Errno.EINVAL)
    flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls = \
        structs.CLONE_ARGS.unpack(p.space.read(args, structs.CLONE_ARGS.size))
    if pidfd or exit_signal > signals.NSIG or flags >> 32:
        raise SyscallError(Errno.EINVAL)  # pidfds and the newer flags are not emulated
    return clone(p, flags | exit_signal, stack + stack_size if stack else 0, parent_tid, tls,
                 child_tid)


# -- execve ---------------------------------------------------------------------------
@syscall("execve")
def execve(p: Process, path: int, argv: int, envp: int) -> int:
    name = p.space.read_cstr(path, PATH_MAX)
    try:
        args = [p.space.read_cstr(a, MAX_ARG_STRLEN) for a in p.space.read_pointers(argv)] \
            if argv else []
        env = [p.space.read_cstr(e, MAX_ARG_STRLEN) for e in p.space.read_pointers(envp)] \
            if envp else []
    except StringTooLong:
        raise SyscallError(Errno.E2BIG) from None
    _exec(p, name, p.host_path(name), args, env)
    raise Resume(p.hart.pc)


def _exec(p: Process, name: bytes, host: bytes, argv: list[bytes], envp: list[bytes]) -> None:
    """Replace the process with ``host``; returns only for an in-place RISC-V program."""
    st = os.stat(host)
    if os.path.isdir(host) or not os.access(host, os.X_OK) or not st.st_mode & 0o111:
        raise SyscallError(Errno.EACCES)
    with open(host, "rb") as f:
        head = f.read(SHEBANG_LIMIT)
    path = os.fsdecode(host)
    if elf_loader.is_elf(head):
        try:
            image = elf_loader.read_image(path)
        except elf_loader.ExecError:
            _host_execve(p, host, argv, envp)  # not ours to run: the host may know better
        else:
            _replace(p, path, argv, envp, name, image)
            return
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].strip().split(None, 1)
        if words:
            interp = p.host_path(words[0])
            try:
                image = elf_loader.read_image(os.fsdecode(interp))
            except elf_loader.ExecError:
                pass
            else:
                script_argv = [words[0], *words[1:], name, *argv[1:]]
                _replace(p, os.fsdecode(interp), script_argv, envp, words[0], image)
                return
    _host_execve(p, host, argv, envp)


def _replace(p: Process, path: str, argv: list[bytes], envp: list[bytes], execfn: bytes,
             image: elf_loader.ElfImage) -> None:
    try:
        p.execve(path, argv, envp, execfn=execfn, image=image)
    except elf_loader.ExecError as e:
        raise SyscallError(e.errno) from None


def _host_execve(p: Process, host: bytes, argv: list[bytes], envp: list[bytes]) -> None:
    if p.options.container:  # a native program would see the host, not the container
        raise SyscallError(Errno.ENOEXEC)
    env = dict(e.split(b"=", 1) for e in envp if b"=" in e)
    p.signals.prepare_host_exec()
    os.execve(host, argv or [host], env)


# -- waiting and signalling -------------------------------------------------------------
@syscall("wait4")
def wait4(p: Process, pid: int, status: int, options: int, rusage: int) -> int:
    pid, options = _host_wait_target(p, i32(pid)), i32(options)
    host_options = ((os.WUNTRACED if options & WUNTRACED else 0)
                    | (os.WCONTINUED if options & WCONTINUED else 0))
    while True:
        child, raw_status, usage = os.wait4(pid, host_options | os.WNOHANG)
        if child or options & WNOHANG:
            break
        # SIGCHLD ends the wait; the timeout covers children whose SIGCHLD is ignored.
        p.scheduler.wait([], WAIT4_POLL, any_signal=True)
    if child and status:
        p.space.write(status, structs.I32.pack(raw_status))
    if child and rusage:
        p.space.write(rusage, pack_rusage(usage))
    if child and (os.WIFEXITED(raw_status) or os.WIFSIGNALED(raw_status)):
        return p.reaped(child)
    return p.guest_pid(child)


def _host_wait_target(p: Process, pid: int) -> int:
    """wait4's pid argument (a child, -pgid, 0 or -1) in host numbers."""
    if pid > 0:
        return p.host_pid(pid)
    if pid < -1:
        return -p.host_pid(-pid)
    return pid


def pack_rusage(usage: resource.struct_rusage) -> bytes:
    def timeval(seconds: float) -> tuple[int, int]:
        usec = round(seconds * 1e6)
        return usec // 10**6, usec % 10**6

    return structs.RUSAGE.pack(
        *timeval(usage.ru_utime), *timeval(usage.ru_stime), usage.ru_maxrss, usage.ru_ixrss,
        usage.ru_idrss, usage.ru_isrss, usage.ru_minflt, usage.ru_majflt, usage.ru_nswap,
        usage.ru_inblock, usage.ru_oublock, usage.ru_msgsnd, usage.ru_msgrcv,
        usage.ru_nsignals, usage.ru_nvcsw, usage.ru_nivcsw)


def _send(p: Process, pid: int, sig: int, code: int) -> int:
    if not 0 <= sig <= signals.NSIG:
        raise SyscallError(Errno.EINVAL)
    if code == signals.SI_TKILL and signal_thread(p, pid, sig):
        return 0
    if pid == p.pid:
        if sig:
            uid = p.guest_ids(os.getuid(), os.getgid())[0]
            info = signals.siginfo(sig, code, structs.SIGINFO_KILL.pack(pid, uid))
            p.signals.raise_signal(sig, info)
        return 0
    host = signals.host_signal(sig) if sig else 0
    if host is None:
        raise SyscallError(Errno.EINVAL)
    targets = p.host_kill_targets(pid)
    if not targets:
        raise SyscallError(Errno.ESRCH)  # kill(-1) in a container with no other process
    for target in targets:
        os.kill(target, host)
    return 0


@syscall("kill")
def kill(p: Process, pid: int, sig: int) -> int:
    return _send(p, i32(pid), i32(sig), signals.SI_USER)


@syscall("tkill")
def tkill(p: Process, tid: int, sig: int) -> int:
    return _send(p, i32(tid), i32(sig), signals.SI_TKILL)


@syscall("tgkill")
def tgkill(p: Process, tgid: int, tid: int, sig: int) -> int:
    if i32(tgid) == p.pid and not signal_thread(p, i32(tid), 0):
        raise SyscallError(Errno.ESRCH)
    return _send(p, i32(tid), i32(sig), signals.SI_TKILL)
