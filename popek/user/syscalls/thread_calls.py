"""Thread system calls: creating threads, their ids, their end, signals sent to them,
yielding the hart and memory barriers. The threads themselves are popek.user.threads'.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from popek.user import signals, structs
from popek.user.address_space import GuestFault
from popek.user.control import ProcessExit
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.futex import wake
from popek.user.syscalls.registry import i32, syscall
from popek.user.threads import MAX_THREADS

if TYPE_CHECKING:
    from popek.user.process import Process
    from popek.user.threads import Thread

CLONE_VM = 0x100
CLONE_SIGHAND = 0x800
CLONE_THREAD = 0x10000
CLONE_SETTLS = 0x80000
CLONE_PARENT_SETTID = 0x100000
CLONE_CHILD_CLEARTID = 0x200000
CLONE_CHILD_SETTID = 0x1000000
ROBUST_LIST_LIMIT = 2048  # entries walked at most, as the kernel does
FUTEX_WAITERS, FUTEX_OWNER_DIED, FUTEX_TID_MASK = 0x80000000, 0x40000000, 0x3FFFFFFF
MEMBARRIER_CMD_QUERY = 0
# GLOBAL, GLOBAL_EXPEDITED, REGISTER_GLOBAL_EXPEDITED, PRIVATE_EXPEDITED,
# REGISTER_PRIVATE_EXPEDITED, PRIVATE_EXPEDITED_SYNC_CORE, REGISTER_..._SYNC_CORE
MEMBARRIER_COMMANDS = 0x7F


def clone_thread(p: Process, flags: int, newsp: int, ptid: int, tls: int, ctid: int) -> int:
    """clone with CLONE_THREAD: a thread of this process, returning its id."""
    if flags & (CLONE_VM | CLONE_SIGHAND) != CLONE_VM | CLONE_SIGHAND:
        raise SyscallError(Errno.EINVAL)
    if len(p.scheduler.threads) >= MAX_THREADS:
        raise SyscallError(Errno.EAGAIN)
    regs = p.hart.x[:32].tolist()
    regs[10] = 0  # the child's clone returns 0
    if newsp:
        regs[2] = newsp
    if flags & CLONE_SETTLS:
        regs[4] = tls
    thread = p.scheduler.spawn(regs, p.syscall_pc + 4)
    tid = structs.I32.pack(thread.tid)
    if flags & CLONE_PARENT_SETTID:
        p.space.write(ptid, tid)
    if flags & CLONE_CHILD_SETTID:
        p.space.write(ctid, tid)
    if flags & CLONE_CHILD_CLEARTID:
        thread.clear_child_tid = ctid
    return thread.tid


@syscall("exit")
def exit_thread(p: Process, status: int) -> int:
    """The calling thread ends; the process with it if it was the last one."""
    sched = p.scheduler
    if len(sched.threads) == 1:
        raise ProcessExit(status & 0xFF)
    thread = sched.current
    _release_robust_futexes(p, thread)
    if thread.clear_child_tid:  # pthread_join waits on this word
        try:
            p.space.write(thread.clear_child_tid, bytes(4))
            wake(sched, thread.clear_child_tid, 1)
        except GuestFault:
            pass
    sched.exit_thread()
    return 0  # not reached: exit_thread unwinds the thread


@syscall("exit_group")
def exit_group(p: Process, status: int) -> int:
    raise ProcessExit(status & 0xFF)


def _release_robust_futexes(p: Process, thread: Thread) -> None:
    """Mark the robust mutexes a dying thread holds as its owner died and wake a waiter of
    each, as the kernel does at thread exit."""
    head = thread.robust_list
    if not head:
        return
    try:
        layout = structs.ROBUST_LIST_HEAD
        entry, offset, pending = layout.unpack(p.space.read(head, layout.size))
        entries = []
        while entry & ~1 != head and len(entries) < ROBUST_LIST_LIMIT:
            entries.append(entry & ~1)
            entry = p.space.read_u64(entry & ~1)
        if pending:
            entries.append(pending & ~1)
        for item in entries:
            lock = item + offset
            (word,) = structs.U32.unpack(p.space.read(lock, 4))
            if word & FUTEX_TID_MASK == thread.tid:
                p.space.write(lock, structs.U32.pack(word & FUTEX_WAITERS | FUTEX_OWNER_DIED))
                if word & FUTEX_WAITERS:
                    wake(p.scheduler, lock, 1)
    except GuestFault:
        pass  # a broken list ends the walk, as in the kernel


@syscall("gettid")
def gettid(p: Process) -> int:
    return p.scheduler.current.tid


@syscall("set_tid_address")
def set_tid_address(p: Process, tidptr: int) -> int:
    thread = p.scheduler.current
    thread.clear_child_tid = tidptr
    return thread.tid


@syscall("set_robust_list")
def set_robust_list(p: Process, head: int, length: int) -> int:
    if length != structs.ROBUST_LIST_HEAD.size:
        raise SyscallError(Errno.EINVAL)
    p.scheduler.current.robust_list = head
    return 0


@syscall("get_robust_list")
def get_robust_list(p: Process, tid: int, head_ptr: int, len_ptr: int) -> int:
    tid = i32(tid)
    thread = p.scheduler.threads.get(tid) if tid else p.scheduler.current
    if thread is None:
        raise SyscallError(Errno.ESRCH)
    p.space.write(head_ptr, structs.U64.pack(thread.robust_list))
    p.space.write(len_ptr, structs.U64.pack(structs.ROBUST_LIST_HEAD.size))
    return 0


def signal_thread(p: Process, tid: int, sig: int) -> bool:
    """Send ``sig`` to thread ``tid`` of this process; False if there is no such thread."""
    thread = p.scheduler.threads.get(tid)
    if thread is None:
        return False
    if sig:
        sender = structs.SIGINFO_KILL.pack(p.pid, p.guest_ids(os.getuid(), os.getgid())[0])
        info = signals.siginfo(sig, signals.SI_TKILL, sender)
        p.signals.raise_signal(sig, info, thread.signals)
        p.scheduler.wake(thread)  # a blocking call it is in may end with EINTR
    return True


@syscall("sched_yield")
def sched_yield(p: Process) -> int:
    p.scheduler.yield_slice()
    return 0


@syscall("membarrier")
def membarrier(p: Process, cmd: int, flags: int, cpu_id: int) -> int:
    """Every barrier holds already: one guest thread runs at a time, in program order."""
    cmd = i32(cmd)
    if flags:
        raise SyscallError(Errno.EINVAL)
    if cmd == MEMBARRIER_CMD_QUERY:
        return MEMBARRIER_COMMANDS
    if cmd < 0 or cmd & (cmd - 1) or not cmd & MEMBARRIER_COMMANDS:
        raise SyscallError(Errno.EINVAL)
    return 0
