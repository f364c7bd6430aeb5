"""Loading riscv64 ELF executables (static, dynamic, PIE) into an address space.

Follows the kernel's binfmt_elf: every PT_LOAD segment is mapped from the page
holding its file offset, the rest of its last file page and its bss are zero, and a
program with PT_INTERP gets its interpreter (the dynamic linker) loaded beside it;
execution then starts in the interpreter, which finds the program through the auxv.
Validation happens before anything is mapped, so a failed execve leaves the old
image intact.

The file and program headers are read with :mod:`struct` (binfmt_elf reads no more):
pyelftools, which ``popek disasm`` uses for sections and symbols, took ~25 ms to import,
an eighth of a short program's whole ``popek exec``.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from popek.user.address_space import (
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    USER_TOP,
    AddressSpace,
    page_ceil,
    page_floor,
)
from popek.user.linux_errno import Errno

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1  # e_ident[4] and e_ident[5]
EM_RISCV = 243
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_INTERP, PT_PHDR = 1, 3, 6
PIE_BASE = 0x2AAAAAB000  # where ET_DYN programs go, as qemu puts them (2/3 of the space)
PF_X, PF_W, PF_R = 1, 2, 4
# Elf64_Ehdr after e_ident: type, machine, version, entry, phoff, shoff, flags, ehsize,
# phentsize, phnum, shentsize, shnum, shstrndx.
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
PHDR_SIZE = PHDR.size  # 56
PATH_MAX = 4096  # the longest interpreter name binfmt_elf accepts, with its NUL


class ExecError(Exception):
    """An image cannot be executed; ``errno`` is what execve returns."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


# The records below are NamedTuples rather than frozen dataclasses: making a frozen
# dataclass compiles six methods, ~0.5 ms a class of every popek exec's start.
class Segment(NamedTuple):
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    prot: int


class ElfImage(NamedTuple):
    """A validated ELF file, not yet mapped."""

    path: str
    data: bytes
    dynamic: bool  # ET_DYN: may be loaded anywhere
    entry: int
    phoff: int
    phentsize: int
    phnum: int
    segments: tuple[Segment, ...]
    interpreter: str | None
    phdr_vaddr: int | None  # PT_PHDR, if present

    @property
    def span(self) -> tuple[int, int]:
        """Page-aligned [low, high) of the loadable segments before relocation."""
        low = min(page_floor(s.vaddr) for s in self.segments)
        high = max(page_ceil(s.vaddr + s.memsz) for s in self.segments)
        return low, high


class LoadedProgram(NamedTuple):
    """Where a program ended up: what the initial stack's auxv and brk need."""

    entry: int  # first instruction (the interpreter's, for dynamic programs)
    program_entry: int  # AT_ENTRY
    phdr: int
    phentsize: int
    phnum: int
    interp_base: int  # AT_BASE, 0 without an interpreter
    brk: int  # first address after the program's image


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse(path: str, data: bytes) -> ElfImage:
    """Validate ``data`` as a riscv64 executable and extract what loading needs."""
    if not is_elf(data):
        raise ExecError(f"{path}: not an ELF file", Errno.ENOEXEC)
    if len(data) < EHDR.size:
        raise ExecError(f"{path}: malformed ELF: truncated header", Errno.ENOEXEC)
    (ident, kind, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _,
     _) = EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or machine != EM_RISCV:
        raise ExecError(f"{path}: not a RISC-V 64-bit ELF (class {ident[4]}, data "
                        f"{ident[5]}, machine {machine})", Errno.ENOEXEC)
    if kind not in (ET_EXEC, ET_DYN):
        raise ExecError(f"{path}: not an executable (e_type {kind})", Errno.ENOEXEC)
    # binfmt_elf's checks: whole 64-bit program headers, at most 64 KiB of them (and
    # here: in the file).
    table = PHDR_SIZE * phnum
    if phentsize != PHDR_SIZE or not 0 < table <= 65536 or phoff + table > len(data):
        raise ExecError(f"{path}: malformed program header table", Errno.ENOEXEC)
    segments, interpreter, phdr = [], None, None
    for p_type, flags, offset, vaddr, _, filesz, memsz, _ in PHDR.iter_unpack(
            data[phoff:phoff + table]):
        if p_type == PT_LOAD and memsz:
            prot = ((PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0)
                    | (PROT_EXEC if flags & PF_X else 0))
            segments.append(Segment(vaddr, memsz, offset, filesz, prot))
        elif p_type == PT_INTERP:
            interpreter = _interpreter(path, data, offset, filesz)
        elif p_type == PT_PHDR:
            phdr = vaddr
    if not segments:
        raise ExecError(f"{path}: no loadable segments", Errno.ENOEXEC)
    dynamic = kind == ET_DYN
    for s in segments:
        if s.filesz > s.memsz or s.offset + s.filesz > len(data) or \
                (s.vaddr - s.offset) % 4096:
            raise ExecError(f"{path}: malformed segment at {s.vaddr:#x}", Errno.ENOEXEC)
        if not dynamic and s.vaddr + s.memsz > USER_TOP:  # (where ET_DYN goes is popek's)
            raise ExecError(f"{path}: segment at {s.vaddr:#x} ends beyond the address space",
                            Errno.ENOMEM)
    return ElfImage(path, data, dynamic, entry, phoff, phentsize, phnum, tuple(segments),
                    interpreter, phdr)


