"""Decompressed guest images kept on disk, so that a boot does not decompress its kernel
again: lzma took ~0.13 s of every ``popek run`` of the bundled ``Image.xz``, as long as
all the rest before the guest's first instruction.

Layout: ``$POPEK_IMAGE_CACHE/HASH`` (``off``: no cache), by default
``$XDG_CACHE_HOME/popek/decompressed/HASH`` (``~/.cache`` without the variable), HASH
being the BLAKE2b of the compressed file's bytes, so the same image under any name or
path is one entry, and a changed file another. An entry is a header (magic, the
content's length and CRC-32) and the content: a truncated or altered entry fails the
check, is ignored, and is written again from the image. Entries are written to a
temporary file beside them and renamed into place, so a concurrent run sees a whole
entry or none; two runs that miss at once both decompress and write the same bytes, and
the last rename wins. Beyond MAX_BYTES the least recently used entries go (an entry's
mtime is refreshed when it is used). A directory that cannot be written costs the
decompression, nothing else.

A VMM worker keeps none: it reads only the descriptors its VMM opened, and writes no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import zlib
from pathlib import Path

MAGIC = b"POPEKIMG"
# Magic, content length, CRC-32 of the content: it finds a torn or damaged entry at a
# fifth of BLAKE2b's cost (~1 ms for the bundled kernel); the name, which must tell
# images apart, is BLAKE2b's.
HEADER = struct.Struct("<8sQI")
MAX_BYTES = 256 << 20  # a few dozen kernels and initramfs
ENV_VAR = "POPEK_IMAGE_CACHE"  # a directory, or "off"


def default_cache() -> ImageCache | None:
    """The cache in ``$POPEK_IMAGE_CACHE`` (None if "off"), else in
    ``$XDG_CACHE_HOME/popek/decompressed`` (``~/.cache/popek/decompressed``)."""
    chosen = os.environ.get(ENV_VAR)
    if chosen == "off":
        return None
    if chosen:
        return ImageCache(Path(chosen))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return ImageCache(Path(base) / "popek" / "decompressed")


class ImageCache:
    """Decompressed images by the hash of their compressed bytes, in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, compressed: bytes) -> Path:
        """Where the content of the image whose file holds ``compressed`` is kept."""
        return self.root / hashlib.blake2b(compressed, digest_size=20).hexdigest()

    def get(self, compressed: bytes) -> bytes | None:
        """The kept content of ``compressed``, or None if no intact entry holds it."""
        path = self.entry(compressed)
        try:
            with open(path, "rb") as f:
                header, content = f.read(HEADER.size), f.read()
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used: the last to go
        if len(header) != HEADER.size:
            return None
        magic, length, crc = HEADER.unpack(header)
        if magic != MAGIC or length != len(content) or zlib.crc32(content) != crc:
            return None
        return content

    def put(self, compressed: bytes, content: bytes) -> None:
        """Keep ``content``, what ``compressed`` decompresses to (if the directory can be
        written), then trim the directory to MAX_BYTES."""
        path = self.entry(compressed)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(content), zlib.crc32(content)))
                f.write(content)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
            return
        self._trim()

    def _trim(self) -> None:
        """Remove the least recently used entries while the directory holds more than
        MAX_BYTES (a temporary file of a writer that died goes the same way)."""
        entries = []
        with contextlib.suppress(OSError), os.scandir(self.root) as found:
            for item in found:
                with contextlib.suppress(OSError):
                    stat = item.stat(follow_symlinks=False)
                    entries.append((stat.st_mtime, stat.st_size, item.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= MAX_BYTES:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)  # a run reading it keeps its open file
            total -= size
