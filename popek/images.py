"""Where popek finds the guest images it bundles, and the writable copy of its disk.

The images are package data: ``popek/guest`` is, in a checkout, a link to ``images/``
(where ``images/build.sh`` writes them) and, in an installed wheel, a directory holding
their copies. ``$POPEK_IMAGES`` names another directory of the same layout.
"""

from __future__ import annotations

import dataclasses
import lzma
import os
import shutil
from pathlib import Path

from popek.machine.config import MachineConfig


def _bundled() -> Path:
    """The package's image directory, resolved (the VMM's path policy compares real paths).
    Found beside this module rather than through importlib.resources, whose import (~5 ms,
    with tempfile and zipfile) every ``popek run`` paid."""
    guest = (Path(__file__).parent / "guest").resolve()
    if not guest.is_dir():  # e.g. a zip import: the images must be real files
        raise RuntimeError(f"popek's bundled images are not files on disk: {guest}")
    return guest


IMAGES = Path(os.environ["POPEK_IMAGES"]) if os.environ.get("POPEK_IMAGES") else _bundled()
KERNEL = IMAGES / "linux" / "Image.xz"
KERNEL_SMP = IMAGES / "linux" / "Image-smp.xz"
INITRD = IMAGES / "linux" / "initramfs.cpio.gz"
DISK = IMAGES / "linux" / "disk.ext4.xz"
PROGRAMS = IMAGES / "programs"


def state_dir() -> Path:
    """popek's per-user data directory (the default guest's disk lives there)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "popek"


def default_disk() -> Path:
    """A writable copy of the bundled disk, made on first use and kept across runs."""
    disk = state_dir() / "disk.ext4"
    if not disk.exists():
        disk.parent.mkdir(parents=True, exist_ok=True)
        partial = disk.with_suffix(".partial")
        with lzma.open(DISK) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.rename(disk)
    return disk


def with_bundled_guest(config: MachineConfig) -> MachineConfig:
    """``config`` with the bundled kernel and initramfs where it names no kernel."""
    if config.kernel is not None:
        return config
    return dataclasses.replace(config, kernel=KERNEL,
                               initrd=config.initrd if config.initrd is not None else INITRD)