def _interpreter(path: str, data: bytes, offset: int, size: int) -> str:
    """PT_INTERP's name, checked as binfmt_elf does: NUL-terminated, at most PATH_MAX."""
    name = data[offset:offset + size]
    if not 2 <= size <= PATH_MAX or len(name) != size or name[-1] != 0:
        raise ExecError(f"{path}: malformed ELF: bad PT_INTERP", Errno.ENOEXEC)
    return os.fsdecode(name[:name.index(0)])


def read_image(path: str) -> ElfImage:
    """Read and validate the executable at ``path`` (a host path)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ExecError(f"{path}: is a directory", Errno.EACCES) from None
    except FileNotFoundError:
        raise ExecError(f"{path}: no such file", Errno.ENOENT) from None
    except PermissionError:
        raise ExecError(f"{path}: permission denied", Errno.EACCES) from None
    except OSError as e:
        raise ExecError(f"{path}: {e.strerror}", Errno.EIO) from None
    return parse(path, data)


def resolve_interpreter(name: str, sysroot: str | None) -> str:
    """The host path of the dynamic linker ``name``: looked up in the sysroot first."""
    if sysroot:
        candidate = os.path.join(sysroot, name.lstrip("/"))
        if os.path.exists(candidate):
            return candidate
    if os.path.exists(name):
        return name
    where = f" (sysroot {sysroot})" if sysroot else " (no sysroot given)"
    raise ExecError(f"ELF interpreter {name} not found{where}", Errno.ENOENT)


def _map_image(space: AddressSpace, image: ElfImage, bias: int) -> None:
    for s in image.segments:
        start = page_floor(bias + s.vaddr)
        end = page_ceil(bias + s.vaddr + s.memsz)
        space.map(start, end - start, s.prot)
        file_start = page_floor(s.offset)
        space.mem.write(start, image.data[file_start:s.offset + s.filesz])


def _bias(space: AddressSpace, image: ElfImage, preferred: int | None) -> int:
    if not image.dynamic:
        return 0
    low, high = image.span
    base = space.find_free(high - low, preferred or 0)
    if base is None:
        raise ExecError(f"{image.path}: no room for {high - low:#x} bytes", Errno.ENOMEM)
    return base - low


def load(space: AddressSpace, image: ElfImage, interp: ElfImage | None) -> LoadedProgram:
    """Map ``image`` (and its interpreter) into an empty ``space``."""
    bias = _bias(space, image, PIE_BASE)
    _map_image(space, image, bias)
    interp_base = 0
    entry = image.entry + bias
    if interp is not None:
        ibias = _bias(space, interp, None)
        _map_image(space, interp, ibias)
        interp_base = ibias + interp.span[0]
        entry = interp.entry + ibias
    if image.phdr_vaddr is not None:
        phdr = image.phdr_vaddr + bias
    else:  # the program headers sit in the first segment that covers their file offset
        first = next((s for s in image.segments
                      if s.offset <= image.phoff < s.offset + s.filesz), image.segments[0])
        phdr = first.vaddr - first.offset + image.phoff + bias
    brk = max(page_ceil(bias + s.vaddr + s.memsz) for s in image.segments)
    return LoadedProgram(entry, image.entry + bias, phdr, image.phentsize, image.phnum,
                         interp_base, brk)
