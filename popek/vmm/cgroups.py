"""Kernel-enforced CPU and memory limits: one cgroup per VM.

A worker that ignores its CPU cap or grows past its memory allowance is held by the
kernel, not by its own goodwill: each VM's worker runs in a cgroup of its own under a
``popek`` parent inside the VMM's own cgroup (so whatever limits the VMM's cgroup has
still hold its guests), with

=====================  ============================  =========================
                       cgroup v2                     cgroup v1
=====================  ============================  =========================
weight (1-10000)       ``cpu.weight`` = weight       ``cpu.shares`` = weight x 10.24
cap (% of one core)    ``cpu.max``                   ``cpu.cfs_quota_us`` / ``cfs_period_us``
memory                 ``memory.max``                ``memory.limit_in_bytes``
=====================  ============================  =========================

v2 is used where its hierarchy offers both controllers, v1 otherwise (both hierarchies,
``cpu`` and ``memory``, must be mounted). Weights share out what the ``popek`` parent gets:
beside the VMM's other processes, all its guests together weigh as much as one nice-0
process (a systemd slice's rule). A VM's cgroup is removed when the VM ends; the parent
stays, as a slice does. Where no cgroup can be made (not root and no delegated cgroup,
nothing mounted, read-only), :func:`create` says why, and the VMM falls back to limits the
worker applies to itself (nice, :mod:`popek.vmm.throttle`, ``RLIMIT_AS``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

PARENT = "popek"
DEFAULT_WEIGHT = 100  # cgroup v2's default weight, and v1's 1024 shares
V1_SHARES_PER_WEIGHT = 1024 / DEFAULT_WEIGHT
CAP_PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  # the kernel's smallest quota
MAX_PERIOD_US = 1_000_000


class Unavailable(Exception):
    """No cgroup can be made for a VM; the message says why, in one line."""


@dataclass(frozen=True)
class _Hierarchy:
    """Where this process's cgroups are, for each controller that matters."""

    version: int
    cpu: Path  # the VMM's own cgroup's directory in the hierarchy with the cpu controller
    memory: Path  # ... and with the memory controller (the same directory on v2)
    paths: dict[str, str]  # its cgroup paths, as /proc/PID/cgroup names them: by
    # controller ("cpu", "memory") on v1, the v2 hierarchy's under ""


class VmCgroup:
    """The cgroup (v2) or pair of cgroups (v1: cpu, memory) of one VM's worker."""

    def __init__(self, hierarchy: _Hierarchy, name: str) -> None:
        self.version = hierarchy.version
        self.cpu = hierarchy.cpu / PARENT / name
        self.memory = hierarchy.memory / PARENT / name
        self.dirs = list(dict.fromkeys((self.cpu, self.memory)))
        self.paths = {key: f"{path.rstrip('/')}/{PARENT}/{name}"
                      for key, path in hierarchy.paths.items()}

    @property
    def mechanism(self) -> str:
        return f"cgroup v{self.version}"

    @property
    def procs_files(self) -> list[str]:
        """The files a worker writes itself into to join (``cgroup.procs``)."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def contains(self, pid: int) -> bool:
        """Whether the kernel says ``pid`` is in every one of this VM's cgroups."""
        try:
            paths = _cgroups_of(pid)
        except OSError:
            return False
        return all(paths.get(key) == path for key, path in self.paths.items())

    def set_weight(self, weight: int) -> None:
        if self.version == 2:
            _write(self.cpu / "cpu.weight", weight)
        else:
            _write(self.cpu / "cpu.shares", max(2, round(weight * V1_SHARES_PER_WEIGHT)))

    def set_cap(self, percent: float | None) -> None:
        """At most ``percent`` of one core (None: no cap), however many threads run."""
        period = CAP_PERIOD_US
        if percent is not None:
            period = min(MAX_PERIOD_US, max(period, round(MIN_QUOTA_US * 100 / percent)))
            quota = max(MIN_QUOTA_US, round(period * percent / 100))
        if self.version == 2:
            _write(self.cpu / "cpu.max", f"{'max' if percent is None else quota} {period}")
        else:
            _write(self.cpu / "cpu.cfs_quota_us", -1)  # a period below the quota is refused
            _write(self.cpu / "cpu.cfs_period_us", period)
            if percent is not None:
                _write(self.cpu / "cpu.cfs_quota_us", quota)

    def set_memory_limit(self, limit: int | None) -> None:
        if self.version == 2:
            _write(self.memory / "memory.max", "max" if limit is None else limit)
        else:
            _write(self.memory / "memory.limit_in_bytes", -1 if limit is None else limit)

    def memory_limit(self) -> int | None:
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        value = (self.memory / name).read_text().strip()
        return None if value == "max" or int(value) >= 1 << 62 else int(value)

    def throttled_seconds(self) -> float:
        """CPU time the kernel withheld to hold the cap."""
        stat = _keyed(self.cpu / "cpu.stat")
        if self.version == 2:
            return stat.get("throttled_usec", 0) / 1e6
        return stat.get("throttled_time", 0) / 1e9

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process here for exceeding the memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        return _keyed(self.memory / name).get("oom_kill", 0) > 0

    def remove(self) -> None:
        """Once the worker is gone. A worker that has not died yet (EBUSY) leaves an empty
        cgroup behind, as systemd would, rather than fail the VMM."""
        for d in self.dirs:
            with contextlib.suppress(OSError):
                d.rmdir()


