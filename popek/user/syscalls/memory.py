"""Memory management calls: brk, mmap and friends, on the process's address space.

File mappings are private copies of the file's bytes taken at mmap time; that is
exact for MAP_PRIVATE (what the dynamic linker and C library use). MAP_SHARED file
mappings are copies too: stores to them do not reach the file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from popek.user.address_space import (
    PAGE_MASK,
    PROT_ALL,
    PROT_READ,
    PROT_WRITE,
    USER_TOP,
    page_ceil,
)
from popek.user.linux_errno import Errno, SyscallError
from popek.user.syscalls.files import check_fd
from popek.user.syscalls.registry import i32, syscall

if TYPE_CHECKING:
    from popek.user.process import Process

MAP_TYPE = 0x0F
MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE = 1, 2, 3
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
FILE_CHUNK = 1 << 24


def _prot(prot: int) -> int:
    prot &= PROT_ALL  # PROT_GROWSDOWN/UP ask for nothing we need to do
    return prot | PROT_READ if prot & PROT_WRITE else prot  # riscv has no write-only pages


def _range(addr: int, length: int) -> int:
    """Validate a page-aligned range; returns its page-rounded length."""
    if addr & PAGE_MASK or length == 0:
        raise SyscallError(Errno.EINVAL)
    length = page_ceil(length)
    if addr + length > USER_TOP:
        raise SyscallError(Errno.EINVAL)
    return length


@syscall("brk")
def brk(p: Process, addr: int) -> int:
    """Move the program break; on failure the current break is returned, as Linux does."""
    if addr < p.brk_start:
        return p.brk
    old_end, new_end = page_ceil(p.brk), page_ceil(addr)
    if new_end > old_end:
        if not p.space.is_free(old_end, new_end) or not p.may_map(new_end - old_end):
            return p.brk
        p.space.map(old_end, new_end - old_end, PROT_READ | PROT_WRITE)
    elif new_end < old_end:
        p.space.unmap(new_end, old_end - new_end)
    p.brk = addr
    return addr


@syscall("mmap")
def mmap(p: Process, addr: int, length: int, prot: int, flags: int, fd: int,
         offset: int) -> int:
    if length == 0 or offset & PAGE_MASK:
        raise SyscallError(Errno.EINVAL)
    if length > USER_TOP:
        raise SyscallError(Errno.ENOMEM)
    if flags & MAP_TYPE not in (MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE):
        raise SyscallError(Errno.EINVAL)
    length = page_ceil(length)
    data = b""
    if not flags & MAP_ANONYMOUS:
        data = _file_bytes(check_fd(p, fd), offset, length)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr & PAGE_MASK or addr + length > USER_TOP:
            raise SyscallError(Errno.EINVAL)
        if flags & MAP_FIXED_NOREPLACE and not p.space.is_free(addr, addr + length):
            raise SyscallError(Errno.EEXIST)
    else:
        found = p.space.find_free(length, addr)
        if found is None:
            raise SyscallError(Errno.ENOMEM)
        addr = found
    if prot and not p.may_map(length):
        raise SyscallError(Errno.ENOMEM)
    p.space.map(addr, length, _prot(prot))
    if data:
        p.mem.write(addr, data)
    return addr


def _file_bytes(fd: int, offset: int, length: int) -> bytes:
    """The file's bytes for a mapping (fewer past end of file: those pages stay zero)."""
    chunks = []
    while length > 0:
        chunk = os.pread(fd, min(length, FILE_CHUNK), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


@syscall("munmap")
def munmap(p: Process, addr: int, length: int) -> int:
    p.space.unmap(addr, _range(addr, length))
    return 0


@syscall("mprotect")
def mprotect(p: Process, addr: int, length: int, prot: int) -> int:
    if addr & PAGE_MASK:
        raise SyscallError(Errno.EINVAL)
    if length and not p.space.protect(addr, page_ceil(length), _prot(prot)):
        raise SyscallError(Errno.ENOMEM)
    return 0


@syscall("mremap")
def mremap(p: Process, old: int, old_size: int, new_size: int, flags: int,
           new_addr: int) -> int:
    if old & PAGE_MASK or new_size == 0 or flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED):
        raise SyscallError(Errno.EINVAL)
    old_size, new_size = page_ceil(old_size), page_ceil(new_size)
    vma = p.space.find(old)
    if vma is None or old + old_size > vma.end:
        raise SyscallError(Errno.EFAULT)
    if flags & MREMAP_FIXED:
        if not flags & MREMAP_MAYMOVE or new_addr & PAGE_MASK:
            raise SyscallError(Errno.EINVAL)
        return _move(p, old, old_size, new_size, new_addr, vma.prot)
    if new_size <= old_size:
        if new_size < old_size:
            p.space.unmap(old + new_size, old_size - new_size)
        return old
    if vma.prot and not p.may_map(new_size - old_size):
        raise SyscallError(Errno.ENOMEM)
    if p.space.is_free(old + old_size, old + new_size):
        p.space.map(old + old_size, new_size - old_size, vma.prot)
        return old
    if not flags & MREMAP_MAYMOVE:
        raise SyscallError(Errno.ENOMEM)
    target = p.space.find_free(new_size)
    if target is None:
        raise SyscallError(Errno.ENOMEM)
    return _move(p, old, old_size, new_size, target, vma.prot)


def _move(p: Process, old: int, old_size: int, new_size: int, target: int, prot: int) -> int:
    p.space.map(target, new_size, prot)
    kept = min(old_size, new_size)
    p.space.copy(target, old, kept)
    p.space.unmap(old, old_size)
    return target


@syscall("madvise")
def madvise(p: Process, addr: int, length: int, advice: int) -> int:
    if addr & PAGE_MASK:
        raise SyscallError(Errno.EINVAL)
    if i32(advice) == MADV_DONTNEED and length:
        length = page_ceil(length)
        if not p.space.is_mapped(addr, addr + length):
            raise SyscallError(Errno.ENOMEM)
        for vma in list(p.space.vmas):
            start, end = max(vma.start, addr), min(vma.end, addr + length)
            if start < end:  # private anonymous memory reads as zero again
                p.space.map(start, end - start, vma.prot)
    return 0


@syscall("msync", "mlock", "munlock")
def memory_noop(p: Process, addr: int, length: int) -> int:
    """Everything is resident and nothing is shared with a file: nothing to do."""
    if addr & PAGE_MASK:
        raise SyscallError(Errno.EINVAL)
    return 0


@syscall("mincore")
def mincore(p: Process, addr: int, length: int, vec: int) -> int:
    length = _range(addr, length)
    if not p.space.is_mapped(addr, addr + length):
        raise SyscallError(Errno.ENOMEM)
    p.space.write(vec, b"\1" * (length >> 12))
    return 0
