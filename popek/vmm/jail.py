"""A worker confines itself before it touches guest input, as Firecracker's jailer does.

At the top of its entry point, before it reads an image or a snapshot, a worker gives up
everything a guest's process does not need, in an order that leaves no gap:

0. tier 2's on-disk code cache is indexed while its files may still be opened; the
   worker reads it and never writes it (:mod:`popek.engine.native_cache`);
1. it joins the cgroup the VMM made for its VM (:mod:`popek.vmm.cgroups`) while it still
   may; the VMM checks the result in ``/proc``, it does not take the worker's word;
2. core dumps off: a dying worker must not write guest memory to disk;
3. the capability bounding set emptied, then, if the VMM runs as root, the VM's own
   unprivileged uid and gid and no supplementary groups, which clears the capability
   sets too; a worker left with uid 0 (root of a user namespace that maps no other uid)
   clears them itself, so it holds none either way;
4. ``no_new_privs``: nothing it could ever execute gains privileges;
5. the seccomp filter: the system calls in :data:`SYSCALLS` are allowed (a few, in
   :func:`_limited`, with some arguments only); any other kills the whole process
   (``SECCOMP_RET_KILL_PROCESS``), and the VMM reports the VM failed, naming the call
   when the kernel log says which.

The filter is built with libseccomp through ``pyseccomp`` (PyPI, ctypes over Debian's
``libseccomp2``, with the API of libseccomp's own Python module, which Debian ships only
for its system Python, outside a project's venv). A host without libseccomp runs its
workers unfiltered, and ``popek vm info`` says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
from collections.abc import Iterable
from typing import Any

from popek.engine.native_cache import CACHE

try:
    import pyseccomp as seccomp
except (ImportError, OSError, RuntimeError) as err:  # no binding, or no libseccomp.so.2
    seccomp = None
    SECCOMP_MISSING: str | None = f"seccomp unavailable ({err}): the worker runs unfiltered"
else:
    SECCOMP_MISSING = None

# The system calls a confined worker makes, by what makes them. Each was seen in a worker
# (strace of the VMM tests under every engine tier) or is the sibling glibc may use for
# the same purpose. Deliberately absent: execve, fork and clone of processes, kill,
# ptrace, socket, connect, bind, mount, setuid and friends, prctl, bpf, and the rest.
SYSCALLS: dict[str, tuple[str, ...]] = {
    # CPython's allocator, guest RAM, snapshots mapped copy-on-write, tier 2's native code
    # (LLVM maps it writable, then executable), the baseline tier's code area (shared
    # memory mapped twice: stencils.CodeArea)
    "memory": ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise"),
    # tier 2's compiler thread and the locks it shares with the vCPU thread; thread
    # creation itself is clone, limited below
    "threads": ("futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address",
                "gettid", "sched_yield", "sched_getaffinity", "exit"),
    "signals": ("rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
                "restart_syscall"),
    # the guest's clock follows the host's; idle harts sleep
    "time": ("clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep",
             "clock_nanosleep"),
    # descriptors it holds: images, disks, snapshot files, stdio
    "open files": ("read", "write", "readv", "writev", "pread64", "pwrite64", "preadv",
                   "pwritev", "lseek", "fstat", "newfstatat", "statx", "fsync", "fdatasync",
                   "ftruncate", "close", "dup", "dup2", "dup3", "fcntl",
                   # the swap file: Python's os.preadv and os.pwritev, and its pages leave
                   # the host's page cache once on disk
                   "preadv2", "pwritev2", "fadvise64"),
    # CPython imports a module on first use and reads source lines into a traceback
    # (openat itself is limited to reading, below)
    "paths": ("getdents64", "getcwd"),
    # the VMM's channel, and network backends' sockets: only ones it was given. A worker
    # outlives its VMM and waits for the next on the listening socket the VMM bound (it
    # called listen before this filter): accept4 takes the VMM, getsockopt reads its
    # SO_PEERCRED, recvmsg brings its file socket (SCM_RIGHTS)
    "sockets": ("sendto", "recvfrom", "sendmsg", "recvmsg", "shutdown", "getsockname",
                "getpeername", "getsockopt", "accept", "accept4"),
    # waiting for the VMM or a device backend
    "waiting": ("select", "pselect6", "poll", "ppoll", "epoll_create1", "epoll_ctl",
                "epoll_wait", "epoll_pwait", "eventfd2", "pipe2"),
    # statistics and what it is
    "itself": ("getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getrusage",
               "times", "uname", "sysinfo", "getrandom"),
    "exit": ("exit_group",),
}

_CLONE_THREAD = 0x10000
_WRITING = os.O_ACCMODE | os.O_CREAT | os.O_TRUNC  # open flags that write or create
_TCGETS, _FIONREAD, _FIONBIO, _FIONCLEX, _FIOCLEX = 0x5401, 0x541B, 0x5421, 0x5450, 0x5451


def _limited(pid: int) -> list[tuple[str, list[Any]]]:
    """Calls allowed with some arguments only: (name, seccomp argument checks)."""
    s = seccomp
    return [
        # threads, not processes
        ("clone", [s.Arg(0, s.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD)]),
        # is it a terminal; (non-)blocking, close-on-exec, bytes waiting: nothing that
        # reaches a device driver
        *(("ioctl", [s.Arg(1, s.EQ, request)])
          for request in (_TCGETS, _FIONREAD, _FIONBIO, _FIONCLEX, _FIOCLEX)),
        # files by path: for reading only (its uid may read little); opening one to write
        # fails with EACCES (CPython caching a module's bytecode copes with that)
        ("openat", [s.Arg(2, s.MASKED_EQ, _WRITING, 0)]),
        # signals to its own threads only (abort)
        ("tgkill", [s.Arg(0, s.EQ, pid)]),
        # its own resource limits only (the memory-limit fallback)
        ("prlimit64", [s.Arg(0, s.EQ, 0)]),
    ]


def allowed_syscalls() -> set[str]:
    """Every system call name the filter lets through (some with argument checks)."""
    return {name for group in SYSCALLS.values() for name in group} | \
        {"clone", "ioctl", "openat", "tgkill", "prlimit64"}


# Guests' uids and gids, when the VMM is root: one per VM, from its random id, in a range
# that no distribution hands out (systemd leaves 0x70000000-0x7ffdffff unused), so a worker
# owns no host file and shares no uid with a user's process. Two VMs rarely share one;
# if they do, the filter still keeps either from signalling or tracing the other.
FIRST_GUEST_ID, GUEST_IDS = 0x7000_0000, 0x0FFE_0000


def guest_ids(vm_id: str) -> tuple[int, int] | None:
    """The (uid, gid) a VM's worker runs as; None when the VMM cannot switch (not root)."""
    if os.geteuid() != 0:
        return None
    n = FIRST_GUEST_ID + int(vm_id, 16) % GUEST_IDS
    return n, n


