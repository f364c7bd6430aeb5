"""The process VM proper: one guest process on the shared hart.

A :class:`Process` owns the sparse RAM that is its whole address space, a hart in
U-mode whose translation is the address space's mapping check and whose traps come
here: ``ecall`` is a system call, every other exception becomes the signal Linux
would send. fork is the host's fork (the whole emulator is the process's state, so
copying it is exactly right) and execve replaces the image in place.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

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
from popek.user.control import ProcessExit, Terminated
from popek.user.fileflags import FD_CLOEXEC
from popek.user.linux_errno import Errno
from popek.user.strace import Strace
from popek.user.syscalls import dispatch
from popek.user.syscalls.files import DirStream

TRAMPOLINE = USER_TOP - PAGE_SIZE  # the last page holds the signal return code
STACK_TOP = TRAMPOLINE
STACK_SIZE = 8 << 20
MMAP_TOP = STACK_TOP - STACK_SIZE - (128 << 20)  # mmap grows down from below the stack gap
ARG_MAX = STACK_SIZE // 4  # Linux allows arguments and environment a quarter of the stack
SLICE = 100_000  # instructions between looks at host signals
MSTATUS_FS_DIRTY = 3 << 13
COUNTERS = 0b111  # cycle, time, instret readable from U-mode
LIBRARY_PREFIXES = (b"/lib/", b"/lib64/", b"/usr/lib/", b"/usr/lib64/")
SELF_EXE = (b"/proc/self/exe", b"/proc/thread-self/exe")

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


@dataclass(frozen=True)
class ExecOptions:
    sysroot: str | None = None
    strace: bool = False
    engine: str | None = None  # execution tier; None: the default tier


class Process:
    """One single-threaded Linux process running on the process VM."""

    def __init__(self, options: ExecOptions) -> None:
        self.options = options
        self.mem = PhysicalMemory(base=0, size=USER_TOP, sparse=True)
        self.space = AddressSpace(self.mem, MMAP_TOP)
        self.hart = Hart(self.mem, translate=self.space.translate, engine=options.engine)
        self.space.on_revoke = self.hart.mmu.flush
        self.hart.on_trap = self.on_trap
        self.signals = signals.Signals(self.hart, self.space, TRAMPOLINE)
        self.strace = Strace(self) if options.strace else None
        self.exe = ""  # host path of the running program (/proc/self/exe)
        self.comm = b""  # its name for prctl(PR_GET_NAME)
        self.dynamic = False  # has an ELF interpreter: library paths go to the sysroot
        self.brk_start = self.brk = 0
        self.rlimits: dict[int, tuple[int, int]] = {}  # limits kept for the guest only
        self.vfork_done_fd = -1  # a vfork child's end of the pipe its parent waits on
        self.dir_streams: dict[int, DirStream] = {}  # getdents64 state by descriptor

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
        if image.interpreter:
            interp = elf_loader.read_image(
                elf_loader.resolve_interpreter(image.interpreter, self.options.sysroot))
        self.space.clear()
        self.hart.engine.flush()
        loaded = elf_loader.load(self.space, image, interp)
        self.space.map(STACK_TOP - STACK_SIZE, STACK_SIZE, PROT_READ | PROT_WRITE)
        self.space.map(TRAMPOLINE, PAGE_SIZE, PROT_READ | PROT_EXEC)
        self.mem.write(TRAMPOLINE, signals.SIGRETURN_CODE)
        sp = initial_stack.build(self.space, STACK_TOP, loaded, argv, envp,
                                 execfn if execfn is not None else os.fsencode(path))
        self.brk_start = self.brk = loaded.brk
        self.exe = os.path.abspath(path)
        self.comm = os.fsencode(os.path.basename(path))[:15]
        self.dynamic = interp is not None
        self._reset_hart(loaded.entry, sp)
        self.signals.reset_for_exec()
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
                    self.dir_streams.pop(fd, None)
            except OSError:
                pass

    @property
    def internal_fds(self) -> frozenset[int]:
        """The emulator's own descriptors, which the guest may not touch."""
        return self.signals.internal_fds | {self.vfork_done_fd}

    @staticmethod
    def open_fds() -> list[int]:
        try:
            return sorted(int(name) for name in os.listdir("/proc/self/fd"))
        except OSError:
            return list(range(os.sysconf("SC_OPEN_MAX")))

    @staticmethod
    def is_self_exe(path: bytes) -> bool:
        return path in SELF_EXE or path == b"/proc/%d/exe" % os.getpid()

    def host_path(self, path: bytes) -> bytes:
        """Where a guest path is on the host: the guest sees the host's files, except
        its own /proc/self/exe and, for dynamic programs, libraries from the sysroot."""
        if self.is_self_exe(path):
            return os.fsencode(self.exe)
        sysroot = self.options.sysroot
        if self.dynamic and sysroot and path.startswith(LIBRARY_PREFIXES):
            candidate = os.fsencode(sysroot) + path
            if os.path.lexists(candidate):
                return candidate
        return path

    # -- running ------------------------------------------------------------------------
    def run(self) -> int:
        """Run until the process exits; returns its exit status (128 + signal if killed)."""
        try:
            while True:
                self.run_slice()
        except ProcessExit as e:
            return e.status
        except Terminated as e:
            return 128 + e.sig

    def run_slice(self, budget: int = SLICE, step: bool = False) -> None:
        """Run about ``budget`` instructions (``step``: exactly one, as a debugger steps),
        then deliver pending signals, unless a debugger stopped the hart at an instruction
        (they wait until it runs on); raises ProcessExit or Terminated when it ends."""
        hart = self.hart
        if step:
            hart.step(interrupts=False)
        else:
            hart.run(budget)
        if hart.engine.debug_stop is None:
            hart.pc = self.signals.deliver_pending(hart.pc)

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
