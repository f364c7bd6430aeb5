"""Fuzz target: the process VM's ELF loader (``popek.user.elf_loader``) and ``popek disasm``'s
ELF reader, on the same bytes.

``popek exec`` and a guest's execve hand the loader any file; it must end in
:class:`ExecError` (the errno execve returns) or in a mapped program, never another
exception, and never hold more memory than the file could need whatever its headers
claim (segments are mapped in the sparse address space, not copied). The input is the
file; when it names an interpreter, the same file stands in for it, so the dynamic
loading path runs too. ``disassemble_elf`` must end in :class:`DisasmError` or in lines.
"""

from __future__ import annotations

from popek.cpu.physmem import PhysicalMemory
from popek.isa.disasm import DisasmError, disassemble_elf
from popek.user import elf_loader
from popek.user.address_space import USER_TOP, AddressSpace
from popek.user.elf_loader import ExecError
from popek.user.process import MMAP_TOP
from tests.fuzz.harness import ROOT, MemFile, Target, heap_checked

HEAP_LIMIT = 16 << 20  # the file is at most max_len bytes: a few copies, and pyelftools
_mem = PhysicalMemory(0, USER_TOP, sparse=True)  # what a Process maps, made once
_file = MemFile("fuzz-elf")
_parse = heap_checked(elf_loader.parse, HEAP_LIMIT)
_load = heap_checked(elf_loader.load, HEAP_LIMIT)


def one(data: bytes) -> None:
    try:
        image = _parse("fuzz.elf", data)
    except ExecError:
        pass
    else:
        space = AddressSpace(_mem, MMAP_TOP)
        try:
            loaded = _load(space, image, image if image.interpreter else None)
            # (any entry point will do: as on Linux, a bad one faults at the first fetch)
            assert all(vma.end <= USER_TOP for vma in space.vmas), space.vmas
            assert loaded.brk <= USER_TOP, loaded
        except ExecError:
            pass
        finally:
            space.clear()
    _file.set(data)
    try:
        for line in disassemble_elf(_file.path):
            assert isinstance(line, str)
    except DisasmError:
        pass


def seeds() -> dict[str, bytes]:
    """A small dynamic program (the bundled one) and a small static one (a bare-metal
    guest: a whole static libc program is too large to disassemble at fuzzing speed)."""
    from tests.vmm_guests import guest

    return {"hello-dynamic": (ROOT / "images" / "programs" / "hello-dynamic").read_bytes(),
            "bare-metal-static": guest("hello").read_bytes()}


TARGET = Target(one=one, ci_runs=400, max_len=1 << 16, seeds=seeds, address_space=None)