# -- the steps, in order --------------------------------------------------------------------

def confine(cgroup_procs: Iterable[str] = (), ids: tuple[int, int] | None = None) -> list[str]:
    """Confine the calling process (a worker, before any guest input); returns warnings.

    ``cgroup_procs``: the ``cgroup.procs`` files of the VM's cgroups to join; ``ids``:
    the (uid, gid) to run as, when the VMM is root.
    """
    CACHE.prepare_confinement()
    for procs in cgroup_procs:
        with open(procs, "w") as f:
            f.write("0")  # 0: the writer itself
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    warnings = _drop_privileges(ids)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    return warnings + _load_filter()


_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAP_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg: int = 0) -> None:
    zero = ctypes.c_ulong(0)
    if _libc.prctl(option, ctypes.c_ulong(arg), zero, zero, zero) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


def _drop_privileges(ids: tuple[int, int] | None) -> list[str]:
    if os.geteuid() == 0:  # only a privileged process may shrink the bounding set
        with open("/proc/sys/kernel/cap_last_cap") as f:
            for cap in range(int(f.read()) + 1):
                _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    warnings = []
    if ids is not None:
        uid, gid = ids
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as err:  # root of a user namespace that does not map the ids
            if err.errno not in (errno.EINVAL, errno.EPERM):
                raise
            warnings.append(f"the worker keeps uid {os.getuid()} (without capabilities): "
                            f"cannot take uid {uid} here ({err.strerror})")
    none = (_CapData * 2)()  # version 3 takes two 32-bit halves of each set
    if _libc.capset(ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), none) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"capset: {os.strerror(code)}")
    return warnings


