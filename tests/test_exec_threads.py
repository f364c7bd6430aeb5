"""Threaded and networked programs under popek exec against qemu-riscv64.

C programs in tests/user are cross-built here with Debian's riscv64 gcc (static, so
both runs use the same C library) and must print the same and exit with the same
status under popek's process VM as under qemu-riscv64:
- pthread mutexes, condition variables, barriers, rwlocks, TLS, cancellation, timed
  waits and a pipe between threads;
- futex calls made directly (timeouts, requeue, bitsets, wake-op), a robust mutex;
- a main thread that leaves first, and a process ended by one thread's exit while
  others block and spin;
- signals directed to threads, per-thread masks and alternate stacks, a blocked read
  interrupted while other threads run, sigwait in a collector thread;
- an epoll loop over a pipe, an eventfd and a timerfd fed by a thread, and one over a
  signalfd;
- TCP, UDP and IPv6 on loopback, Unix stream and datagram sockets, SCM_RIGHTS;
- inotify events for a directory;
- bad arguments to all of these, errno for errno.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_exec import assert_same_as_qemu

SOURCES = Path(__file__).resolve().parent / "user"
CC = "riscv64-linux-gnu-gcc"
INSTALL = "apt-get install gcc-riscv64-linux-gnu libc6-riscv64-cross (./quickstart does)"
PROGRAMS = ("pthreads", "futex", "thread_signals", "sigwait", "thread_exit", "epoll_loop",
            "signalfd", "sockets", "inotify", "hostile")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test programs, cross-built once per session."""
    compiler = shutil.which(CC)
    if compiler is None:
        pytest.fail(f"{CC} is needed to build the threaded test programs: {INSTALL}")
    out = tmp_path_factory.mktemp("threaded")
    for name in PROGRAMS:
        subprocess.run([compiler, "-O2", "-static", "-pthread", "-Wall", "-Werror",
                        "-o", str(out / name), str(SOURCES / f"{name}.c")], check=True)
    return out


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_matches_qemu(built: Path, name: str, tmp_path: Path):
    done = assert_same_as_qemu([str(built / name), str(tmp_path)])  # a directory to use
    assert b"Traceback" not in done.stderr
