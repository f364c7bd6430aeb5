"""The Linux system call layer of the process VM.

Handlers live in one module per area (files, file system, memory, processes,
threads, futexes, event descriptors, sockets, signals, time, system information,
terminals) and register by name; importing this package registers them all.
:func:`dispatch` is what the hart's ``ecall`` reaches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.user.address_space import GuestFault, StringTooLong
from popek.user.control import ControlFlow, Interrupted, Resume
from popek.user.linux_errno import Errno, SyscallError, from_host
from popek.user.syscalls import (  # noqa: F401 - imported to register their handlers
    clock,
    events,
    files,
    filesystem,
    futex,
    memory,
    proc,
    signal_calls,
    sockets,
    system,
    terminal,
    thread_calls,
)
from popek.user.syscalls.registry import HANDLERS, M64

if TYPE_CHECKING:
    from popek.user.process import Process


def dispatch(p: Process, pc: int) -> int:
    """Perform the system call the hart trapped on at ``pc``; returns where to resume."""
    x = p.hart.x
    nr = x[17]
    args = (x[10], x[11], x[12], x[13], x[14], x[15])
    strace = p.strace
    head = strace.enter(nr, args) if strace else ""
    p.syscall_pc = pc
    entry = HANDLERS.get(nr)
    try:
        if entry is None:
            if strace:
                strace.unsupported(nr)
            result = -Errno.ENOSYS
        else:
            handler, nargs = entry
            result = int(handler(p, *args[:nargs]))
    except Resume as r:  # registers are already what the program continues with
        if strace:
            strace.leave(nr, head, 0)
        return p.signals.deliver_pending(r.pc)
    except Interrupted as i:
        if i.restart:  # run the handler, then the ecall again with the same arguments
            return p.signals.deliver_pending(pc)
        result = -Errno.EINTR
    except SyscallError as e:
        result = -e.errno
    except GuestFault:
        result = -Errno.EFAULT
    except StringTooLong:
        result = -Errno.ENAMETOOLONG
    except OSError as e:
        result = -from_host(e)
    except ControlFlow:
        raise
    except MemoryError:
        result = -Errno.ENOMEM
    except Exception as e:  # noqa: BLE001 - a host bug must not crash the guest's host
        if strace:
            strace.host_exception(nr, e)
        result = -Errno.EINVAL
    if strace:
        strace.leave(nr, head, result)
    x[10] = result & M64
    return p.signals.deliver_pending(pc + 4)