def _load_filter() -> list[str]:
    if seccomp is None:
        return [SECCOMP_MISSING]
    rules = seccomp.SyscallFilter(seccomp.KILL_PROCESS)
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for group in SYSCALLS.values():
        for name in group:
            rules.add_rule(seccomp.ALLOW, name)
    for name, args in _limited(os.getpid()):
        rules.add_rule(seccomp.ALLOW, name, *args)
    for mask, value in ((os.O_ACCMODE, os.O_WRONLY), (os.O_ACCMODE, os.O_RDWR),
                        (os.O_ACCMODE, os.O_ACCMODE), (os.O_CREAT, os.O_CREAT),
                        (os.O_TRUNC, os.O_TRUNC)):
        rules.add_rule(seccomp.ERRNO(errno.EACCES), "openat",
                       seccomp.Arg(2, seccomp.MASKED_EQ, mask, value))
    # glibc makes threads with clone3 when it can, whose flags the filter cannot see;
    # told it is missing, glibc falls back to clone, whose flags it can.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    try:
        rules.load()
    except OSError as err:
        return [f"seccomp filter not loaded ({err}): the worker runs unfiltered"]
    return []


# -- the VMM's side ---------------------------------------------------------------------------

def status(pid: int) -> dict[str, Any]:
    """What the kernel says about a worker's confinement (``/proc/PID/status``)."""
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    except OSError:
        return {}
    return {"uid": int(fields["Uid"].split()[1]), "gid": int(fields["Gid"].split()[1]),
            "capabilities": fields["CapEff"], "no_new_privs": fields["NoNewPrivs"] == "1",
            "seccomp": {"0": "off", "1": "strict", "2": "filter"}[fields["Seccomp"]]}


def violation(pid: int) -> str:
    """Why a worker died of SIGSYS: the seccomp filter, and the call if the kernel logged
    it (its audit record, in the kernel log the VMM may read when it is root)."""
    return logged_violation(pid) or \
        "killed by signal SIGSYS: the seccomp filter refused a system call"


def logged_violation(pid: int) -> str | None:
    """The seccomp filter's killing of ``pid``, if the kernel logged one: how a VMM that
    is not a worker's parent (and so never learns its exit status) can still tell."""
    call = _logged_syscall(pid)
    if call is None:
        return None
    name = ""
    if seccomp is not None:
        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, call).decode()
    return f"killed by the seccomp filter (syscall {call}{', ' + name if name else ''})"


_SECCOMP_RECORD = re.compile(rb"type=1326 .* pid=(\d+) .* syscall=(\d+)")


def _logged_syscall(pid: int) -> int | None:
    """The system call of the last seccomp audit record of ``pid`` in the kernel log."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    call = None
    try:
        while True:
            try:
                record = os.read(fd, 8192)  # one record per read
            except BlockingIOError:
                break
            except OSError as err:  # EPIPE: records overwritten while reading; go on
                if err.errno != errno.EPIPE:
                    break
                continue
            found = _SECCOMP_RECORD.search(record)
            if found and int(found.group(1)) == pid:
                call = int(found.group(2))
    finally:
        os.close(fd)
    return call

