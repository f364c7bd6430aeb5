"""How one VM is held to its CPU weight, CPU cap and memory allowance.

The kernel holds it where it can: the VM's worker runs in a cgroup of its own
(:mod:`popek.vmm.cgroups`), whose shares, quota and memory limit no worker can escape,
however it misbehaves. Where no cgroup can be made, the limits fall back to what the
worker does to itself: its nice level (:func:`popek.vmm.scheduler.apply_weight`), the
token bucket of :mod:`popek.vmm.throttle`, and ``RLIMIT_AS``; ``popek vm info`` says which.
"""

from __future__ import annotations

from typing import Any

from popek.vmm import cgroups, scheduler

FALLBACK = "worker (nice, self-throttle, RLIMIT_AS)"


class VmLimits:
    """One VM's limits; its :class:`~popek.vmm.vm.Vm` calls these as the worker starts,
    as the limits change, and when the worker has ended. They outlive the VMM with the
    worker: the cgroup stays, and the next VMM finds it by the VM's id (:meth:`adopt`)."""

    def __init__(self, cgroup: cgroups.VmCgroup | None, fallback: str | None = None,
                 memory_limit: int | None = None, throttled_at_end: float = 0.0) -> None:
        self.cgroup = cgroup
        self.fallback = fallback  # why the kernel does not hold them
        self.memory_limit = memory_limit  # bytes in all, once the guest's RAM is known
        self._throttled_at_end = throttled_at_end

    @classmethod
    def create(cls, vm_id: str, cap: float | None) -> VmLimits:
        """For a new worker: a cgroup of its own, or why it gets none."""
        cgroup = None
        try:
            cgroup = cgroups.create(vm_id)
            cgroup.set_cap(cap)
        except (cgroups.Unavailable, OSError) as why:
            if cgroup is not None:
                cgroup.remove()
            return cls(None, str(why))
        return cls(cgroup)

    @classmethod
    def adopt(cls, vm_id: str, recorded: dict[str, Any], running: bool) -> VmLimits:
        """The limits a VMM before this one gave ``vm_id`` (as :meth:`record` kept them),
        with its cgroup if its worker may still be ``running``."""
        limits = cls(None, recorded.get("fallback"), recorded.get("memory_limit"),
                     recorded.get("throttled_seconds", 0.0))
        if running and limits.fallback is None:
            try:
                limits.cgroup = cgroups.existing(vm_id)
            except (cgroups.Unavailable, OSError) as why:
                limits.fallback = str(why)
        return limits

    # What the record keeps, and the types a record read back must have.
    RECORDED: dict[str, Any] = {"fallback": str | None, "memory_limit": int | None,
                                "throttled_seconds": float | int}

    def record(self) -> dict[str, Any]:
        return {"fallback": self.fallback, "memory_limit": self.memory_limit,
                "throttled_seconds": self._throttled_at_end}

    @property
    def mechanism(self) -> str:
        return self.cgroup.mechanism if self.cgroup else FALLBACK

    def worker_spec(self, cap: float | None, mem_overhead: int | None) -> dict[str, Any]:
        """What the worker must do itself: join its cgroup, or enforce the limits."""
        if self.cgroup is None:
            return {"cpu_cap": cap, "mem_overhead": mem_overhead}
        return {"cpu_cap": None, "mem_overhead": None, "cgroup_procs": self.cgroup.procs_files}

    def ready(self, pid: int, guest_bytes: int, mem_overhead: int | None) -> None:
        """The worker built its machine: check from outside that it joined its cgroup, and
        limit the cgroup's memory now that the guest's RAM is known. OSError if not."""
        if self.cgroup is None:
            return
        if not self.cgroup.contains(pid):
            raise OSError("the worker is not in its VM's cgroup")
        if mem_overhead is not None:
            self.memory_limit = guest_bytes + mem_overhead
        self.cgroup.set_memory_limit(self.memory_limit)

    def set_weight(self, pid: int, weight: int) -> int:
        """Returns the worker's nice level (0 when its cgroup carries the weight)."""
        if self.cgroup is None:
            return scheduler.apply_weight(pid, weight)
        self.cgroup.set_weight(weight)
        return 0

    def set_cap(self, cap: float | None) -> bool:
        """True if the kernel holds the new cap; False: the worker must be told."""
        if self.cgroup is not None:
            self.cgroup.set_cap(cap)
        return self.cgroup is not None

    def throttled_seconds(self, reported: float) -> float:
        """CPU time withheld to hold the cap: the kernel's count, or the worker's
        ``reported`` one when it throttles itself."""
        if self.cgroup is None:
            return reported
        return self._throttled_at_end or self.cgroup.throttled_seconds()

    def ended(self) -> str | None:
        """The worker is gone: remove its cgroup; returns why, if the kernel killed it."""
        if self.cgroup is None:
            return None
        why = None
        if self.cgroup.oom_killed():
            why = ("killed by the kernel: the worker exceeded the VM's memory limit "
                   f"({self.memory_limit} bytes: guest RAM and overhead)")
        self._throttled_at_end = self.cgroup.throttled_seconds()
        self.cgroup.remove()
        return why
