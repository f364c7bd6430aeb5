"""Time: clocks, sleeping and interval timers, all from the host's clocks.

CPU-time clocks and timers measure the emulator, which is the process here.
Sleeps wait through the signal layer, so a handled signal cuts them short.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from popek.user import structs
from popek.user.control import Interrupted
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

# Clock ids (linux/time.h), mapped to the host's by name.
CLOCK_NAMES = {
    0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 2: "CLOCK_PROCESS_CPUTIME_ID",
    3: "CLOCK_THREAD_CPUTIME_ID", 4: "CLOCK_MONOTONIC_RAW", 5: "CLOCK_REALTIME_COARSE",
    6: "CLOCK_MONOTONIC_COARSE", 7: "CLOCK_BOOTTIME", 11: "CLOCK_TAI",
}
TIMER_ABSTIME = 1
ITIMER_NAMES = {0: "ITIMER_REAL", 1: "ITIMER_VIRTUAL", 2: "ITIMER_PROF"}
CLOCK_TICKS = 100


# What to use where Python does not name a clock: the precise clock a coarse one follows.
CLOCK_FALLBACKS = {5: 0, 6: 1, 4: 1, 7: 1}


def _host_clock(clock: int) -> int:
    clock = i32(clock)
    for candidate in (clock, CLOCK_FALLBACKS.get(clock)):
        name = CLOCK_NAMES.get(candidate) if candidate is not None else None
        host = getattr(time, name, None) if name else None
        if host is not None:
            return host
    raise SyscallError(Errno.EINVAL)


def _timespec(ns: int) -> bytes:
    return structs.TIMESPEC.pack(ns // 10**9, ns % 10**9)


def _read_timespec(p: Process, addr: int) -> int:
    sec, nsec = structs.TIMESPEC.unpack(p.space.read(addr, structs.TIMESPEC.size))
    if sec < 0 or not 0 <= nsec < 10**9:
        raise SyscallError(Errno.EINVAL)
    return sec * 10**9 + nsec


@syscall("clock_gettime")
def clock_gettime(p: Process, clock: int, tp: int) -> int:
    p.space.write(tp, _timespec(time.clock_gettime_ns(_host_clock(clock))))
    return 0


@syscall("clock_getres")
def clock_getres(p: Process, clock: int, res: int) -> int:
    resolution = time.clock_getres(_host_clock(clock))
    if res:
        p.space.write(res, _timespec(round(resolution * 1e9)))
    return 0


@syscall("gettimeofday")
def gettimeofday(p: Process, tv: int, tz: int) -> int:
    if tv:
        usec = time.time_ns() // 1000
        p.space.write(tv, structs.TIMESPEC.pack(usec // 10**6, usec % 10**6))
    if tz:
        p.space.write(tz, bytes(8))  # struct timezone: UTC, no DST
    return 0


def _sleep(p: Process, clock: int, ns: int, rem: int) -> int:
    """Sleep ``ns`` on the host clock; on a signal, store what is left in ``rem``."""
    deadline = time.clock_gettime_ns(clock) + ns
    try:
        p.scheduler.wait([], ns / 1e9, restartable=False)
    except Interrupted:
        if rem:
            left = max(deadline - time.clock_gettime_ns(clock), 0)
            p.space.write(rem, _timespec(left))
        raise
    return 0


@syscall("nanosleep")
def nanosleep(p: Process, req: int, rem: int) -> int:
    return _sleep(p, time.CLOCK_MONOTONIC, _read_timespec(p, req), rem)


@syscall("clock_nanosleep")
def clock_nanosleep(p: Process, clock: int, flags: int, req: int, rem: int) -> int:
    host = _host_clock(clock)
    ns = _read_timespec(p, req)
    if flags & TIMER_ABSTIME:
        ns = max(ns - time.clock_gettime_ns(host), 0)
        rem = 0
    return _sleep(p, host, ns, rem)


@syscall("times")
def times(p: Process, buf: int) -> int:
    t = os.times()
    if buf:
        p.space.write(buf, structs.TMS.pack(
            *(round(v * CLOCK_TICKS) for v in (t.user, t.system, t.children_user,
                                               t.children_system))))
    return round(t.elapsed * CLOCK_TICKS)


def _itimer(which: int) -> int:
    name = ITIMER_NAMES.get(i32(which))
    if name is None:
        raise SyscallError(Errno.EINVAL)
    return getattr(signal, name)


def _itimerval(delay: float, interval: float) -> bytes:
    def timeval(seconds: float) -> tuple[int, int]:
        usec = round(seconds * 1e6)
        return usec // 10**6, usec % 10**6

    return structs.ITIMERVAL.pack(*timeval(interval), *timeval(delay))


@syscall("getitimer")
def getitimer(p: Process, which: int, value: int) -> int:
    p.space.write(value, _itimerval(*signal.getitimer(_itimer(which))))
    return 0


@syscall("setitimer")
def setitimer(p: Process, which: int, new: int, old: int) -> int:
    host = _itimer(which)
    isec, iusec, vsec, vusec = structs.ITIMERVAL.unpack(p.space.read(new, structs.ITIMERVAL.size))
    previous = signal.setitimer(host, vsec + vusec / 1e6, isec + iusec / 1e6)
    if old:
        p.space.write(old, _itimerval(*previous))
    return 0
