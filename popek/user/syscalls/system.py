"""System information and resources: uname, sysinfo, limits, usage, randomness, scheduling,
and riscv_hwprobe, which tells a program the hart's extensions (glibc picks string
functions by it).

The guest learns about the host it runs on, except that the machine is riscv64.
Resource limits that bound memory are kept for the guest but not applied to the
host: the emulator's own reservation of the guest's address space would break them.
"""

from __future__ import annotations

import os
import resource
import struct
import time
from typing import TYPE_CHECKING

from popek.cpu import extensions
from popek.user import structs
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.proc import pack_rusage
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

MACHINE = "riscv64"
# Resource numbers (asm-generic/resource.h), mapped to the host's by name.
RLIMIT_NAMES = {
    0: "RLIMIT_CPU", 1: "RLIMIT_FSIZE", 2: "RLIMIT_DATA", 3: "RLIMIT_STACK", 4: "RLIMIT_CORE",
    5: "RLIMIT_RSS", 6: "RLIMIT_NPROC", 7: "RLIMIT_NOFILE", 8: "RLIMIT_MEMLOCK",
    9: "RLIMIT_AS", 10: "RLIMIT_LOCKS", 11: "RLIMIT_SIGPENDING", 12: "RLIMIT_MSGQUEUE",
    13: "RLIMIT_NICE", 14: "RLIMIT_RTPRIO", 15: "RLIMIT_RTTIME",
}
GUEST_ONLY_LIMITS = frozenset({2, 3, 5, 8, 9})  # DATA, STACK, RSS, MEMLOCK, AS
RLIM_INFINITY = (1 << 64) - 1
RUSAGE_SELF, RUSAGE_CHILDREN, RUSAGE_THREAD = 0, -1, 1
GRND_NONBLOCK, GRND_RANDOM, GRND_INSECURE = 1, 2, 4
LOAD_SHIFT = 16


# riscv_hwprobe keys and IMA_EXT_0 bits (Linux's asm/hwprobe.h). Zicbom is left out: user
# programs may not clean or flush cache blocks (menvcfg/senvcfg in popek.user.process).
HWPROBE_BASE_BEHAVIOR, HWPROBE_BASE_IMA = 3, 1
HWPROBE_IMA_EXT_0 = 4
HWPROBE_CPUPERF_0 = 5  # misaligned access speed: 0, unknown
HWPROBE_ZICBOZ_BLOCK_SIZE = 6
HWPROBE_EXT_BITS = {"d": 0, "c": 1, "zba": 3, "zbb": 4, "zbs": 5, "zicboz": 6, "zbc": 7,
                    "zicond": 35, "zihintpause": 36, "zicntr": 50}  # d: F and D together
HWPROBE_PAIR = struct.Struct("<qQ")


def _hwprobe_values() -> dict[int, int]:
    ext = sum(1 << HWPROBE_EXT_BITS[e] for e in extensions.EXTENSIONS if e in HWPROBE_EXT_BITS)
    return {0: 0, 1: 0, 2: 0,  # mvendorid, marchid, mimpid: popek's harts read 0
            HWPROBE_BASE_BEHAVIOR: HWPROBE_BASE_IMA, HWPROBE_IMA_EXT_0: ext,
            HWPROBE_CPUPERF_0: 0, HWPROBE_ZICBOZ_BLOCK_SIZE: extensions.CACHE_BLOCK_SIZE}


@syscall("riscv_hwprobe")
def riscv_hwprobe(p: Process, pairs: int, count: int, cpusetsize: int, cpus: int,
                  flags: int) -> int:
    """Fill in the value of each (key, value) pair; an unknown key becomes -1 with value 0.
    Every hart is alike, so the CPU set does not matter."""
    if flags:
        raise SyscallError(Errno.EINVAL)
    values = _hwprobe_values()
    for i in range(count):
        addr = pairs + HWPROBE_PAIR.size * i
        key, _ = HWPROBE_PAIR.unpack(p.space.read(addr, HWPROBE_PAIR.size))
        value = values.get(key)
        p.space.write(addr, HWPROBE_PAIR.pack(-1, 0) if value is None
                      else HWPROBE_PAIR.pack(key, value))
    return 0


@syscall("uname")
def uname(p: Process, buf: int) -> int:
    host = os.uname()
    p.space.write(buf, structs.pack_utsname(host.sysname, host.nodename, host.release,
                                            host.version, MACHINE, "(none)"))
    return 0


