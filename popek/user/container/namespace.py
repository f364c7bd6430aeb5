"""What a container's processes share: the PID table, hostname, memory and CPU in use.

A container's processes are host processes (fork is the host's fork), so what they
share lives in one anonymous shared mapping made before the first fork: every
descendant inherits it, and nothing outside the container can reach it. Guest pid N
is slot N of the table and holds the host pid; the command is 1 and its children are
numbered from 2, as in a new PID namespace. A process fills in its own slot and its
parent fills in the same one after fork, whichever comes first, so the child knows its
number from its first instruction. The slot is freed when the process is reaped.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

MAX_PIDS = 4096  # guest pids 1..MAX_PIDS-1; fork fails with EAGAIN beyond
HOSTNAME_MAX = 64  # __NEW_UTS_LEN
HEADER = struct.Struct("<i68s")  # next pid to try, hostname (NUL-terminated)
COMM_SIZE = 16  # TASK_COMM_LEN
PID_TABLE = HEADER.size
MEMORY_TABLE = PID_TABLE + 4 * MAX_PIDS
COMM_TABLE = MEMORY_TABLE + 8 * MAX_PIDS
CPU_TABLE = COMM_TABLE + COMM_SIZE * MAX_PIDS
SIZE = CPU_TABLE + 8 * MAX_PIDS
FIRST_CHILD = 2


class NoPidLeft(Exception):
    """Every guest pid is in use."""


class Namespace:
    """The shared state of one container (PID and UTS namespaces, memory accounting)."""

    def __init__(self, hostname: bytes, memory_limit: int | None) -> None:
        self._shared = mmap.mmap(-1, SIZE)  # MAP_SHARED | MAP_ANONYMOUS: kept across fork
        self._pids = memoryview(self._shared)[PID_TABLE:MEMORY_TABLE].cast("i")
        self._memory = memoryview(self._shared)[MEMORY_TABLE:COMM_TABLE].cast("q")
        self._cpu = memoryview(self._shared)[CPU_TABLE:SIZE].cast("d")
        import multiprocessing  # ~3 ms: not for popek exec outside containers (HOSTNAME_MAX)

        self._lock = multiprocessing.get_context("fork").Lock()
        self.memory_limit = memory_limit
        HEADER.pack_into(self._shared, 0, FIRST_CHILD, hostname[:HOSTNAME_MAX])
        self._pids[1] = os.getpid()
        self._cached = (os.getpid(), 1)

    # -- PIDs ------------------------------------------------------------------------------
    def register(self, host_pid: int) -> int:
        """The guest pid of ``host_pid`` (a new process: given the next free number)."""
        with self._lock:
            found = self._find(host_pid)
            if found:
                return found
            start = HEADER.unpack_from(self._shared, 0)[0]
            for offset in range(MAX_PIDS - FIRST_CHILD):
                guest = FIRST_CHILD + (start - FIRST_CHILD + offset) % (MAX_PIDS - FIRST_CHILD)
                if not self._pids[guest]:
                    self._pids[guest] = host_pid
                    self._memory[guest] = 0
                    self._cpu[guest] = 0.0
                    self._shared[COMM_TABLE + COMM_SIZE * guest:
                                 COMM_TABLE + COMM_SIZE * (guest + 1)] = bytes(COMM_SIZE)
                    struct.pack_into("<i", self._shared, 0, guest + 1)
                    return guest
        raise NoPidLeft

    def release(self, host_pid: int) -> None:
        """Free a reaped process's number."""
        with self._lock:
            guest = self._find(host_pid)
            if guest:
                self._pids[guest] = 0
                self._memory[guest] = 0

    def _find(self, host_pid: int) -> int:
        try:
            return self._pids.tolist().index(host_pid, 1)
        except ValueError:
            return 0

    def self_pid(self) -> int:
        """The calling process's guest pid."""
        host = os.getpid()
        if self._cached[0] != host:  # a fork child: look itself up (or claim its slot)
            self._cached = (host, self.register(host))
        return self._cached[1]

    def to_guest(self, host_pid: int) -> int:
        """A host pid as the container sees it: 0 for a process outside (as Linux does)."""
        return self._find(host_pid) if host_pid > 0 else 0

    def to_host(self, guest_pid: int) -> int | None:
        if 0 < guest_pid < MAX_PIDS and self._pids[guest_pid]:
            return self._pids[guest_pid]
        return None

    def members(self) -> list[int]:
        """Host pids of every process of the container."""
        return [pid for pid in self._pids[1:] if pid]

    def set_comm(self, comm: bytes) -> None:
        """The calling process's name, for /proc/N/stat and status as others read them."""
        start = COMM_TABLE + COMM_SIZE * self.self_pid()
        self._shared[start:start + COMM_SIZE] = comm[:COMM_SIZE - 1].ljust(COMM_SIZE, b"\0")

    def comm(self, guest_pid: int) -> bytes:
        start = COMM_TABLE + COMM_SIZE * guest_pid
        return self._shared[start:start + COMM_SIZE].split(b"\0", 1)[0]

    # -- CPU -----------------------------------------------------------------------------
    def cpu_seconds(self) -> float:
        """CPU time of the container's live processes, this one's brought up to date."""
        self._cpu[self.self_pid()] = time.process_time()
        return sum(seconds for pid, seconds in zip(self._pids.tolist(), self._cpu.tolist(),
                                                   strict=True) if pid)

    # -- UTS ---------------------------------------------------------------------------
    @property
    def hostname(self) -> bytes:
        return HEADER.unpack_from(self._shared, 0)[1].split(b"\0", 1)[0]

    @hostname.setter
    def hostname(self, name: bytes) -> None:
        with self._lock:
            next_pid = HEADER.unpack_from(self._shared, 0)[0]
            HEADER.pack_into(self._shared, 0, next_pid, name[:HOSTNAME_MAX])

    # -- memory ------------------------------------------------------------------------
    def charge(self, mapped_now: int, more: int) -> bool:
        """Whether this process, with ``mapped_now`` bytes mapped, may map ``more``: the
        container's total (every process's last figure) stays within the limit."""
        guest = self.self_pid()
        with self._lock:
            if self.memory_limit is not None:
                others = sum(used for g, (pid, used) in
                             enumerate(zip(self._pids.tolist(), self._memory.tolist(), strict=True))
                             if pid and g != guest)
                if others + mapped_now + more > self.memory_limit:
                    self._memory[guest] = mapped_now
                    return False
            self._memory[guest] = mapped_now + more
        return True
