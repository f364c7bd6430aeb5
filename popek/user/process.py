"""The process VM proper: one guest process on the shared hart.

A :class:`Process` owns the sparse RAM that is its whole address space, a hart in
U-mode whose translation is the address space's mapping check and whose traps come
here: ``ecall`` is a system call, every other exception becomes the signal Linux
would send. fork is the host's fork (the whole emulator is the process's state, so
copying it is exactly right) and execve replaces the image in place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from popek.cpu import causes
from popek.cpu.csr import ENVCFG_CBZE, FCSR, MCOUNTEREN, MENVCFG, MSTATUS, SCOUNTEREN, SENVCFG
from popek.cpu.hart import Hart
from popek.cpu.physmem import PAGE_SIZE, PhysicalMemory
from popek.cpu.state import PRIV_U
from popek.user import elf_loader, initial_stack, signals, structs
from popek.user.address_space import (
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    USER_TOP,
    AddressSpace,
)
from popek.user.container.namespace import NoPidLeft
from popek.user.control import ProcessExit, Terminated
from popek.user.fileflags import FD_CLOEXEC
from popek.user.linux_errno import Errno
from popek.user.strace import Strace
from popek.user.syscalls import dispatch
from popek.user.syscalls.files import DirStream
from popek.user.threads import SLICE, Scheduler

if TYPE_CHECKING:  # only containers need the module, and sockets with it
    from popek.user.container.isolation import Container

TRAMPOLINE = USER_TOP - PAGE_SIZE  # the last page holds the signal return code
STACK_TOP = TRAMPOLINE
STACK_SIZE = 8 << 20
MMAP_TOP = STACK_TOP - STACK_SIZE - (128 << 20)  # mmap grows down from below the stack gap
ARG_MAX = STACK_SIZE // 4  # Linux allows arguments and environment a quarter of the stack
MSTATUS_FS_DIRTY = 3 << 13
COUNTERS = 0b111  # cycle, time, instret readable from U-mode
LIBRARY_PREFIXES = (b"/lib/", b"/lib64/", b"/usr/lib/", b"/usr/lib64/")
SELF_EXE = (b"/proc/self/exe", b"/proc/thread-self/exe")
STAT_EXTRA_FIELDS = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns",
                     "st_ctime_ns", "st_blksize", "st_blocks", "st_rdev")

# Exceptions other than ecall, as the signal and si_code Linux sends for them.
FAULT_SIGNALS: dict[int, tuple[int, int]] = {
    causes.INSN_MISALIGNED: (signals.SIGBUS, signals.BUS_ADRALN),
    causes.LOAD_MISALIGNED: (signals.SIGBUS, signals.BUS_ADRALN),
    causes.STORE_MISALIGNED: (signals.SIGBUS, signals.BUS_ADRALN),
    causes.ILLEGAL_INSN: (signals.SIGILL, signals.ILL_ILLOPC),
    causes.BREAKPOINT: (signals.SIGTRAP, signals.TRAP_BRKPT),
}
PAGE_FAULTS = frozenset({causes.INSN_PAGE_FAULT, causes.LOAD_PAGE_FAULT,
                         causes.STORE_PAGE_FAULT, causes.INSN_ACCESS, causes.LOAD_ACCESS,
                         causes.STORE_ACCESS})


class ExecOptions(NamedTuple):  # (not a frozen dataclass: ~0.5 ms more of every start)
    sysroot: str | None = None
    strace: bool = False
    engine: str | None = None  # execution tier; None: the default tier
    container: Container | None = None  # None: the process sees the host


class Process:
    """One Linux process running on the process VM; its threads are the scheduler's."""

    def __init__(self, options: ExecOptions) -> None:
        self.options = options
        self.mem = PhysicalMemory(base=0, size=USER_TOP, sparse=True)
        self.space = AddressSpace(self.mem, MMAP_TOP)
        self.hart = Hart(self.mem, translate=self.space.translate, engine=options.engine)
        self.space.on_revoke = self.hart.mmu.flush
        self.hart.on_trap = self.on_trap
        self.signals = signals.Signals(self.hart, self.space, TRAMPOLINE)
        self.scheduler = Scheduler(self)
        # Called before each slice while a debugger is attached (popek exec --gdb).
        self.before_slice: Callable[[], None] | None = None
        self.strace = Strace(self) if options.strace else None
        self.exe = ""  # host path of the running program (/proc/self/exe)
        self.dynamic = False  # has an ELF interpreter: library paths go to the sysroot
        self.brk_start = self.brk = 0
        self.rlimits: dict[int, tuple[int, int]] = {}  # limits kept for the guest only
        self.vfork_done_fd = -1  # a vfork child's end of the pipe its parent waits on
        self.dir_streams: dict[int, DirStream] = {}  # getdents64 state by descriptor
        self.syscall_pc = 0  # the ecall of the system call being made

    # -- images -------------------------------------------------------------------------
    def execve(self, path: str, argv: list[bytes], envp: list[bytes], *,
               execfn: bytes | None = None, image: elf_loader.ElfImage | None = None) -> None:
        """Replace the process image with the program at host ``path``.

        ``execfn`` is the name the program was executed by (AT_EXECFN). Raises
        ExecError before touching the current image if the program cannot run.
        """
        image = image or elf_loader.read_image(path)
        strings = sum(len(s) + 9 for s in (*argv, *envp))  # each with its NUL and pointer
        if strings > ARG_MAX:
            raise elf_loader.ExecError(f"{path}: argument list too long", Errno.E2BIG)
        interp = None
        if image.interpreter and self.options.container:
            interp = elf_loader.read_image(os.fsdecode(self._container_path(
                os.fsencode(image.interpreter))))
        elif image.interpreter:
            interp = elf_loader.read_image(
                elf_loader.resolve_interpreter(image.interpreter, self.options.sysroot))
        self.space.clear()
        self.hart.engine.flush()
        loaded = elf_loader.load(self.space, image, interp)
        self.space.map(STACK_TOP - STACK_SIZE, STACK_SIZE, PROT_READ | PROT_WRITE)
        self.space.map(TRAMPOLINE, PAGE_SIZE, PROT_READ | PROT_EXEC)
        self.mem.write(TRAMPOLINE, signals.SIGRETURN_CODE)
        uid, gid = self.guest_ids(os.getuid(), os.getgid())
        euid, egid = self.guest_ids(os.geteuid(), os.getegid())
        sp = initial_stack.build(self.space, STACK_TOP, loaded, argv, envp,
                                 execfn if execfn is not None else os.fsencode(path),
                                 (uid, euid, gid, egid))
        self.brk_start = self.brk = loaded.brk
        self.exe = os.path.realpath(path) if self.options.container else os.path.abspath(path)
        self.dynamic = interp is not None
        self._reset_hart(loaded.entry, sp)
        self.signals.reset_for_exec()
        self.scheduler.keep_only_current(self.pid)
        self.set_comm(os.path.basename(execfn if execfn is not None else os.fsencode(path)))
        self.close_on_exec()

    def _reset_hart(self, entry: int, sp: int) -> None:
        hart = self.hart
        for i in range(len(hart.x)):
            hart.x[i] = 0
        for i in range(len(hart.f)):
            hart.f[i] = 0
        hart.x[2] = sp
        hart.pc = entry
        hart.priv = PRIV_U
        hart.csr[MSTATUS] |= MSTATUS_FS_DIRTY
        hart.csr[MCOUNTEREN] = hart.csr[SCOUNTEREN] = COUNTERS
        # User programs may zero cache blocks (cbo.zero), as Linux lets them where the
        # hart has Zicboz; clean, flush and invalidate stay the kernel's.
        hart.csr[MENVCFG] = hart.csr[SENVCFG] = ENVCFG_CBZE
        hart.csr[FCSR] = 0
        hart.mmu.flush()

    def close_on_exec(self) -> None:
        """Close the guest's O_CLOEXEC descriptors, as the kernel does on execve."""
        if self.vfork_done_fd >= 0:
            os.close(self.vfork_done_fd)  # releases the waiting parent
            self.vfork_done_fd = -1
        internal = self.internal_fds
        for fd in self.open_fds():
            if fd in internal:
                continue
            try:
                if fcntl.fcntl(fd, fcntl.F_GETFD) & FD_CLOEXEC:
                    os.close(fd)
                    self.forget_fd(fd)
            except OSError:
                pass

    def forget_fd(self, fd: int) -> None:
        """What popek kept about guest descriptor ``fd``, which is closed or reused."""
        self.dir_streams.pop(fd, None)
        self.signals.forget_signalfd(fd)

    @property
    def internal_fds(self) -> frozenset[int]:
        """The emulator's own descriptors, which the guest may not touch."""
        internal = self.signals.internal_fds | {self.vfork_done_fd}
        if self.options.container:
            internal |= frozenset(self.options.container.rootfs.directory_fds)
        return internal

    @staticmethod
    def open_fds() -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir("/proc/self/fd"))
        except OSError:
            return list(range(os.sysconf("SC_OPEN_MAX")))

    def is_self_exe(self, path: bytes) -> bool:
        return not self.options.container and \
            (path in SELF_EXE or path == b"/proc/%d/exe" % os.getpid())

    def host_path(self, path: bytes, base: bytes | None = None, *, follow: bool = True,
                  write: bool = False) -> bytes:
        """Where a guest path is on the host. In a container, it is resolved inside the
        container (relative to host directory ``base``, or the current directory; the
        last component's symlink followed if ``follow``; EROFS in a read-only mount if
        the call would ``write``). Otherwise the guest sees the host's files, except its
        own /proc/self/exe and, for dynamic programs, libraries from the sysroot."""
        if self.options.container:
            return self._container_path(path, base, follow=follow, write=write)
        if self.is_self_exe(path):
            return os.fsencode(self.exe)
        sysroot = self.options.sysroot
        if self.dynamic and sysroot and path.startswith(LIBRARY_PREFIXES):
            candidate = os.fsencode(sysroot) + path
            if os.path.lexists(candidate):
                return candidate
        return path

    def _container_path(self, path: bytes, base: bytes | None = None, *, follow: bool = True,
                        write: bool = False) -> bytes:
        return self.options.container.rootfs.resolve(path, base, follow=follow, write=write)

    def set_comm(self, name: bytes) -> None:
        """The running thread's name (prctl, /proc/N/stat); in a container, its other
        processes see it."""
        self.scheduler.current.comm = name[:15]
        if self.options.container:
            self.options.container.namespace.set_comm(name[:15])

    def end_of_slice(self) -> None:
        """Between time slices: a container's CPU cap sleeps off what all its processes
        overspent together."""
        cap = self.options.container.cpu_cap if self.options.container else None
        if cap is not None:
            delay = cap.delay()
            if delay:
                time.sleep(delay)
                cap.slept(delay)

    # -- identity (the host's, or the container's view of it) -------------------------------
    @property
    def pid(self) -> int:
        """This process's pid as the guest sees it."""
        container = self.options.container
        return container.namespace.self_pid() if container else os.getpid()

    def guest_pid(self, host_pid: int) -> int:
        container = self.options.container
        return container.namespace.to_guest(host_pid) if container else host_pid

    def guest_stat(self, st: os.stat_result) -> os.stat_result:
        """``st`` with the owner and group the guest sees."""
        container = self.options.container
        if not container:
            return st
        values = list(st)
        values[4], values[5] = container.uid_in(st.st_uid), container.gid_in(st.st_gid)
        extra = {name: getattr(st, name) for name in STAT_EXTRA_FIELDS if hasattr(st, name)}
        return os.stat_result(values, extra)

    def guest_ids(self, host_uid: int, host_gid: int) -> tuple[int, int]:
        container = self.options.container
        if not container:
            return host_uid, host_gid
        return container.uid_in(host_uid), container.gid_in(host_gid)

    def host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """The host ids a guest's chown names (-1: unchanged)."""
        container = self.options.container
        return (container.uid_out(uid), container.gid_out(gid)) if container else (uid, gid)

    def may_map(self, length: int) -> bool:
        """Whether ``length`` more bytes of accessible memory keep a container within its
        memory limit (every process's mappings count; PROT_NONE reservations do not)."""
        container = self.options.container
        if not container or container.namespace.memory_limit is None:
            return True
        mapped = sum(vma.end - vma.start for vma in self.space.vmas if vma.prot)
        return container.namespace.charge(mapped, length)

    def new_child(self, host_pid: int) -> int:
        """The pid the guest sees for a child it just forked."""
        container = self.options.container
        if not container:
            return host_pid
        try:
            return container.namespace.register(host_pid)
        except NoPidLeft:
            os.kill(host_pid, signal.SIGKILL)
            os.waitpid(host_pid, 0)
            raise OSError(errno.EAGAIN, "no pid left in the container") from None

    def reaped(self, host_pid: int) -> int:
        """A child's guest pid, given up now that it has been waited for."""
        guest = self.guest_pid(host_pid)
        if self.options.container:
            self.options.container.namespace.release(host_pid)
        return guest

    def host_kill_targets(self, pid: int) -> list[int]:
        """Host pids (or -pgids) that kill(``pid``) reaches: in a container, -1 means
        every other process of the container except its init, as in a PID namespace."""
        container = self.options.container
        if not container:
            return [pid]
        if pid == -1:
            init = container.namespace.to_host(1)
            return [h for h in container.namespace.members() if h not in (os.getpid(), init)]
        if pid < -1:
            return [-self.host_pid(-pid)]
        return [self.host_pid(pid)] if pid > 0 else [0]

    def host_pid(self, guest_pid: int) -> int:
        """The host pid of a guest pid (ESRCH if the container has no such process)."""
        container = self.options.container
        if not container:
            return guest_pid
        host = container.namespace.to_host(guest_pid)
        if host is None:
            raise OSError(errno.ESRCH, "no such process")
        return host

    # -- running ------------------------------------------------------------------------
    def run(self) -> int:
        """Run until the process exits; returns its exit status (128 + signal if killed)."""
        try:
            self.scheduler.run()
        except ProcessExit as e:
            return e.status
        except Terminated as e:
            return 128 + e.sig

    def run_slice(self, budget: int = SLICE, step: bool = False) -> None:
        """Deliver pending signals, unless a debugger holds the hart stopped at an
        instruction (they wait until it runs on), then run the current thread for about
        ``budget`` instructions (``step``: exactly one, as a debugger steps); raises
        ProcessExit or Terminated when the process ends."""
        hart = self.hart
        if hart.engine.debug_stop is None:
            hart.pc = self.signals.deliver_pending(hart.pc)
        if step:
            hart.step(interrupts=False)
        else:
            hart.run(budget)

    def on_trap(self, cause: int, tval: int, pc: int) -> int:
        if cause == causes.ECALL_U:
            return dispatch(self, pc)
        if cause in PAGE_FAULTS:
            sig = signals.SIGSEGV
            code = signals.SEGV_MAPERR if self.space.find(tval) is None else signals.SEGV_ACCERR
            addr = tval
        else:
            sig, code = FAULT_SIGNALS.get(cause, (signals.SIGILL, signals.ILL_ILLOPC))
            addr = tval if sig == signals.SIGBUS else pc
        info = signals.siginfo(sig, code, structs.SIGINFO_ADDR.pack(addr))
        return self.signals.deliver_fault(sig, info, pc)
