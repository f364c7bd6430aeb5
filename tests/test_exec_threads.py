"""Threaded programs under popek exec against qemu-riscv64, under every engine tier
(thread switches happen inside the code each tier runs).

C programs in tests/user, cross-built at test time (tests/cross_built.py), must print
the same and exit with the same status as under qemu-riscv64:
- pthread mutexes, condition variables, barriers, rwlocks, TLS, cancellation, timed
  waits and a pipe between threads;
- futex calls made directly (timeouts, requeue, bitsets, wake-op), a robust mutex;
- a main thread that leaves first, and a process ended by one thread's exit while
  others block and spin;
- signals directed to threads, per-thread masks and alternate stacks, a blocked read
  interrupted while other threads run, sigwait in a collector thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cross_built import assert_runs_like_qemu, build

PROGRAMS = ("pthreads", "futex", "thread_signals", "sigwait", "thread_exit")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("threaded")


@pytest.mark.parametrize("name", PROGRAMS)
def test_threaded_program_matches_qemu(built: Path, name: str, tmp_path: Path):
    assert_runs_like_qemu(build(built, name), tmp_path)
