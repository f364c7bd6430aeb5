"""Loading guest images: kernels (RISC-V Linux ``Image`` or ELF), initrds, firmware.

Images may be compressed (xz, gzip) as the bundled ones are. Every problem with
an image becomes an :class:`ImageError` with a one-line message for the user.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from popek.machine.image_cache import ImageCache

XZ_MAGIC, GZIP_MAGIC = b"\xfd7zXZ\0", b"\x1f\x8b"
IMAGE_MAGIC2 = b"RSC\x05"  # offset 56 of a RISC-V Linux Image header
IMAGE_HEADER_SIZE = 64
EM_RISCV = 243
PHDR_SIZE = 56  # an Elf64_Phdr


class ImageError(Exception):
    """A guest image that cannot be used (missing, truncated, wrong architecture...)."""


# NamedTuples, not dataclasses: making a dataclass compiles its methods, ~0.5 ms a class
# of every popek run's start.
class Segment(NamedTuple):
    """Bytes to place at a physical address (plus zero fill up to ``memsz``)."""

    addr: int
    data: bytes
    memsz: int


class Kernel(NamedTuple):
    segments: list[Segment]
    entry: int

    @property
    def end(self) -> int:
        return max(s.addr + s.memsz for s in self.segments)


def read_image(path: Path, what: str, limit: int,
               opener: Callable[..., int] = os.open, cache: ImageCache | None = None) -> bytes:
    """The file's bytes, decompressed if it is xz or gzip (found in ``cache`` if it holds
    them, and kept there if not). ``opener`` opens ``path`` as os.open does (a VMM
    worker's finds the descriptor the VMM opened for it).

    An image larger than ``limit`` bytes (the guest's RAM, which no loadable image
    exceeds) is refused before more is read or decompressed: a small compressed file
    may expand to any size, and a path may name an endless file."""
    try:
        with open(opener(path, os.O_RDONLY), "rb") as image:
            raw = image.read(limit + 1)
    except FileNotFoundError:
        raise ImageError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(f"{what} is a directory: {path}") from None
    except OSError as err:
        raise ImageError(f"cannot read {what} {path}: {err.strerror}") from None
    except ValueError:  # a NUL in the path, which no file name holds
        raise ImageError(f"{what} {str(path)!r} is not a file name") from None
    if raw.startswith((XZ_MAGIC, GZIP_MAGIC)):
        data = cache.get(raw) if cache is not None else None
        if data is None:
            data = _decompressed(raw, path, what, limit)
            if cache is not None and len(data) <= limit:
                cache.put(raw, data)
        raw = data
    if len(raw) > limit:
        raise ImageError(f"{what} {path} is larger than the guest's {limit >> 20} MiB of RAM")
    return raw


def _decompressed(raw: bytes, path: Path, what: str, limit: int) -> bytes:
    """xz or gzip ``raw``, decompressed up to ``limit`` + 1 bytes."""
    import gzip  # (with lzma) only when no cache has the image
    import lzma

    try:
        if raw.startswith(XZ_MAGIC):
            return lzma.LZMAFile(io.BytesIO(raw)).read(limit + 1)
        return gzip.GzipFile(fileobj=io.BytesIO(raw)).read(limit + 1)
    except (lzma.LZMAError, EOFError, OSError) as err:
        raise ImageError(f"{what} {path} is corrupt or truncated ({err})") from None


def load_kernel(path: Path, ram_base: int, ram_size: int,
                opener: Callable[..., int] = os.open, *, physical: bool = False,
                cache: ImageCache | None = None) -> Kernel:
    """Parse a kernel as QEMU's ``-kernel`` would: an ELF, or a RISC-V Linux Image.

    ``physical`` (``--bios none``): only an ELF, loaded at its physical addresses and
    nowhere else, since it runs from reset with no firmware to place it. ``cache`` may
    hold the decompressed kernel (see read_image)."""
    data = read_image(path, "kernel", ram_size, opener, cache)
    if data.startswith(b"\x7fELF"):
        return _load_elf(path, data, ram_base, ram_size, physical)
    if physical:
        raise ImageError(f"kernel {path} is not an ELF file (--bios none runs an ELF "
                         "from its entry)")
    if len(data) < IMAGE_HEADER_SIZE:
        raise ImageError(f"kernel {path} is truncated ({len(data)} bytes)")
    if data[56:60] != IMAGE_MAGIC2:
        raise ImageError(f"kernel {path} is not a RISC-V Linux Image or ELF file")
    text_offset, image_size = struct.unpack_from("<QQ", data, 8)
    _check_pe_complete(path, data)
    load = ram_base + (text_offset or 0x200000)
    memsz = max(image_size, len(data))
    if load + memsz > ram_base + ram_size:
        raise ImageError(f"kernel {path} ({memsz >> 20} MiB) does not fit in guest RAM")
    return Kernel([Segment(load, data, memsz)], load)


def _check_pe_complete(path: Path, data: bytes) -> None:
    """Images with an EFI stub carry a PE header that tells their true file size."""
    if data[:2] != b"MZ":
        return
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if pe + 24 > len(data) or data[pe:pe + 4] != b"PE\0\0":
        return
    nsections = struct.unpack_from("<H", data, pe + 6)[0]
    opt_size = struct.unpack_from("<H", data, pe + 20)[0]
    table = pe + 24 + opt_size
    for i in range(nsections):
        entry = table + 40 * i
        if entry + 40 > len(data):
            raise ImageError(f"kernel {path} is truncated")
        raw_size, raw_ptr = struct.unpack_from("<II", data, entry + 16)
        if raw_ptr + raw_size > len(data):
            raise ImageError(f"kernel {path} is truncated")


def _place(addr: int, ram_base: int, ram_size: int) -> int:
    """A vmlinux links at its virtual address; like QEMU, fold it into RAM."""
    if ram_base <= addr < ram_base + ram_size:
        return addr
    return (addr & 0x7FFFFFFF) | ram_base


def _load_elf(path: Path, data: bytes, ram_base: int, ram_size: int,
              physical: bool) -> Kernel:
    # pyelftools (~5 MiB of modules) only for an ELF kernel, not for the bundled Image
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] != "EM_RISCV" or elf.elfclass != 64:
            raise ImageError(f"kernel {path} is not a 64-bit RISC-V ELF ({elf['e_machine']})")
        # Whole program headers, in the file: else pyelftools may read one entry 65535 times.
        if elf["e_phentsize"] != PHDR_SIZE or \
                elf["e_phoff"] + PHDR_SIZE * elf["e_phnum"] > len(data):
            raise ImageError(f"kernel {path} has a malformed program header table")
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or not seg["p_memsz"]:  # (empty: nothing to load)
                continue
            offset, size = seg["p_offset"], seg["p_filesz"]
            if offset + size > len(data):
                raise ImageError(f"kernel {path} is truncated")
            if size > seg["p_memsz"]:  # the ELF spec forbids it; RAM is checked for memsz
                raise ImageError(f"kernel {path} has a segment larger in the file than "
                                 "in memory")
            addr = seg["p_paddr"] if physical else _place(seg["p_paddr"], ram_base, ram_size)
            segments.append(Segment(addr, data[offset:offset + size], seg["p_memsz"]))
        entry = elf["e_entry"] if physical else _place(elf["e_entry"], ram_base, ram_size)
    except (ELFError, OverflowError, ValueError) as err:
        # pyelftools trusts the offsets in a file's headers: seeking to one beyond 2^63
        # overflows, a malformed name fails to decode (ValueError).
        raise ImageError(f"kernel {path} is not a valid ELF file ({err})") from None
    if not segments:
        raise ImageError(f"kernel {path} has nothing to load")
    for s in segments:
        if not (ram_base <= s.addr and s.addr + s.memsz <= ram_base + ram_size):
            raise ImageError(f"kernel {path} loads at {s.addr:#x}, outside guest RAM "
                             f"({ram_base:#x}-{ram_base + ram_size - 1:#x})")
    if physical and not any(s.addr <= entry < s.addr + s.memsz for s in segments):
        raise ImageError(f"kernel {path}: its entry {entry:#x} is not in what it loads")
    return Kernel(segments, entry)
