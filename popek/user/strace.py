"""``--strace``: every system call with its arguments and result on stderr, like qemu's.

Lines look like ``PID name(arg,...) = result``; failures show ``-1 errno=N (text)``
and addresses are in hex. Arguments are formatted before the call runs (a buffer
it fills is still the caller's pointer), the line is written once the call returns.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from popek.user.address_space import GuestFault
from popek.user.fileflags import AT_FDCWD, GUEST_OPEN_FLAGS, open_flag_names
from popek.user.linux_errno import describe
from popek.user.signals import SIGNAL_NAMES
from popek.user.syscall_table import ARG_KINDS, POINTER_RESULTS, SYSCALL_NAMES

if TYPE_CHECKING:
    from popek.user.process import Process

STRING_LIMIT = 256
PROT_NAMES = {1: "PROT_READ", 2: "PROT_WRITE", 4: "PROT_EXEC"}
MAP_NAMES = {1: "MAP_SHARED", 2: "MAP_PRIVATE", 0x10: "MAP_FIXED", 0x20: "MAP_ANONYMOUS",
             0x100: "MAP_GROWSDOWN", 0x800: "MAP_DENYWRITE", 0x4000: "MAP_NORESERVE",
             0x8000: "MAP_POPULATE", 0x20000: "MAP_STACK", 0x100000: "MAP_FIXED_NOREPLACE"}
CREATING = GUEST_OPEN_FLAGS["O_CREAT"] | GUEST_OPEN_FLAGS["O_TMPFILE"]
NO_RETURN = frozenset({"exit", "exit_group", "execve", "rt_sigreturn"})


def _signed(value: int, bits: int = 64) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _flag_names(value: int, names: dict[int, str], zero: str) -> str:
    shown = [name for bits, name in names.items() if value & bits]
    rest = value & ~sum(names)
    if rest:
        shown.append(hex(rest))
    return "|".join(shown) or zero


class Strace:
    """Formats and writes the trace of one process's system calls."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.unsupported_seen: set[int] = set()

    def _arg(self, kind: str, value: int) -> str:
        if kind == "d":
            return str(_signed(value))
        if kind == "u":
            return str(value)
        if kind in "oc":
            return f"0{value:o}"
        if kind == "O":
            return open_flag_names(value)
        if kind == "P":
            return _flag_names(value, PROT_NAMES, "PROT_NONE")
        if kind == "M":
            return _flag_names(value, MAP_NAMES, "0")
        if kind == "S":
            return SIGNAL_NAMES.get(_signed(value, 32), str(_signed(value, 32)))
        if kind == "f":
            fd = _signed(value, 32)
            return "AT_FDCWD" if fd == AT_FDCWD else str(fd)
        if kind == "s":
            if value == 0:
                return "NULL"
            try:
                text = self.process.space.read_cstr(value, STRING_LIMIT)
            except GuestFault:
                return hex(value)
            return '"' + text.decode("utf-8", "backslashreplace") + '"'
        if kind == "h":
            return hex(value) if value else "0"
        return "NULL" if value == 0 else hex(value)

    def enter(self, nr: int, args: tuple[int, ...]) -> str:
        """The ``name(args)`` part, written at once for calls that do not return."""
        name = SYSCALL_NAMES.get(nr, f"syscall_{nr}")
        kinds = ARG_KINDS.get(name)
        if kinds is None:
            shown = ",".join(str(_signed(a)) for a in args)
        else:
            if "c" in kinds and not args[kinds.index("c") - 1] & CREATING:
                kinds = kinds.replace("c", "")  # no mode unless the call may create a file
            shown = ",".join(self._arg(k, a) for k, a in zip(kinds, args, strict=False))
        head = f"{name}({shown})"
        if name in NO_RETURN:
            self._write(f"{os.getpid()} {head}\n")
        return head

    def leave(self, nr: int, head: str, result: int) -> None:
        name = SYSCALL_NAMES.get(nr, "")
        if name in NO_RETURN and result >= 0:
            return
        if -4096 < result < 0:
            shown = f"-1 {describe(-result)}"
        elif name in POINTER_RESULTS:
            shown = f"{result:#018x}"
        else:
            shown = str(result)
        self._write(f"{os.getpid()} {head} = {shown}\n")  # a fork child shows its own pid

    def unsupported(self, nr: int) -> None:
        """Name a system call popek does not implement, the first time it is made."""
        if nr not in self.unsupported_seen:
            self.unsupported_seen.add(nr)
            name = SYSCALL_NAMES.get(nr, "unknown")
            self._write(f"{os.getpid()} popek: unsupported syscall {nr} ({name})\n")

    def host_exception(self, nr: int, error: Exception) -> None:
        """A host exception inside a call (a popek bug): the call fails with EINVAL."""
        name = SYSCALL_NAMES.get(nr, "unknown")
        self._write(f"{os.getpid()} popek: {name}: host {type(error).__name__}: {error}\n")

    @staticmethod
    def _write(line: str) -> None:
        try:
            os.write(2, line.encode())
        except OSError:
            pass
