"""Fuzz target: the guest image loader (``popek.machine.loader``) as a board boots with it.

A kernel, initrd or firmware image may be anything: the board must refuse it with
:class:`ImageError` or :class:`ConfigError` (what ``popek run`` prints as one line and a
VMM worker reports), never another exception, and never use more memory than the guest's
RAM could hold, whatever sizes the image's headers claim or its compressed stream
expands to.

The first byte of an input chooses the role of the rest (bits 0-1: kernel, initrd,
firmware, or a kernel for ``--bios none``, loaded at its physical addresses; the other
images are real ones) and how it is stored (bits 2-3: as it is,
gzip or xz), so mutations reach the parsers behind the decompressors too. The seeds are
a real bare-metal ELF kernel, the header of the bundled Linux Image, and a decompression
bomb.
"""

from __future__ import annotations

import functools
import gzip
import lzma

from popek import images
from popek.machine import virt
from popek.machine.loader import ImageError
from popek.machine.virt import ConfigError, MachineConfig, VirtMachine
from tests.fuzz.harness import MemFile, Target, heap_checked

RAM = 16 << 20
# The board's loaders, measured: they may hold an image as large as RAM and the copies a
# decompressor makes of it (no guest could use a larger one), never more.
virt.load_kernel = heap_checked(virt.load_kernel, 4 * RAM)
virt.read_image = heap_checked(virt.read_image, 4 * RAM)
KERNEL, INITRD, FIRMWARE, BARE_KERNEL = 0, 1, 2, 3
PLAIN, GZIP, XZ = 0, 1, 2
_image = MemFile("fuzz-image")
_kernel = MemFile("fuzz-kernel")


@functools.cache
def _real_kernel() -> bytes:
    from tests.vmm_guests import guest

    return guest("hello").read_bytes()


def one(data: bytes) -> None:
    if not data:
        return
    role, packing, body = data[0] & 3, data[0] >> 2 & 3, data[1:]
    if packing == GZIP:
        body = gzip.compress(body, compresslevel=1, mtime=0)
    elif packing == XZ:
        body = lzma.compress(body, preset=0)
    _image.set(body)
    _kernel.set(_real_kernel())
    config = MachineConfig(kernel=_kernel.path, mem=RAM, rng=False, engine="interp")
    if role == INITRD:
        config.initrd = _image.path
    elif role == FIRMWARE:
        config.bios = str(_image.path)
    else:
        config.kernel = _image.path
        if role == BARE_KERNEL:
            config.bios = "none"
    try:
        VirtMachine(config, lambda out: None)
    except (ImageError, ConfigError):
        pass


def _bomb(size: int) -> bytes:
    """xz that expands to ``size`` zero bytes (about 10 KiB for 64 MiB)."""
    packer, zeros = lzma.LZMACompressor(preset=0), bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(size >> 20)) + packer.flush()


def seeds() -> dict[str, bytes]:
    kernel = _real_kernel()
    linux = lzma.LZMADecompressor().decompress(images.KERNEL.read_bytes(), max_length=4096)
    bomb = _bomb(4 * RAM)
    return {
        "elf-kernel": bytes([KERNEL | PLAIN << 2]) + kernel,
        "elf-kernel-gzip": bytes([KERNEL | GZIP << 2]) + kernel,
        "elf-kernel-bare-metal": bytes([BARE_KERNEL | PLAIN << 2]) + kernel,
        "linux-image-head": bytes([KERNEL | PLAIN << 2]) + linux,
        "linux-image-head-as-firmware": bytes([FIRMWARE | PLAIN << 2]) + linux,
        "initrd-xz": bytes([INITRD | XZ << 2]) + b"070701" + bytes(200),
        "xz-bomb-kernel": bytes([KERNEL | PLAIN << 2]) + bomb,
        "xz-bomb-initrd": bytes([INITRD | PLAIN << 2]) + bomb,
    }


TARGET = Target(one=one, ci_runs=400, max_len=1 << 16, seeds=seeds)
