"""Signals of the process VM: dispositions, the mask, delivery and the riscv64 signal frame.

Guest dispositions are mirrored onto the host process, so a signal the program
leaves at its default action does exactly what it would do to a native process
(SIGINT, SIGPIPE and SIGTERM kill it, SIGTSTP stops it) without the emulator's
involvement, and an ignored signal is ignored by the host too. A signal with a guest
handler gets a host handler that only records it: Python writes its number to the
wakeup pipe, and the process VM reads that pipe between instruction slices and
after system calls, then builds the kernel's ``rt_sigframe`` (siginfo + ucontext)
on the guest stack and enters the handler with ``ra`` at a ``rt_sigreturn``
trampoline. What the guest blocks and leaves at the default action is blocked on
the host too, so it stays pending in the host kernel until the guest unblocks it.

Synchronous faults (SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGFPE) come from the hart,
never from the host; their host dispositions are left alone.
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
from dataclasses import dataclass, field

from popek.cpu.csr import FCSR
from popek.user import structs
from popek.user.address_space import AddressSpace, GuestFault
from popek.user.control import Terminated

# Signal numbers (asm-generic/signal.h); real-time signals are 32..64.
GUEST_SIGNALS: dict[str, int] = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
    "SIGBUS": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12,
    "SIGPIPE": 13, "SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16, "SIGCHLD": 17, "SIGCONT": 18,
    "SIGSTOP": 19, "SIGTSTP": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24,
    "SIGXFSZ": 25, "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGIO": 29, "SIGPWR": 30,
    "SIGSYS": 31,
}
SIGNAL_NAMES = {number: name for name, number in GUEST_SIGNALS.items()}
NSIG = 64
SIGILL, SIGTRAP, SIGBUS, SIGFPE = 4, 5, 7, 8
SIGKILL, SIGSEGV, SIGPIPE, SIGCHLD, SIGSTOP = 9, 11, 13, 17, 19
SYNCHRONOUS = frozenset({SIGILL, SIGTRAP, SIGBUS, SIGFPE, SIGSEGV})
UNBLOCKABLE = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1))
IGNORED_BY_DEFAULT = frozenset({SIGCHLD, 18, 23, 28})  # CHLD, CONT, URG, WINCH
STOPPED_BY_DEFAULT = frozenset({SIGSTOP, 20, 21, 22})  # STOP, TSTP, TTIN, TTOU

SIG_DFL, SIG_IGN = 0, 1
SIG_BLOCK, SIG_UNBLOCK, SIG_SETMASK = 0, 1, 2
SA_ONSTACK = 0x08000000
SA_RESTART = 0x10000000
SA_NODEFER = 0x40000000
SA_RESETHAND = 0x80000000
SS_ONSTACK, SS_DISABLE = 1, 2

# si_code values.
SI_USER = 0
SI_TKILL = -6
SEGV_MAPERR, SEGV_ACCERR = 1, 2
ILL_ILLOPC = 1
BUS_ADRALN = 1
TRAP_BRKPT = 1

# The signal return trampoline: li a7, 139 (rt_sigreturn); ecall.
SIGRETURN_CODE = (0x08B00893).to_bytes(4, "little") + (0x00000073).to_bytes(4, "little")
WAKEUP_FD_MIN = 1000  # keep the emulator's own descriptors out of the guest's way


def bit(sig: int) -> int:
    return 1 << (sig - 1)


def host_signal(sig: int) -> int | None:
    """The host's number for guest signal ``sig`` (same name), if the host has it."""
    name = SIGNAL_NAMES.get(sig)
    host = getattr(signal, name, None) if name else None
    return int(host) if host is not None else None


_GUEST_BY_HOST = {h: g for g in SIGNAL_NAMES if (h := host_signal(g)) is not None}


@dataclass
class ThreadSignals:
    """What Linux keeps per thread: the mask, signals sent to the thread, the alternate
    stack, and rt_sigsuspend's caller mask (saved in the next frame, else restored)."""

    mask: int = 0
    pending: dict[int, bytes] = field(default_factory=dict)  # signal -> siginfo
    altstack: tuple[int, int, int] = (0, SS_DISABLE, 0)  # ss_sp, ss_flags, ss_size
    restore_mask: int | None = None


@dataclass
class SignalFd:
    """A signalfd: the guest reads its pipe's end; popek keeps one byte in the pipe while a
    signal of ``mask`` is pending, so poll and epoll see it readable."""

    mask: int
    write_end: int
    ready: bool = False


@dataclass
class SigAction:
    handler: int = SIG_DFL
    flags: int = 0
    mask: int = 0


def siginfo(sig: int, code: int, extra: bytes = b"") -> bytes:
    head = structs.SIGINFO_HEAD.pack(sig, 0, code) + extra
    return head + bytes(structs.SIGINFO_SIZE - len(head))


