"""Binary layouts of the structures riscv64 Linux exchanges with user space.

riscv64 uses the asm-generic definitions, all little-endian with 64-bit ``long``;
each layout is a :class:`struct.Struct` so its size is checked by construction
(the sizes noted were confirmed against the riscv64 glibc headers).
"""

from __future__ import annotations

import os
import stat as host_stat
from struct import Struct

U32 = Struct("<I")
I32 = Struct("<i")
U64 = Struct("<Q")
TIMESPEC = Struct("<qq")  # tv_sec, tv_nsec; also timeval (tv_sec, tv_usec)
IOVEC = Struct("<QQ")  # iov_base, iov_len
RLIMIT = Struct("<QQ")  # rlim_cur, rlim_max
POLLFD = Struct("<ihh")  # fd, events, revents
ITIMERVAL = Struct("<qqqq")  # it_interval, it_value (timevals)
ITIMERSPEC = Struct("<qqqq")  # it_interval, it_value (timespecs)
MSGHDR = Struct("<QI4xQQQQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
EPOLL_EVENT = Struct("<I4xQ")  # events, data: naturally aligned on riscv64
WINSIZE_SIZE = 8
TERMIOS_SIZE = 36  # 4 tcflag_t, c_line, c_cc[19]
UTSNAME_FIELD = 65  # six fields of this many bytes

# struct stat (asm-generic/stat.h), 128 bytes.
STAT = Struct("<QQIIIIQ8xqi4xqqQqQqQ8x")
# struct statx, 256 bytes: the fields up to stx_dev_minor, then spare.
STATX = Struct("<IIQIIIH2xQQQQ" + "qI4x" * 4 + "IIII112x")
STATX_BASIC_STATS = 0x7FF
# struct statfs (asm-generic/statfs.h, 64-bit words), 120 bytes.
STATFS = Struct("<qqQQQQQIIqqq32x")
# struct linux_dirent64 header: d_ino, d_off, d_reclen, d_type; then the name.
DIRENT64 = Struct("<QqHB")
# struct rusage: ru_utime, ru_stime (timevals), then 14 longs; 144 bytes.
RUSAGE = Struct("<qqqq14q")
# struct tms: four clock_t.
TMS = Struct("<qqqq")
# struct sysinfo, 112 bytes.
SYSINFO = Struct("<q3Q6QH6xQQI4x")
# struct sigaction as the kernel takes it: riscv has no sa_restorer.
CLONE_ARGS = Struct("<8Q")  # clone3: flags, pidfd, child_tid, parent_tid, exit_signal,
# stack, stack_size, tls (version 0 of struct clone_args)
ROBUST_LIST_HEAD = Struct("<QqQ")  # next, futex_offset, list_op_pending
SIGACTION = Struct("<QQQ")  # sa_handler, sa_flags, sa_mask
# stack_t: ss_sp, ss_flags, ss_size.
STACK_T = Struct("<Qi4xQ")
# siginfo_t is 128 bytes: signo, errno, code, then a union at offset 16.
SIGINFO_SIZE = 128
SIGINFO_HEAD = Struct("<iii4x")
SIGINFO_FIELDS = Struct("<iii4xIIi")  # signo, errno, code; pid, uid, status (SIGCHLD)
SIGINFO_ADDR = Struct("<Q")  # faults: si_addr
SIGINFO_KILL = Struct("<iI")  # kill, tgkill: si_pid, si_uid

# struct ucontext (asm-generic + riscv sigcontext), 960 bytes; the rt_sigframe is
# siginfo followed by ucontext.
UC_STACK = 16
UC_SIGMASK = 40
UC_MCONTEXT = 176  # 16-byte aligned: the FP union may hold Q registers
UC_SIZE = 960
MC_GREGS = Struct("<32Q")  # pc, then x1..x31
MC_FPREGS = Struct("<32QI")  # f0..f31, fcsr
MC_FPREGS_OFFSET = 256
RT_SIGFRAME_SIZE = SIGINFO_SIZE + UC_SIZE


def pack_stat(st: os.stat_result) -> bytes:
    return STAT.pack(
        st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev,
        st.st_size, st.st_blksize, st.st_blocks,
        st.st_atime_ns // 10**9, st.st_atime_ns % 10**9,
        st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9,
        st.st_ctime_ns // 10**9, st.st_ctime_ns % 10**9,
    )


def pack_statx(st: os.stat_result) -> bytes:
    times = []
    for ns in (st.st_atime_ns, 0, st.st_ctime_ns, st.st_mtime_ns):  # btime unknown
        times += [ns // 10**9, ns % 10**9]
    return STATX.pack(
        STATX_BASIC_STATS, st.st_blksize, 0, st.st_nlink, st.st_uid, st.st_gid,
        st.st_mode & 0xFFFF, st.st_ino, st.st_size, st.st_blocks, 0, *times,
        os.major(st.st_rdev), os.minor(st.st_rdev), os.major(st.st_dev), os.minor(st.st_dev),
    )


def pack_dirent64(ino: int, offset: int, dtype: int, name: bytes) -> bytes:
    reclen = (DIRENT64.size + len(name) + 1 + 7) & ~7
    record = DIRENT64.pack(ino, offset, reclen, dtype) + name
    return record + bytes(reclen - len(record))


# d_type values for getdents64, from the file type bits of st_mode.
DT_UNKNOWN = 0
DT_BY_FORMAT = {
    host_stat.S_IFIFO: 1, host_stat.S_IFCHR: 2, host_stat.S_IFDIR: 4, host_stat.S_IFBLK: 6,
    host_stat.S_IFREG: 8, host_stat.S_IFLNK: 10, host_stat.S_IFSOCK: 12,
}


def pack_utsname(*fields: str) -> bytes:
    return b"".join(f.encode()[:UTSNAME_FIELD - 1].ljust(UTSNAME_FIELD, b"\0") for f in fields)
