"""Servers' and event loops' I/O under popek exec against qemu-riscv64.

C programs in tests/user, cross-built at test time (tests/cross_built.py), must print
the same and exit with the same status as under qemu-riscv64:
- an epoll loop over a pipe, an eventfd and a timerfd fed by a thread, and one over a
  signalfd;
- TCP, UDP and IPv6 on loopback with a server thread, Unix stream and datagram sockets,
  SCM_RIGHTS, sendmmsg/recvmmsg;
- inotify events for a directory;
- bad arguments to the thread, futex, event and socket calls, errno for errno.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cross_built import assert_runs_like_qemu, build

PROGRAMS = ("epoll_loop", "signalfd", "sockets", "inotify", "hostile")


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io")


@pytest.mark.parametrize("name", PROGRAMS)
def test_io_program_matches_qemu(built: Path, name: str, tmp_path: Path):
    assert_runs_like_qemu(build(built, name), tmp_path)