def terminate(sig: int) -> None:
    """Die of ``sig`` the way the host would kill a native process (never returns).

    Like qemu, without a core dump of the emulator.
    """
    host = host_signal(sig)
    if host is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(host, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {host})
        os.kill(os.getpid(), host)
    raise Terminated(sig)


class Signals:
    """The signal state of the process and its mirror on the host.

    Dispositions and signals sent to the process are shared; the mask, the alternate
    stack and thread-directed signals are the running thread's (``thread``, which the
    scheduler switches), and ``threads`` holds every live thread's.
    """

    def __init__(self, hart, space: AddressSpace, trampoline: int) -> None:
        self.hart = hart
        self.space = space
        self.trampoline = trampoline
        self.actions = [SigAction() for _ in range(NSIG + 1)]
        self.pending: dict[int, bytes] = {}  # sent to the process: signal -> siginfo
        self.thread = ThreadSignals()
        self.threads = [self.thread]
        self.wake_r = self.wake_w = -1
        self.signalfds: dict[int, SignalFd] = {}  # by the guest's descriptor
        # Undo what Python changed at startup: SIGINT raises KeyboardInterrupt unless it
        # was ignored, SIGPIPE and SIGXFSZ are ignored.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        for sig in SIGNAL_NAMES:
            host = host_signal(sig)
            if host is not None and sig not in SYNCHRONOUS and \
                    signal.getsignal(host) is signal.SIG_IGN:
                self.actions[sig].handler = SIG_IGN
        for host in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            if host in _GUEST_BY_HOST:
                self.thread.mask |= bit(_GUEST_BY_HOST[host])
        self.open_wakeup_pipe()
        self._set_host_action(SIGCHLD)

    # -- the running thread's state ----------------------------------------------------
    @property
    def mask(self) -> int:
        return self.thread.mask

    @property
    def altstack(self) -> tuple[int, int, int]:
        return self.thread.altstack

    @altstack.setter
    def altstack(self, value: tuple[int, int, int]) -> None:
        self.thread.altstack = value

    @property
    def restore_mask(self) -> int | None:
        return self.thread.restore_mask

    @restore_mask.setter
    def restore_mask(self, value: int | None) -> None:
        self.thread.restore_mask = value

    # -- the host side ------------------------------------------------------------------
    def open_wakeup_pipe(self) -> None:
        """A fresh pipe the host's signal handlers write to (again in a forked child)."""
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, WAKEUP_FD_MIN)
        self.wake_w = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, WAKEUP_FD_MIN)
        os.close(r)
        os.close(w)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    @property
    def internal_fds(self) -> frozenset[int]:
        return frozenset({self.wake_r, self.wake_w,
                          *(sfd.write_end for sfd in self.signalfds.values())})

    # -- signalfd -----------------------------------------------------------------------
    @property
    def signalfd_mask(self) -> int:
        mask = 0
        for sfd in self.signalfds.values():
            mask |= sfd.mask
        return mask

    def open_signalfd(self, mask: int, host_flags: int) -> int:
        """A new signalfd for the signals of ``mask``; returns the guest's descriptor."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        write_end = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, WAKEUP_FD_MIN)
        os.close(w)
        os.set_blocking(r, not host_flags & os.O_NONBLOCK)
        os.set_inheritable(r, not host_flags & os.O_CLOEXEC)
        self.signalfds[r] = SignalFd(0, write_end)
        self.set_signalfd_mask(r, mask)
        return r

    def set_signalfd_mask(self, fd: int, mask: int) -> None:
        self.signalfds[fd].mask = mask & ~UNBLOCKABLE
        for sig in SIGNAL_NAMES:  # they must reach the wakeup pipe even if left default
            self._set_host_action(sig)
        self._set_host_mask()
        self.refresh_signalfds()

    def forget_signalfd(self, fd: int) -> None:
        sfd = self.signalfds.pop(fd, None)
        if sfd is not None:
            os.close(sfd.write_end)
            for sig in SIGNAL_NAMES:
                self._set_host_action(sig)
            self._set_host_mask()

    def refresh_signalfds(self) -> None:
        """Make each signalfd readable exactly while a signal of its mask is pending."""
        for fd, sfd in self.signalfds.items():
            ready = self.pending_in(sfd.mask)
            if ready and not sfd.ready:
                os.write(sfd.write_end, b"!")
            elif sfd.ready and not ready:
                try:
                    os.read(fd, 1)
                except BlockingIOError:
                    pass
            sfd.ready = ready

    def _set_host_action(self, sig: int) -> None:
        host = host_signal(sig)
        if host is None or sig in SYNCHRONOUS or sig in (SIGKILL, SIGSTOP):
            return
        handler = self.actions[sig].handler
        if handler == SIG_IGN:
            signal.signal(host, signal.SIG_IGN)
        elif handler == SIG_DFL and sig != SIGCHLD and not self.signalfd_mask & bit(sig):
            signal.signal(host, signal.SIG_DFL)
        else:  # a guest handler, or SIGCHLD, which wakes up a blocking wait4
            signal.signal(host, _record)

    def _set_host_mask(self) -> None:
        """Block on the host what the guest blocks and leaves to the default action.

        Signals with a recording handler stay unblocked: the guest mask is applied
        when they are delivered, and SIGCHLD keeps waking up a blocking wait4. With
        several threads, only what every thread blocks is blocked on the host.
        """
        blocked = -1
        for thread in self.threads:
            blocked &= thread.mask
            if not blocked:
                break
        hosts = set()
        for sig in SIGNAL_NAMES:
            host = host_signal(sig)
            if (host is not None and blocked & bit(sig) and sig not in SYNCHRONOUS
                    and sig != SIGCHLD and self.actions[sig].handler == SIG_DFL
                    and not self.signalfd_mask & bit(sig)):
                hosts.add(host)
        signal.pthread_sigmask(signal.SIG_SETMASK, hosts)

    def prepare_host_exec(self) -> None:
        """Before the host's execve: the new program inherits the guest's whole mask."""
        hosts = {h for s in SIGNAL_NAMES if self.mask & bit(s) and (h := host_signal(s))}
        signal.pthread_sigmask(signal.SIG_SETMASK, hosts)

    def poll_host(self) -> bool:
        """Move signals the host received into the guest's pending set; whether any came."""
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return False
        wanted = self.signalfd_mask
        for host in data:
            sig = _GUEST_BY_HOST.get(host)
            if sig is not None and (self.actions[sig].handler not in (SIG_DFL, SIG_IGN)
                                    or wanted & bit(sig)):
                self.pending.setdefault(sig, siginfo(sig, SI_USER))
        if self.signalfds:
            self.refresh_signalfds()
        return bool(data)

    def pending_in(self, wanted: int) -> bool:
        """Whether a signal of the set ``wanted`` is pending for the running thread."""
        return any(wanted & bit(sig) for sig in (*self.thread.pending, *self.pending))

    def take(self, wanted: int) -> tuple[int, bytes] | None:
        """Dequeue a pending signal of the set ``wanted`` (sigwait), the running thread's
        first; also one the host holds pending because the guest blocks it."""
        self.poll_host()
        for pending in (self.thread.pending, self.pending):
            for sig in sorted(pending):
                if wanted & bit(sig):
                    info = pending.pop(sig)
                    if self.signalfds:
                        self.refresh_signalfds()
                    return sig, info
        hosts = {h for s in SIGNAL_NAMES if wanted & bit(s) and (h := host_signal(s))}
        if hosts & signal.sigpending():
            got = signal.sigtimedwait(hosts, 0)
            if got is not None:
                sig = _GUEST_BY_HOST[got.si_signo]
                return sig, siginfo(sig, got.si_code,
                                    structs.SIGINFO_KILL.pack(got.si_pid, got.si_uid))
        return None

    # -- the guest's view ---------------------------------------------------------------
    def set_action(self, sig: int, action: SigAction) -> None:
        self.actions[sig] = action
        if action.handler == SIG_IGN or (action.handler == SIG_DFL
                                         and sig in IGNORED_BY_DEFAULT):
            self.pending.pop(sig, None)
            for thread in self.threads:
                thread.pending.pop(sig, None)
        self._set_host_action(sig)
        self._set_host_mask()

    def set_threads(self, threads: list[ThreadSignals]) -> None:
        """The process's threads changed (clone, exit, fork, execve)."""
        self.threads = threads
        self._set_host_mask()

    def set_mask(self, mask: int) -> None:
        self.thread.mask = mask & ~UNBLOCKABLE & ((1 << NSIG) - 1)
        self._set_host_mask()

    def reset_for_exec(self) -> None:
        """execve: handlers revert to the default action; ignored signals stay ignored."""
        for sig in range(1, NSIG + 1):
            if self.actions[sig].handler not in (SIG_DFL, SIG_IGN):
                self.set_action(sig, SigAction())
        self.altstack = (0, SS_DISABLE, 0)

    def raise_signal(self, sig: int, info: bytes, thread: ThreadSignals | None = None) -> None:
        """A signal sent to this process by itself (kill, a broken pipe), or to one of
        its threads (tgkill)."""
        action = self.actions[sig]
        if action.handler == SIG_IGN:
            return
        if action.handler == SIG_DFL:
            if sig in IGNORED_BY_DEFAULT:
                return
            if not (thread or self.thread).mask & bit(sig):
                self._default_action(sig)
                return
        (self.pending if thread is None else thread.pending).setdefault(sig, info)
        if self.signalfds:
            self.refresh_signalfds()

    def deliverable(self, thread: ThreadSignals | None = None) -> int | None:
        """The signal ``thread`` (the running one by default) would take next, if any."""
        thread = thread or self.thread
        if not thread.pending and not self.pending:
            return None
        for pending in (thread.pending, self.pending):
            for sig in sorted(pending):
                if not thread.mask & bit(sig):
                    return sig
        return None

    def deliver_pending(self, pc: int) -> int:
        """Enter the handler of a deliverable pending signal; returns where to resume."""
        self.poll_host()
        thread = self.thread
        sig = self.deliverable() if self.pending or thread.pending else None
        if sig is not None:
            info = thread.pending.pop(sig, None) or self.pending.pop(sig)
            if self.signalfds:
                self.refresh_signalfds()
            handler = self.actions[sig].handler
            if handler == SIG_DFL:
                self._default_action(sig)
            elif handler != SIG_IGN:
                pc = self._enter_handler(sig, info, pc)
        if self.restore_mask is not None:
            self.set_mask(self.restore_mask)
            self.restore_mask = None
        return pc

    def deliver_fault(self, sig: int, info: bytes, pc: int) -> int:
        """A synchronous fault at ``pc``: the handler runs, or the process dies of it."""
        action = self.actions[sig]
        if action.handler in (SIG_DFL, SIG_IGN) or self.mask & bit(sig):
            terminate(sig)
        return self._enter_handler(sig, info, pc)

    def _default_action(self, sig: int) -> None:
        if sig in IGNORED_BY_DEFAULT:
            return
        if sig in STOPPED_BY_DEFAULT:
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        terminate(sig)

    # -- the signal frame ---------------------------------------------------------------
    def _on_altstack(self, sp: int) -> bool:
        ss_sp, flags, size = self.altstack
        return not flags & SS_DISABLE and ss_sp < sp <= ss_sp + size

    def altstack_flags(self, sp: int) -> int:
        if self.altstack[1] & SS_DISABLE:
            return SS_DISABLE
        return SS_ONSTACK if self._on_altstack(sp) else 0

    def _enter_handler(self, sig: int, info: bytes, pc: int) -> int:
        hart = self.hart
        x = hart.x
        action = self.actions[sig]
        sp = x[2]
        ss_sp, ss_flags, ss_size = self.altstack
        if action.flags & SA_ONSTACK and not ss_flags & SS_DISABLE and not self._on_altstack(sp):
            sp = ss_sp + ss_size
        frame = (sp - structs.RT_SIGFRAME_SIZE) & ~15
        uc = bytearray(structs.UC_SIZE)
        structs.STACK_T.pack_into(uc, structs.UC_STACK, ss_sp, ss_flags, ss_size)
        saved_mask = self.mask if self.restore_mask is None else self.restore_mask
        self.restore_mask = None
        structs.U64.pack_into(uc, structs.UC_SIGMASK, saved_mask)
        structs.MC_GREGS.pack_into(uc, structs.UC_MCONTEXT, pc, *x[1:32])
        structs.MC_FPREGS.pack_into(uc, structs.UC_MCONTEXT + structs.MC_FPREGS_OFFSET,
                                    *hart.f, hart.csr[FCSR])
        try:
            self.space.write(frame, info + bytes(uc))
        except GuestFault:
            terminate(SIGSEGV)  # no room for the frame: the kernel forces SIGSEGV too
        new_mask = self.mask | action.mask | (0 if action.flags & SA_NODEFER else bit(sig))
        if action.flags & SA_RESETHAND:
            self.set_action(sig, SigAction())
        self.set_mask(new_mask)
        x[1] = self.trampoline
        x[2] = frame
        x[10] = sig
        x[11] = frame
        x[12] = frame + structs.SIGINFO_SIZE
        return action.handler

    def sigreturn(self) -> int:
        """Restore the state saved in the frame at sp; returns the interrupted pc."""
        hart = self.hart
        uc = hart.x[2] + structs.SIGINFO_SIZE
        data = self.space.read(uc, structs.UC_SIZE)
        (mask,) = structs.U64.unpack_from(data, structs.UC_SIGMASK)
        regs = structs.MC_GREGS.unpack_from(data, structs.UC_MCONTEXT)
        fp = structs.MC_FPREGS.unpack_from(data, structs.UC_MCONTEXT + structs.MC_FPREGS_OFFSET)
        hart.x[1:32] = type(hart.x)("Q", regs[1:])
        hart.f[0:32] = type(hart.f)("Q", fp[:32])
        hart.csr[FCSR] = fp[32] & 0xFF
        self.set_mask(mask)
        return regs[0]


def _record(signum: int, frame: object) -> None:
    """Host handler for signals the guest handles: the wakeup pipe has recorded it."""
