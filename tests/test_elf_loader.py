"""The process VM's ELF loader reads what Linux's binfmt_elf reads (the ELF header and the
program headers) and refuses what it refuses; sections are no business of either."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from popek.user import elf_loader
from popek.user.elf_loader import EHDR, PHDR, PT_INTERP, ExecError
from popek.user.linux_errno import Errno

PROGRAMS = Path(__file__).resolve().parents[1] / "images" / "programs"


def _phdrs(data: bytes) -> list[tuple[int, tuple]]:
    """(offset, fields) of each program header of ``data``."""
    header = EHDR.unpack_from(data)
    phoff, phnum = header[5], header[10]
    return [(phoff + i * PHDR.size, PHDR.unpack_from(data, phoff + i * PHDR.size))
            for i in range(phnum)]


def test_a_program_reads_as_its_headers_say():
    data = (PROGRAMS / "hello-dynamic").read_bytes()
    image = elf_loader.parse("hello-dynamic", data)
    assert image.dynamic and image.interpreter == "/lib/ld-linux-riscv64-lp64d.so.1"
    loads = [fields for _, fields in _phdrs(data) if fields[0] == 1 and fields[6]]
    assert [(s.vaddr, s.memsz, s.offset, s.filesz) for s in image.segments] == \
        [(f[3], f[6], f[2], f[5]) for f in loads]


def test_corrupt_section_headers_do_not_stop_a_program():
    data = bytearray((PROGRAMS / "hello-static").read_bytes())
    struct.pack_into("<Q", data, 40, 1 << 62)  # e_shoff far beyond the file
    struct.pack_into("<H", data, 58, 3)  # e_shentsize nonsense
    image = elf_loader.parse("hello-static", bytes(data))
    assert image.entry == EHDR.unpack_from(data)[4]


@pytest.mark.parametrize("interp", [b"/lib/ld.so", b"", b"/" * 5000 + b"\0"])
def test_an_interpreter_name_binfmt_elf_refuses_is_enoexec(interp: bytes):
    data = bytearray((PROGRAMS / "hello-dynamic").read_bytes())
    at, fields = next((at, f) for at, f in _phdrs(data) if f[0] == PT_INTERP)
    offset = len(data)  # the new name goes at the end of the file
    data += interp
    PHDR.pack_into(data, at, *fields[:2], offset, *fields[3:5], len(interp), len(interp),
                   fields[7])
    with pytest.raises(ExecError) as caught:
        elf_loader.parse("bad-interp", bytes(data))
    assert caught.value.errno == Errno.ENOEXEC
