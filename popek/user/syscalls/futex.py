"""futex: the wait queues pthreads and Go's runtime build their locks and conditions on.

A queue is keyed by the futex's guest address (private and shared futexes alike:
every thread of the process shares one address space, and a forked child has queues
of its own). Only one guest thread runs at a time, so reading the futex word and
joining its queue are atomic with respect to every waker, as the kernel guarantees.
A waiter parks in the scheduler until a wake marks it, its timeout passes or a signal
interrupts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from popek.user import structs
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.files import timeout_seconds
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process
    from popek.user.threads import Scheduler, Thread

FUTEX_CMD_MASK = 0x7F  # without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME
FUTEX_CLOCK_REALTIME = 256
FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE, FUTEX_WAKE_OP = 0, 1, 3, 4, 5
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
BITSET_ALL = 0xFFFFFFFF
FUTEX_OP_OPARG_SHIFT = 8
M32 = 0xFFFFFFFF


@dataclass(eq=False)
class Waiter:
    thread: Thread
    addr: int  # the queue it is on (requeue moves it)
    bitset: int
    woken: bool = False


def _word(p: Process, addr: int) -> int:
    return structs.U32.unpack(p.space.read(addr, 4))[0]


def wake(sched: Scheduler, addr: int, count: int, bitset: int = BITSET_ALL) -> int:
    """Wake up to ``count`` waiters on ``addr`` whose bitset meets ``bitset``; how many."""
    queue = sched.futexes.get(addr, [])
    woken = 0
    for waiter in list(queue):
        if woken >= count:
            break
        if waiter.bitset & bitset:
            queue.remove(waiter)
            waiter.woken = True
            sched.wake(waiter.thread)
            woken += 1
    if not queue:
        sched.futexes.pop(addr, None)
    return woken


def _wait(p: Process, addr: int, val: int, timeout: int, bitset: int, absolute: bool,
          realtime: bool) -> int:
    seconds = timeout_seconds(p, timeout)  # Linux reads it before the futex word
    if seconds is not None and absolute:
        seconds -= time.time() if realtime else time.monotonic()
    if _word(p, addr) != val & M32:
        raise SyscallError(Errno.EAGAIN)
    sched = p.scheduler
    waiter = Waiter(sched.current, addr, bitset)
    sched.futexes.setdefault(addr, []).append(waiter)
    try:
        sched.wait([], seconds, restartable=False, until=lambda: waiter.woken)
    finally:
        if not waiter.woken:
            queue = sched.futexes.get(waiter.addr, [])
            queue.remove(waiter)
            if not queue:
                sched.futexes.pop(waiter.addr, None)
    if not waiter.woken:
        raise SyscallError(Errno.ETIMEDOUT)
    return 0


def _requeue(sched: Scheduler, addr: int, count: int, limit: int, addr2: int) -> int:
    """Wake ``count`` waiters on ``addr`` and move up to ``limit`` more to ``addr2``."""
    woken = wake(sched, addr, count)
    queue = sched.futexes.get(addr, [])
    moved = queue[:limit]
    if moved:
        del queue[:limit]
        if not queue:
            sched.futexes.pop(addr, None)
        for waiter in moved:
            waiter.addr = addr2
        sched.futexes.setdefault(addr2, []).extend(moved)
    return woken + len(moved)


def _sign12(value: int) -> int:
    return value - 0x1000 if value & 0x800 else value


def _wake_op(p: Process, addr: int, count: int, count2: int, addr2: int, encoded: int) -> int:
    """Change the word at ``addr2``, wake on ``addr`` and, if the old word compares as
    told, on ``addr2`` too: glibc's condition variables used this."""
    op, cmp = (encoded >> 28) & 0xF, (encoded >> 24) & 0xF
    oparg, cmparg = _sign12((encoded >> 12) & 0xFFF), _sign12(encoded & 0xFFF)
    if op & FUTEX_OP_OPARG_SHIFT:
        if not 0 <= oparg < 32:
            raise SyscallError(Errno.EINVAL)
        oparg = 1 << oparg
    operations = {0: lambda v: oparg, 1: lambda v: v + oparg, 2: lambda v: v | oparg,
                  3: lambda v: v & ~oparg, 4: lambda v: v ^ oparg}
    compare = {0: lambda a, b: a == b, 1: lambda a, b: a != b, 2: lambda a, b: a < b,
               3: lambda a, b: a <= b, 4: lambda a, b: a > b, 5: lambda a, b: a >= b}
    if op & 7 not in operations or cmp not in compare:
        raise SyscallError(Errno.ENOSYS)
    old = _word(p, addr2)
    p.space.write(addr2, structs.U32.pack(operations[op & 7](old) & M32))
    woken = wake(p.scheduler, addr, count)
    if compare[cmp](i32(old), cmparg):
        woken += wake(p.scheduler, addr2, count2)
    return woken


@syscall("futex")
def futex(p: Process, uaddr: int, op: int, val: int, timeout: int, uaddr2: int,
          val3: int) -> int:
    op = i32(op)
    cmd = op & FUTEX_CMD_MASK
    if uaddr & 3:
        raise SyscallError(Errno.EINVAL)
    val3 &= M32
    count = max(i32(val), 0)
    count2 = max(i32(timeout), 0)  # the requeue and wake-op calls pass a count there
    if cmd == FUTEX_WAIT:
        return _wait(p, uaddr, val, timeout, BITSET_ALL, False, False)
    if cmd == FUTEX_WAIT_BITSET:
        if not val3:
            raise SyscallError(Errno.EINVAL)
        return _wait(p, uaddr, val, timeout, val3, True, bool(op & FUTEX_CLOCK_REALTIME))
    if cmd == FUTEX_WAKE:
        return wake(p.scheduler, uaddr, count)
    if cmd == FUTEX_WAKE_BITSET:
        if not val3:
            raise SyscallError(Errno.EINVAL)
        return wake(p.scheduler, uaddr, count, val3)
    if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
        if cmd == FUTEX_CMP_REQUEUE and _word(p, uaddr) != val3:
            raise SyscallError(Errno.EAGAIN)
        return _requeue(p.scheduler, uaddr, count, count2, uaddr2)
    if cmd == FUTEX_WAKE_OP:
        return _wake_op(p, uaddr, count, count2, uaddr2, val3)
    raise SyscallError(Errno.ENOSYS)  # priority-inheritance futexes are not emulated
