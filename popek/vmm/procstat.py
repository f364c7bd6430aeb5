"""What the host kernel says about a worker process: CPU time and memory.

The VMM reads these from ``/proc`` itself rather than trusting the worker's reports,
so a guest's share and footprint are measured by the host, as ``top`` would.
"""

from __future__ import annotations

import os

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid``, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory(pid: int) -> dict[str, int]:
    """Resident set (``rss``), proportional set (``pss``: shared pages split among their
    users) and private bytes of ``pid``; empty if it is gone."""
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
            "private": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) * 1024}
