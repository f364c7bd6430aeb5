"""Loading riscv64 ELF executables (static, dynamic, PIE) into an address space.

Follows the kernel's binfmt_elf: every PT_LOAD segment is mapped from the page
holding its file offset, the rest of its last file page and its bss are zero, and a
program with PT_INTERP gets its interpreter (the dynamic linker) loaded beside it;
execution then starts in the interpreter, which finds the program through the auxv.
Validation happens before anything is mapped, so a failed execve leaves the old
image intact.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

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
EM_RISCV = "EM_RISCV"
PIE_BASE = 0x2AAAAAB000  # where ET_DYN programs go, as qemu puts them (2/3 of the space)
PF_X, PF_W, PF_R = 1, 2, 4
PHDR_SIZE = 56  # an Elf64_Phdr


class ExecError(Exception):
    """An image cannot be executed; ``errno`` is what execve returns."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    offset: int
    filesz: int
    prot: int


@dataclass(frozen=True)
class ElfImage:
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


@dataclass(frozen=True)
class LoadedProgram:
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
    try:
        elf = ELFFile(io.BytesIO(data))
        header = elf.header
        if elf.elfclass != 64 or not elf.little_endian or header["e_machine"] != EM_RISCV:
            raise ExecError(f"{path}: not a RISC-V 64-bit ELF ({header['e_machine']})",
                            Errno.ENOEXEC)
        if header["e_type"] not in ("ET_EXEC", "ET_DYN"):
            raise ExecError(f"{path}: not an executable ({header['e_type']})", Errno.ENOEXEC)
        # binfmt_elf's checks: whole 64-bit program headers, at most 64 KiB of them (and
        # here: in the file), so a header cannot make the loader read one entry 65535 times.
        table = PHDR_SIZE * header["e_phnum"]
        if header["e_phentsize"] != PHDR_SIZE or not 0 < table <= 65536 \
                or header["e_phoff"] + table > len(data):
            raise ExecError(f"{path}: malformed program header table", Errno.ENOEXEC)
        segments, interpreter, phdr = [], None, None
        for seg in elf.iter_segments():
            kind = seg["p_type"]
            if kind == "PT_LOAD" and seg["p_memsz"]:
                flags = seg["p_flags"]
                prot = ((PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0)
                        | (PROT_EXEC if flags & PF_X else 0))
                segments.append(Segment(seg["p_vaddr"], seg["p_memsz"], seg["p_offset"],
                                        seg["p_filesz"], prot))
            elif kind == "PT_INTERP":
                interpreter = seg.get_interp_name()
            elif kind == "PT_PHDR":
                phdr = seg["p_vaddr"]
    except (ELFError, OverflowError, ValueError) as e:
        # pyelftools trusts header offsets (a seek beyond 2^63 overflows) and decodes the
        # interpreter's name as UTF-8 (ValueError): both are malformed files to execve.
        raise ExecError(f"{path}: malformed ELF: {e}", Errno.ENOEXEC) from None
    if not segments:
        raise ExecError(f"{path}: no loadable segments", Errno.ENOEXEC)
    dynamic = header["e_type"] == "ET_DYN"
    for s in segments:
        if s.filesz > s.memsz or s.offset + s.filesz > len(data) or \
                (s.vaddr - s.offset) % 4096:
            raise ExecError(f"{path}: malformed segment at {s.vaddr:#x}", Errno.ENOEXEC)
        if not dynamic and s.vaddr + s.memsz > USER_TOP:  # (where ET_DYN goes is popek's)
            raise ExecError(f"{path}: segment at {s.vaddr:#x} ends beyond the address space",
                            Errno.ENOMEM)
    return ElfImage(path, data, dynamic, header["e_entry"],
                    header["e_phoff"], header["e_phentsize"], header["e_phnum"],
                    tuple(segments), interpreter, phdr)


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
