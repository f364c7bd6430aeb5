"""The WASI preview1 (``wasi_snapshot_preview1``) ABI: error numbers, flags, rights and the
layouts of the structures a program and its host exchange through linear memory.

Values are those of the witx definitions WASI publishes (and wasi-libc's
``<wasi/api.h>``), so a C program built against wasi-libc reads them as it expects.
"""

from __future__ import annotations

import errno
import stat
import struct

MODULE = "wasi_snapshot_preview1"

# WASI's errno is the position in this list (0 is success); each maps from the host's.
_ERRNO_NAMES = (
    "SUCCESS 2BIG ACCES ADDRINUSE ADDRNOTAVAIL AFNOSUPPORT AGAIN ALREADY BADF BADMSG BUSY "
    "CANCELED CHILD CONNABORTED CONNREFUSED CONNRESET DEADLK DESTADDRREQ DOM DQUOT EXIST "
    "FAULT FBIG HOSTUNREACH IDRM ILSEQ INPROGRESS INTR INVAL IO ISCONN ISDIR LOOP MFILE "
    "MLINK MSGSIZE MULTIHOP NAMETOOLONG NETDOWN NETRESET NETUNREACH NFILE NOBUFS NODEV "
    "NOENT NOEXEC NOLCK NOLINK NOMEM NOMSG NOPROTOOPT NOSPC NOSYS NOTCONN NOTDIR NOTEMPTY "
    "NOTRECOVERABLE NOTSOCK NOTSUP NOTTY NXIO OVERFLOW OWNERDEAD PERM PIPE PROTO "
    "PROTONOSUPPORT PROTOTYPE RANGE ROFS SPIPE SRCH STALE TIMEDOUT TXTBSY XDEV NOTCAPABLE"
).split()
ERRNO = {name: code for code, name in enumerate(_ERRNO_NAMES)}
FROM_HOST_ERRNO = {getattr(errno, "E" + name): code for name, code in ERRNO.items()
                   if hasattr(errno, "E" + name)}

# filetype
UNKNOWN, BLOCK_DEVICE, CHARACTER_DEVICE, DIRECTORY, REGULAR_FILE = 0, 1, 2, 3, 4
SOCKET_STREAM, SYMBOLIC_LINK = 6, 7
_FILETYPE_OF_MODE = ((stat.S_ISDIR, DIRECTORY), (stat.S_ISREG, REGULAR_FILE),
                     (stat.S_ISCHR, CHARACTER_DEVICE), (stat.S_ISBLK, BLOCK_DEVICE),
                     (stat.S_ISLNK, SYMBOLIC_LINK), (stat.S_ISSOCK, SOCKET_STREAM))


def filetype(mode: int) -> int:
    """WASI's filetype of a host ``st_mode`` (a FIFO has none: unknown, as wasmtime says)."""
    for test, kind in _FILETYPE_OF_MODE:
        if test(mode):
            return kind
    return UNKNOWN


# fdflags, oflags, lookupflags, fstflags, whence, subscription and event bits
FDFLAG_APPEND, FDFLAG_DSYNC, FDFLAG_NONBLOCK, FDFLAG_RSYNC, FDFLAG_SYNC = 1, 2, 4, 8, 16
OFLAG_CREAT, OFLAG_DIRECTORY, OFLAG_EXCL, OFLAG_TRUNC = 1, 2, 4, 8
LOOKUP_SYMLINK_FOLLOW = 1
FST_ATIM, FST_ATIM_NOW, FST_MTIM, FST_MTIM_NOW = 1, 2, 4, 8
EVENTTYPE_CLOCK, EVENTTYPE_FD_READ, EVENTTYPE_FD_WRITE = 0, 1, 2
SUBSCRIPTION_CLOCK_ABSTIME = 1
EVENT_FD_READWRITE_HANGUP = 1
PREOPENTYPE_DIR = 0
# advice, in WASI's order; POSIX (and Linux) order them differently
ADVICE = ("POSIX_FADV_NORMAL", "POSIX_FADV_SEQUENTIAL", "POSIX_FADV_RANDOM",
          "POSIX_FADV_WILLNEED", "POSIX_FADV_DONTNEED", "POSIX_FADV_NOREUSE")

# rights: one bit per operation, in this order
_RIGHT_NAMES = (
    "fd_datasync fd_read fd_seek fd_fdstat_set_flags fd_sync fd_tell fd_write fd_advise "
    "fd_allocate path_create_directory path_create_file path_link_source path_link_target "
    "path_open fd_readdir path_readlink path_rename_source path_rename_target "
    "path_filestat_get path_filestat_set_size path_filestat_set_times fd_filestat_get "
    "fd_filestat_set_size fd_filestat_set_times path_symlink path_remove_directory "
    "path_unlink_file poll_fd_readwrite sock_shutdown sock_accept"
).split()
RIGHT = {name: 1 << bit for bit, name in enumerate(_RIGHT_NAMES)}
ALL_RIGHTS = (1 << len(_RIGHT_NAMES)) - 1
READ_RIGHTS = RIGHT["fd_read"] | RIGHT["fd_readdir"]
WRITE_RIGHTS = (RIGHT["fd_write"] | RIGHT["fd_datasync"] | RIGHT["fd_allocate"]
                | RIGHT["fd_filestat_set_size"])
SEEK_RIGHTS = RIGHT["fd_seek"] | RIGHT["fd_tell"]
FILE_RIGHTS = sum(RIGHT[n] for n in (
    "fd_datasync fd_read fd_seek fd_fdstat_set_flags fd_sync fd_tell fd_write fd_advise "
    "fd_allocate fd_filestat_get fd_filestat_set_size fd_filestat_set_times "
    "poll_fd_readwrite").split())
DIRECTORY_RIGHTS = ALL_RIGHTS & ~(RIGHT["fd_read"] | WRITE_RIGHTS | SEEK_RIGHTS)

# the structures, little-endian as linear memory is
FILESTAT = struct.Struct("<QQB7xQQQQQ")  # dev ino filetype nlink size atim mtim ctim
FDSTAT = struct.Struct("<BxHxxxxQQ")  # filetype flags rights_base rights_inheriting
PRESTAT = struct.Struct("<B3xI")  # tag, name length of a preopened directory
IOVEC = struct.Struct("<II")  # buf, buf_len
DIRENT = struct.Struct("<QQIB3x")  # d_next d_ino d_namlen d_type, then the name
SUBSCRIPTION = struct.Struct("<QB7xI4xQQH6x")  # userdata tag, clock: id timeout precision flags
EVENT = struct.Struct("<QHB5xQH6x")  # userdata error type, fd_readwrite: nbytes flags
