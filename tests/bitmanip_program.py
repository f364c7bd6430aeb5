"""tests/user/bitmanip.c built for riscv64 Linux with the bit-manipulation extensions.

gcc 12 (Debian's gcc-riscv64-linux-gnu) knows Zba, Zbb, Zbc and Zbs; the program is linked
dynamically, so its own code is small enough to compare with objdump quickly.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent / "user" / "bitmanip.c"
GCC = "riscv64-linux-gnu-gcc"
MARCH = "rv64gc_zba_zbb_zbc_zbs"


def build(directory: Path) -> Path:
    gcc = shutil.which(GCC)
    if gcc is None:
        pytest.fail(f"{GCC} not found: apt-get install gcc-riscv64-linux-gnu")
    out = directory / "bitmanip"
    subprocess.run([gcc, "-O2", f"-march={MARCH}", "-o", str(out), str(SOURCE)], check=True)
    return out
