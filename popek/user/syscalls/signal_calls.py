"""Signal system calls: dispositions, the mask, the alternate stack, sigsuspend, sigreturn."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from popek.user import signals, structs
from popek.user.address_space import GuestFault
from popek.user.control import Resume
from popek.user.linux_errno import Errno, SyscallError
from popek.user.signals import SigAction
from popek.user.syscalls.files import timeout_seconds
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

SIGSET_SIZE = 8
HOST_PENDING_POLL = 0.05  # seconds between looks for host-pending signals in sigwait
MINSIGSTKSZ = 2048


def _sigset_size(size: int) -> None:
    if size != SIGSET_SIZE:
        raise SyscallError(Errno.EINVAL)


@syscall("rt_sigaction")
def rt_sigaction(p: Process, sig: int, act: int, oact: int, sigsetsize: int) -> int:
    _sigset_size(sigsetsize)
    sig = i32(sig)
    if not 1 <= sig <= signals.NSIG:
        raise SyscallError(Errno.EINVAL)
    new = None
    if act:
        handler, flags, mask = structs.SIGACTION.unpack(
            p.space.read(act, structs.SIGACTION.size))
        if sig in (signals.SIGKILL, signals.SIGSTOP):
            raise SyscallError(Errno.EINVAL)
        new = SigAction(handler, flags, mask & ~signals.UNBLOCKABLE)
    if oact:
        old = p.signals.actions[sig]
        p.space.write(oact, structs.SIGACTION.pack(old.handler, old.flags, old.mask))
    if new is not None:
        p.signals.set_action(sig, new)
    return 0


@syscall("rt_sigprocmask")
def rt_sigprocmask(p: Process, how: int, nset: int, oset: int, sigsetsize: int) -> int:
    _sigset_size(sigsetsize)
    old = p.signals.mask
    if nset:
        value = p.space.read_u64(nset)
        how = i32(how)
        if how == signals.SIG_BLOCK:
            value = old | value
        elif how == signals.SIG_UNBLOCK:
            value = old & ~value
        elif how != signals.SIG_SETMASK:
            raise SyscallError(Errno.EINVAL)
    if oset:
        p.space.write(oset, structs.U64.pack(old))
    if nset:
        p.signals.set_mask(value)
    return 0


@syscall("rt_sigpending")
def rt_sigpending(p: Process, uset: int, sigsetsize: int) -> int:
    _sigset_size(sigsetsize)
    p.signals.poll_host()
    pending = 0
    for sig in p.signals.pending:
        pending |= signals.bit(sig)
    p.space.write(uset, structs.U64.pack(pending & p.signals.mask))
    return 0


@syscall("rt_sigsuspend")
def rt_sigsuspend(p: Process, mask: int, sigsetsize: int) -> int:
    """Wait for a signal with a temporary mask; the caller's mask returns after its handler."""
    _sigset_size(sigsetsize)
    temporary = p.space.read_u64(mask)
    p.signals.restore_mask = p.signals.mask
    p.signals.set_mask(temporary)
    while True:
        p.scheduler.wait([], None, restartable=False)  # ends only by Interrupted


@syscall("rt_sigtimedwait")
def rt_sigtimedwait(p: Process, uset: int, uinfo: int, uts: int, sigsetsize: int) -> int:
    """sigwait: take a pending signal of the set instead of running its handler."""
    _sigset_size(sigsetsize)
    wanted = p.space.read_u64(uset) & ~signals.UNBLOCKABLE
    timeout = timeout_seconds(p, uts)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        got = p.signals.take(wanted)
        if got is not None:
            sig, info = got
            if uinfo:
                p.space.write(uinfo, info)
            return sig
        left = HOST_PENDING_POLL if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise SyscallError(Errno.EAGAIN)
        # A signal the host holds blocked wakes no one: look again now and then.
        p.scheduler.wait([], min(left, HOST_PENDING_POLL), restartable=False,
                         until=lambda: p.signals.pending_in(wanted))


@syscall("rt_sigreturn")
def rt_sigreturn(p: Process) -> int:
    try:
        pc = p.signals.sigreturn()
    except GuestFault:  # no frame where sp points: the kernel kills with SIGSEGV too
        signals.terminate(signals.SIGSEGV)
    raise Resume(pc)


@syscall("sigaltstack")
def sigaltstack(p: Process, ss: int, old_ss: int) -> int:
    sp = p.hart.x[2]
    current = p.signals.altstack
    if ss:
        ss_sp, flags, size = structs.STACK_T.unpack(p.space.read(ss, structs.STACK_T.size))
        if p.signals.altstack_flags(sp) == signals.SS_ONSTACK:
            raise SyscallError(Errno.EPERM)
        if flags & ~(signals.SS_DISABLE | signals.SS_ONSTACK):
            raise SyscallError(Errno.EINVAL)
        if not flags & signals.SS_DISABLE and size < MINSIGSTKSZ:
            raise SyscallError(Errno.ENOMEM)
    if old_ss:
        p.space.write(old_ss, structs.STACK_T.pack(current[0], p.signals.altstack_flags(sp),
                                                   current[2]))
    if ss:
        if flags & signals.SS_DISABLE:
            p.signals.altstack = (0, signals.SS_DISABLE, 0)
        else:
            p.signals.altstack = (ss_sp, 0, size)
    return 0
