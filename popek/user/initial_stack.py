"""The initial process stack: argc, argv, envp and the auxiliary vector, as Linux builds it.

From the top down: the executable's name, the environment and argument strings,
16 random bytes, then (16-byte aligned at sp) argc, the argv and envp pointer
arrays and the auxv pairs. The C library and the dynamic linker read all of it.
"""

from __future__ import annotations

import os
import struct

from popek.user.address_space import AddressSpace
from popek.user.elf_loader import LoadedProgram

# Auxiliary vector entry types (linux/auxvec.h).
AT_NULL = 0
AT_PHDR = 3
AT_PHENT = 4
AT_PHNUM = 5
AT_PAGESZ = 6
AT_BASE = 7
AT_FLAGS = 8
AT_ENTRY = 9
AT_UID = 11
AT_EUID = 12
AT_GID = 13
AT_EGID = 14
AT_HWCAP = 16
AT_CLKTCK = 17
AT_SECURE = 23
AT_RANDOM = 25
AT_EXECFN = 31

PAGE_SIZE = 4096
CLOCK_TICKS = 100
# The extensions the hart implements, one bit per letter as riscv's AT_HWCAP reports them.
HWCAP = sum(1 << (ord(letter) - ord("a")) for letter in "imafdc")


def build(space: AddressSpace, top: int, loaded: LoadedProgram, argv: list[bytes],
          envp: list[bytes], execfn: bytes, ids: tuple[int, int, int, int]) -> int:
    """Write the initial stack below ``top``; returns the initial sp. ``ids`` are the
    uid, euid, gid and egid the program sees."""
    pos = top

    def push(data: bytes) -> int:
        nonlocal pos
        pos -= len(data)
        space.write(pos, data)
        return pos

    execfn_addr = push(execfn + b"\0")
    env_addrs = [push(s + b"\0") for s in reversed(envp)][::-1]
    arg_addrs = [push(s + b"\0") for s in reversed(argv)][::-1]
    pos &= ~15
    random_addr = push(os.urandom(16))
    auxv = [
        (AT_PHDR, loaded.phdr), (AT_PHENT, loaded.phentsize), (AT_PHNUM, loaded.phnum),
        (AT_PAGESZ, PAGE_SIZE), (AT_BASE, loaded.interp_base), (AT_FLAGS, 0),
        (AT_ENTRY, loaded.program_entry), (AT_UID, ids[0]), (AT_EUID, ids[1]),
        (AT_GID, ids[2]), (AT_EGID, ids[3]), (AT_HWCAP, HWCAP),
        (AT_CLKTCK, CLOCK_TICKS), (AT_SECURE, 0), (AT_RANDOM, random_addr),
        (AT_EXECFN, execfn_addr), (AT_NULL, 0),
    ]
    words = [len(argv), *arg_addrs, 0, *env_addrs, 0]
    for pair in auxv:
        words.extend(pair)
    table = struct.pack(f"<{len(words)}Q", *words)
    pos = (pos - len(table)) & ~15
    space.write(pos, table)
    return pos
