"""ioctl: the terminal and descriptor requests programs make of their standard streams.

The terminal structures (termios with 19 control characters, winsize) are laid out
the same by riscv64 and the host's Linux, so the bytes pass through; requests are
translated by name. Anything else fails with ENOTTY, as for a file without ioctls.
"""

from __future__ import annotations

import fcntl
import os
import termios
from typing import TYPE_CHECKING

from popek.user import structs
from popek.user.address_space import PROT_WRITE
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.files import check_fd
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

# Guest request -> (host request name, bytes read from the guest, bytes written back).
PASSTHROUGH: dict[int, tuple[str, int, int]] = {
    0x5401: ("TCGETS", 0, structs.TERMIOS_SIZE),
    0x5402: ("TCSETS", structs.TERMIOS_SIZE, 0),
    0x5403: ("TCSETSW", structs.TERMIOS_SIZE, 0),
    0x5404: ("TCSETSF", structs.TERMIOS_SIZE, 0),
    0x540F: ("TIOCGPGRP", 0, 4),
    0x5410: ("TIOCSPGRP", 4, 0),
    0x5411: ("TIOCOUTQ", 0, 4),
    0x5413: ("TIOCGWINSZ", 0, structs.WINSIZE_SIZE),
    0x5414: ("TIOCSWINSZ", structs.WINSIZE_SIZE, 0),
    0x541B: ("FIONREAD", 0, 4),
    0x5429: ("TIOCGSID", 0, 4),
}
TIOCSCTTY, TIOCNOTTY = 0x540E, 0x5422
FIONBIO, FIONCLEX, FIOCLEX = 0x5421, 0x5450, 0x5451


@syscall("ioctl")
def ioctl(p: Process, fd: int, request: int, arg: int) -> int:
    fd = check_fd(p, fd)
    request &= 0xFFFFFFFF
    if request in PASSTHROUGH:
        name, size_in, size_out = PASSTHROUGH[request]
        host = getattr(termios, name, None)
        if host is None:
            raise SyscallError(Errno.ENOTTY)
        if size_out:
            p.space.check(arg, size_out, PROT_WRITE)
        buf = p.space.read(arg, size_in) if size_in else bytes(size_out)
        result = fcntl.ioctl(fd, host, buf)
        if size_out:
            p.space.write(arg, result[:size_out])
        return 0
    if request == FIONBIO:
        os.set_blocking(fd, not structs.I32.unpack(p.space.read(arg, 4))[0])
        return 0
    if request in (FIOCLEX, FIONCLEX):
        os.set_inheritable(fd, request == FIONCLEX)
        return 0
    if request == TIOCSCTTY:
        fcntl.ioctl(fd, termios.TIOCSCTTY, i32(arg))
        return 0
    if request == TIOCNOTTY:
        fcntl.ioctl(fd, termios.TIOCNOTTY)
        return 0
    raise SyscallError(Errno.ENOTTY)
