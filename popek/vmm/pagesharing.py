"""Page sharing between guests: the host kernel's same-page merging (KSM) on guest RAM.

Guests of the same images hold many identical pages (the kernel's text and data, the
initramfs, page cache, zeroed pages). Linux's KSM merges identical anonymous pages of
regions advised ``MADV_MERGEABLE`` into one write-protected copy and gives a writer its
own copy again on its first write, exactly as QEMU and libvirt use it. popek chose the
host's KSM over merging in popek itself by measurement (README, "Memory"): a KSM page
costs no Python object and no code in the guest's store path, a merge costs the host's
``ksmd`` thread, not a guest, and merged pages stay in one place for every tier, the
native one included, which writes RAM without asking Python.

Each worker advises its guest RAM mergeable (:func:`share_guest_ram`) when its VMM says
so (``popek serve --page-sharing on``, the default). KSM itself is host-wide and off on
most hosts (``/sys/kernel/mm/ksm/run`` = 0): a VMM running as root that finds it off
turns it on (:func:`start_ksm`), with zero pages merged into the kernel's zero page
(``use_zero_pages``: a zeroed guest page is never stored twice) and a scan rate that
covers a few dozen idle guests in seconds; it changes nothing on a host where KSM
already runs, since its administrator chose those settings. Without root, or without
KSM, RAM is still advised and the VMM reports that nothing merges.

The VMM reads what merged from the kernel, never from a worker: per VM, the guest RAM
mapping's counters in ``/proc/PID/smaps`` (:func:`guest_ram`), and host-wide, KSM's own
counters (:func:`host_counters`).
"""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path
from typing import Any

KSM = Path("/sys/kernel/mm/ksm")
PAGE_SIZE = mmap.PAGESIZE
_PR_SET_MEMORY_MERGE = 67
_libc = ctypes.CDLL(None, use_errno=True)
# ksmd's pace when the VMM starts it: 1,000 pages every 50 ms (80 MiB/s of merge
# candidates) covers the touched RAM of 50 idle guests in a few seconds and costs
# ksmd a few percent of a core; smart_scan skips pages that never merge.
KSM_SETTINGS = {"pages_to_scan": "1000", "sleep_millisecs": "50", "use_zero_pages": "1",
                "smart_scan": "1", "run": "1"}


def share_guest_ram(ram: mmap.mmap) -> None:
    """Let the host merge identical pages of this guest RAM with other guests'."""
    ram.madvise(mmap.MADV_MERGEABLE)


def share_process_memory() -> bool:
    """Let the host merge every anonymous page of this process, present and future, with
    identical pages elsewhere (``PR_SET_MEMORY_MERGE``, Linux 6.4): a worker's Python heap
    starts as the fork server's and stays mostly alike across workers, but reference
    counting writes copy its pages into every worker; merged, identical ones are held
    once again (about 5 MiB per idle Linux guest, README "Memory"). Needs
    ``CAP_SYS_RESOURCE`` (a root VMM's worker, before it confines itself); returns
    whether it took effect. Guest RAM is advised on its own (:func:`share_guest_ram`)."""
    return _libc.prctl(_PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0


def start_ksm() -> str:
    """Make sure the host's KSM runs; returns what was found or done, for the VMM's log."""
    try:
        running = (KSM / "run").read_text().strip() == "1"
    except OSError:
        return "this host has no KSM (/sys/kernel/mm/ksm): guest pages are not shared"
    if running:
        return "host KSM already runs; its settings are kept"
    try:
        for name, value in KSM_SETTINGS.items():
            if (KSM / name).exists():
                (KSM / name).write_text(value)
    except OSError as err:
        return (f"host KSM is off and cannot be started ({err.strerror}); as root, "
                f"echo 1 > {KSM / 'run'} shares guest pages")
    return (f"started host KSM ({', '.join(f'{k}={v}' for k, v in KSM_SETTINGS.items())}"
            f" in {KSM})")


def host_counters() -> dict[str, Any]:
    """Host-wide KSM counters in KSM's own terms, and the bytes merging saves."""
    values: dict[str, int] = {}
    for name in ("run", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                 "ksm_zero_pages", "full_scans", "pages_to_scan", "sleep_millisecs",
                 "use_zero_pages"):
        try:
            values[name] = int((KSM / name).read_text())
        except (OSError, ValueError):
            continue
    if not values:
        return {"available": False}
    saved = (values.get("pages_sharing", 0) + values.get("ksm_zero_pages", 0)) * PAGE_SIZE
    return {"available": True, "running": values.pop("run", 0) == 1, **values,
            "page_bytes": PAGE_SIZE, "saved_bytes": saved}


def guest_ram(pid: int, guest_bytes: int) -> dict[str, int]:
    """Guest RAM of worker ``pid`` as the host holds it: bytes ``touched`` (resident),
    ``shared`` with other processes (merged by KSM, or a snapshot's pages its clones
    all read), ``private`` to this guest, and ``merged`` by KSM; empty if the worker or
    its RAM mapping is gone. Guest RAM is the worker's one mapping of exactly the
    guest's size (anonymous, or a snapshot file mapped privately)."""
    counts: dict[str, int] | None = None
    found: dict[str, int] | None = None
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    if found is not None:
                        break
                    start, end = line.split(" ", 1)[0].split("-")
                    counts = {} if int(end, 16) - int(start, 16) == guest_bytes else None
                elif counts is not None:
                    name, _, rest = line.partition(":")
                    value = rest.split()
                    if value and value[-1] == "kB":
                        counts[name] = int(value[0]) * 1024
                    found = counts
    except OSError:
        return {}
    if found is None:
        return {}
    return {"touched": found.get("Rss", 0),
            "shared": found.get("Shared_Clean", 0) + found.get("Shared_Dirty", 0),
            "private": found.get("Private_Clean", 0) + found.get("Private_Dirty", 0),
            "merged": found.get("KSM", 0)}


def host_report(page_sharing: bool, vms: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /v1/host``: KSM's host-wide counters and the guests' RAM summed (from each
    VM's ``memory`` as ``GET /v1/vms`` shows it)."""
    totals = dict.fromkeys(("guest_touched_bytes", "guest_shared_bytes",
                            "guest_private_bytes", "guest_merged_bytes", "pss_bytes"), 0)
    running = [vm["memory"] for vm in vms if vm["state"] in ("running", "paused", "created")]
    for memory in running:
        for key in totals:
            totals[key] += memory.get(key) or 0
    return {"page_sharing": page_sharing, "ksm": host_counters(),
            "guests": {"count": len(running), **totals}}
