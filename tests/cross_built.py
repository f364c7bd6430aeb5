"""C test programs from tests/user, cross-built for riscv64 at test time and run under
popek exec and qemu-riscv64 by the tests that name them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_exec import assert_same_as_qemu

SOURCES = Path(__file__).resolve().parent / "user"
CC = "riscv64-linux-gnu-gcc"
INSTALL = "apt-get install gcc-riscv64-linux-gnu libc6-riscv64-cross (./quickstart does)"


def build(out: Path, name: str) -> Path:
    """tests/user/NAME.c as a static riscv64 program (both runs then use one C library)."""
    compiler = shutil.which(CC)
    if compiler is None:
        pytest.fail(f"{CC} is needed to build the test programs: {INSTALL}")
    program = out / name
    if not program.exists():
        subprocess.run([compiler, "-O2", "-static", "-pthread", "-Wall", "-Werror",
                        "-o", str(program), str(SOURCES / f"{name}.c"), "-lm"], check=True)
    return program


def assert_runs_like_qemu(program: Path, workdir: Path) -> None:
    """Same stdout and exit status as under qemu-riscv64, and no host traceback; the
    program gets a directory of its own to use (sockets, watched files)."""
    done = assert_same_as_qemu([str(program), str(workdir)])
    assert b"Traceback" not in done.stderr