@syscall("sysinfo")
def sysinfo(p: Process, info: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    loads = [round(v * (1 << LOAD_SHIFT)) for v in os.getloadavg()]
    p.space.write(info, structs.SYSINFO.pack(
        int(time.clock_gettime(time.CLOCK_BOOTTIME)), *loads,
        os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page,
        0, 0, 0, 0, 1, 0, 0, 1))
    return 0


@syscall("getrandom")
def getrandom(p: Process, buf: int, count: int, flags: int) -> int:
    if flags & ~(GRND_NONBLOCK | GRND_RANDOM | GRND_INSECURE):
        raise SyscallError(Errno.EINVAL)
    data = os.urandom(min(count, 1 << 25))
    p.space.write(buf, data)
    return len(data)


def _to_guest(value: int) -> int:
    return RLIM_INFINITY if value == resource.RLIM_INFINITY else value


def _to_host(value: int) -> int:
    return resource.RLIM_INFINITY if value == RLIM_INFINITY else value


def _limit(p: Process, which: int) -> tuple[int, int]:
    if which in p.rlimits:
        return p.rlimits[which]
    cur, high = resource.getrlimit(getattr(resource, RLIMIT_NAMES[which]))
    return _to_guest(cur), _to_guest(high)


def _set_limit(p: Process, which: int, cur: int, high: int) -> None:
    if cur > high:
        raise SyscallError(Errno.EINVAL)
    if which in GUEST_ONLY_LIMITS:
        old_high = _limit(p, which)[1]
        if high > old_high and os.geteuid() != 0:
            raise SyscallError(Errno.EPERM)
        p.rlimits[which] = (cur, high)
    else:
        resource.setrlimit(getattr(resource, RLIMIT_NAMES[which]), (_to_host(cur), _to_host(high)))


@syscall("prlimit64")
def prlimit64(p: Process, pid: int, which: int, new: int, old: int) -> int:
    which = i32(which)
    if i32(pid) not in (0, os.getpid()):
        raise SyscallError(Errno.EPERM)
    if which not in RLIMIT_NAMES or not hasattr(resource, RLIMIT_NAMES[which]):
        raise SyscallError(Errno.EINVAL)
    limits = structs.RLIMIT.unpack(p.space.read(new, structs.RLIMIT.size)) if new else None
    if old:
        p.space.write(old, structs.RLIMIT.pack(*_limit(p, which)))
    if limits is not None:
        _set_limit(p, which, *limits)
    return 0


@syscall("getrlimit")
def getrlimit(p: Process, which: int, rlim: int) -> int:
    return prlimit64(p, 0, which, 0, rlim)


@syscall("setrlimit")
def setrlimit(p: Process, which: int, rlim: int) -> int:
    return prlimit64(p, 0, which, rlim, 0)


@syscall("getrusage")
def getrusage(p: Process, who: int, usage: int) -> int:
    who = i32(who)
    if who in (RUSAGE_SELF, RUSAGE_THREAD):
        host = resource.RUSAGE_SELF
    elif who == RUSAGE_CHILDREN:
        host = resource.RUSAGE_CHILDREN
    else:
        raise SyscallError(Errno.EINVAL)
    p.space.write(usage, pack_rusage(resource.getrusage(host)))
    return 0


@syscall("umask")
def umask(p: Process, mask: int) -> int:
    return os.umask(mask & 0o777)


@syscall("sched_getaffinity")
def sched_getaffinity(p: Process, pid: int, size: int, mask: int) -> int:
    """The host's CPUs, as qemu reports them (nproc sizes thread pools from this)."""
    cpus = os.sched_getaffinity(i32(pid)) if hasattr(os, "sched_getaffinity") else {0}
    length = (max(cpus) // 64 + 1) * 8
    if size < length or size & 7:
        raise SyscallError(Errno.EINVAL)
    p.space.write(mask, sum(1 << cpu for cpu in cpus).to_bytes(length, "little"))
    return length


@syscall("sched_yield")
def sched_yield(p: Process) -> int:
    return 0


@syscall("getcpu")
def getcpu(p: Process, cpu: int, node: int) -> int:
    for addr in (cpu, node):
        if addr:
            p.space.write(addr, structs.U32.pack(0))
    return 0


@syscall("riscv_flush_icache")
def riscv_flush_icache(p: Process) -> int:
    p.hart.engine.flush()
    return 0


@syscall("sync")
def sync(p: Process) -> int:
    os.sync()
    return 0
