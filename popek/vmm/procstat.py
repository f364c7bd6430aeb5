"""What the host kernel says about a worker process: CPU time, memory, parent, start time.

The VMM reads these from ``/proc`` itself rather than trusting the worker's reports,
so a guest's share and footprint are measured by the host, as ``top`` would.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid``, None if it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else None


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (None if there is no such process):
    with the pid, it names one process for as long as the host runs."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def resident(pid: int) -> int:
    """Bytes of ``pid`` resident in host memory (0 if it is gone): cheap, from statm."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def memory(pid: int) -> dict[str, int]:
    """Resident set (``rss``), proportional set (``pss``: shared pages split among their
    users; ``pss_anon``: of anonymous memory alone, i.e. without libraries and files) and
    private bytes of ``pid``; empty if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    kib: dict[str, int] = {}
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib[name] = int(parts[0])
    return {"rss": kib.get("Rss", 0) * 1024, "pss": kib.get("Pss", 0) * 1024,
            "pss_anon": kib.get("Pss_Anon", 0) * 1024,
            "private": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) * 1024}