def create(name: str) -> VmCgroup:
    """A new, empty cgroup ``name`` for one VM; Unavailable says why there is none."""
    hierarchy = _hierarchy()
    cgroup = VmCgroup(hierarchy, name)
    try:
        for own in dict.fromkeys((hierarchy.cpu, hierarchy.memory)):
            parent = own / PARENT
            if hierarchy.version == 2:
                _enable_controllers(own)
                parent.mkdir(exist_ok=True)
                _enable_controllers(parent)
            else:
                parent.mkdir(exist_ok=True)
        for d in cgroup.dirs:
            d.mkdir()
    except OSError as err:
        cgroup.remove()
        raise Unavailable(f"cgroups are not writable here ({err.strerror}: "
                          f"{err.filename})") from None
    return cgroup


def existing(name: str) -> VmCgroup:
    """The cgroup ``name`` that a VMM before this one made (its VM's worker outlived that
    VMM); Unavailable if it is not there."""
    cgroup = VmCgroup(_hierarchy(), name)
    missing = [d for d in cgroup.dirs if not d.is_dir()]
    if missing:
        raise Unavailable(f"the VM's cgroup {missing[0]} is gone")
    return cgroup


def _enable_controllers(cgroup: Path) -> None:
    """v2 hands controllers down one level at a time; a cgroup holding processes (other
    than the root) cannot hand them down, so the VMM needs a delegated cgroup there."""
    wanted = {"cpu", "memory"}
    if not wanted <= set((cgroup / "cgroup.subtree_control").read_text().split()):
        _write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))


@functools.cache
def _hierarchy() -> _Hierarchy:
    """This process's cgroups in the hierarchies with the cpu and memory controllers."""
    own = _cgroups_of("self")
    mounts: dict[str, tuple[str, str]] = {}  # controller ("" for v2) -> (root, mount point)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("", (fields[3], fields[4]))
            elif fstype == "cgroup":
                for controller in ("cpu", "memory"):
                    if controller in options:
                        mounts.setdefault(controller, (fields[3], fields[4]))
    if "" in mounts and "" in own:
        v2 = _inside(mounts[""], own[""])
        if v2 is not None and {"cpu", "memory"} <= set(
                (v2 / "cgroup.controllers").read_text().split()):
            return _Hierarchy(2, v2, v2, {"": own[""]})
    cpu = _inside(mounts.get("cpu"), own.get("cpu"))
    memory = _inside(mounts.get("memory"), own.get("memory"))
    if cpu is None or memory is None:
        raise Unavailable("no cgroup hierarchy with the cpu and memory controllers is "
                          "mounted")
    return _Hierarchy(1, cpu, memory, {"cpu": own["cpu"], "memory": own["memory"]})


def _cgroups_of(pid: int | str) -> dict[str, str]:
    """Controller ("" for the v2 hierarchy) -> cgroup path, from /proc/PID/cgroup."""
    paths: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


def _inside(mount: tuple[str, str] | None, path: str | None) -> Path | None:
    """The directory of cgroup ``path`` under a mount of (root, mount point)."""
    if mount is None or path is None:
        return None
    root, point = mount
    relative = os.path.relpath(path, root)
    if relative.startswith(".."):  # our cgroup is outside what is mounted (a container)
        return None
    directory = Path(point, relative).resolve()
    return directory if directory.is_dir() else None


def _write(path: Path, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _keyed(path: Path) -> dict[str, int]:
    """A cgroup file of "key value" lines."""
    values = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                values[key] = int(value)
    return values
