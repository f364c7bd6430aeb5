"""Workers are confined: seccomp, no privileges, and limits the kernel holds.

Two VMMs run for the module, both test builds (tests/vmm_test_build.py):

- ``confined``: this host as it is (root, cgroup v1 writable, libseccomp present);
- ``poor``: a host without libseccomp and whose cgroups are read-only (a mount namespace
  of its own), where workers fall back to limiting themselves, as before cgroups.

In both, guest code can trigger deliberate worker bugs (a forbidden system call, a worker
that stops throttling itself to its CPU cap).

Guests are the tiny bare-metal programs of tests/vmm_guests.py. Thresholds are generous:
CI machines are small and busy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.vmm import procstat
from tests.test_vmm_service import MEM, Api

CAP_SECONDS = 4.0


def _serve(tmp: Path, build: str, prefix: list[str] | None = None) -> Iterator[Api]:
    sock = tmp / "vmm.sock"
    log = tmp / "vmm.log"
    env = {**os.environ, "POPEK_TEST_BUILD": build}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "tests.vmm_test_build",
                                 "serve", "--socket", str(sock)], stderr=stderr, env=env)
    api = Api(sock)
    try:
        api.wait("the VMM socket", sock.exists)
        yield api
    finally:
        for vm in api("list"):
            api("delete", vm["id"])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from _serve(tmp_path_factory.mktemp("confined"), "misbehave")


# Every cgroup mount read-only, in a mount namespace of the VMM's own: cgroups that
# cannot be written, as for a VMM that is not root and has no delegated cgroup.
_READ_ONLY_CGROUPS = ("for m in $(awk '$3 ~ /^cgroup/ {print $2}' /proc/mounts); do "
                      "mount -o remount,bind,ro \"$m\"; done; exec \"$@\"")


@pytest.fixture(scope="module")
def poor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from _serve(tmp_path_factory.mktemp("poor"), "misbehave,no-seccomp",
                      ["unshare", "--mount", "sh", "-c", _READ_ONLY_CGROUPS, "sh"])


@pytest.fixture
def vms() -> Iterator[list[tuple[Api, dict]]]:
    """VMs a test made, removed after it."""
    made: list[tuple[Api, dict]] = []
    yield made
    for api, vm in made:
        api("delete", vm["id"])


def _create(vms: list, api: Api, program: str, **kw: object) -> dict:
    vm = api.create(program, **kw)
    vms.append((api, vm))
    return vm


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (ln.partition(":") for ln in lines)}


def _share(pid: int) -> float:
    """Fraction of one core ``pid`` used over a few seconds."""
    start, cpu0 = time.monotonic(), procstat.cpu_seconds(pid)
    time.sleep(CAP_SECONDS)
    return (procstat.cpu_seconds(pid) - cpu0) / (time.monotonic() - start)


def _cgroup_dir(pid: int, controller: str) -> Path:
    """The v1 cgroup directory of ``pid`` for ``controller``, found as the kernel says."""
    path = next(line.split(":", 2)[2] for line in
                Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if controller in line.split(":")[1].split(","))
    mount = next(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                 if line.split()[2] == "cgroup" and controller in line.split()[3].split(","))
    return Path(mount + path)


# -- confined: this host ---------------------------------------------------------------------

def test_worker_runs_without_privileges_and_filtered(confined: Api, vms: list) -> None:
    vm = _create(vms, confined, "counter")
    status = _status(vm["pid"])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    if os.geteuid() == 0:
        assert int(status["CapBnd"], 16) == 0
    confinement = vm["confinement"]
    assert confinement["seccomp"] == "filter" and confinement["no_new_privs"]
    assert int(confinement["capabilities"], 16) == 0
    assert confinement["warnings"] == [], confinement["warnings"]


def test_forbidden_system_call_kills_the_worker_and_fails_only_its_vm(
        confined: Api, vms: list) -> None:
    bystander = _create(vms, confined, "counter")
    culprit = _create(vms, confined, "forbidden")
    failed = confined.wait("the culprit to fail", lambda: (
        info := confined.info(culprit))["state"] == "failed" and info)
    if os.geteuid() == 0:  # the kernel log, which names the call, is root's to read
        assert "killed by the seccomp filter (syscall" in failed["failure"]
        assert "chroot" in failed["failure"]
    else:
        assert "SIGSYS" in failed["failure"]
    assert b"about to misbehave" in confined.log(culprit)
    before = confined.info(bystander)["instructions"]
    confined.wait("the bystander to carry on", lambda: (
        info := confined.info(bystander))["instructions"] > before and info["state"] == "running")


def test_kernel_holds_the_cap_of_a_worker_that_ignores_it(confined: Api, vms: list) -> None:
    vm = _create(vms, confined, "greedy", cpu_cap=10)  # its worker stops throttling itself
    assert vm["confinement"]["limits"] == "cgroup v1", vm["confinement"]
    confined.wait_log(vm, b"spinning")
    share = _share(vm["pid"])
    assert share < 0.15, f"capped at 10% but used {share:.0%}"
    assert confined.info(vm)["cpu"]["throttled_seconds"] > 0  # counted by the kernel
    cpu = _cgroup_dir(vm["pid"], "cpu")
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 10_000
    raised = confined("update", vm["id"], cpu_cap=60)
    assert raised["cpu"]["cap_percent"] == 60
    assert int((cpu / "cpu.cfs_quota_us").read_text()) == 60_000
    assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000


def test_memory_limit_is_the_cgroups(confined: Api, vms: list) -> None:
    vm = _create(vms, confined, "counter", mem_overhead=128 << 20)
    limit = _cgroup_dir(vm["pid"], "memory") / "memory.limit_in_bytes"
    assert int(limit.read_text()) == MEM + (128 << 20) == vm["memory"]["limit_bytes"]
    assert "Max address space" in (limits := Path(f"/proc/{vm['pid']}/limits").read_text())
    assert re.search(r"Max address space\s+unlimited", limits)  # no RLIMIT_AS beside it


def test_cgroup_is_removed_with_its_vm(confined: Api) -> None:
    vm = confined.create("counter")
    dirs = [_cgroup_dir(vm["pid"], controller) for controller in ("cpu", "memory")]
    assert all(d.name == vm["id"] and d.parent.name == "popek" for d in dirs), dirs
    assert all(d.is_dir() for d in dirs)
    confined("delete", vm["id"])
    assert not any(d.exists() for d in dirs)


# -- poor: no libseccomp, read-only cgroups ---------------------------------------------------

def test_without_cgroups_the_worker_limits_itself_and_says_so(poor: Api, vms: list) -> None:
    vm = _create(vms, poor, "spin", cpu_cap=10, cpu_weight=25, mem_overhead=128 << 20)
    greedy = _create(vms, poor, "greedy", cpu_cap=10)
    confinement = vm["confinement"]
    assert confinement["limits"].startswith("worker")
    assert any("Read-only file system" in w for w in confinement["warnings"]), confinement
    assert vm["cpu"]["nice"] == 6  # the weight, as a nice level
    limits = Path(f"/proc/{vm['pid']}/limits").read_text()
    address_space = int(re.search(r"Max address space\s+(\d+)", limits).group(1))
    assert MEM + (128 << 20) < address_space < MEM + (1 << 30)
    poor.wait_log(vm, b"spinning")
    poor.wait_log(greedy, b"spinning")
    start = time.monotonic()
    cpu0 = {pid: procstat.cpu_seconds(pid) for pid in (vm["pid"], greedy["pid"])}
    time.sleep(CAP_SECONDS)
    share = {pid: (procstat.cpu_seconds(pid) - cpu) / (time.monotonic() - start)
             for pid, cpu in cpu0.items()}
    assert share[vm["pid"]] < 0.15, f"capped at 10% but used {share[vm['pid']]:.0%}"
    # The control for the kernel's cap: here nothing holds a worker that ignores its own.
    assert share[greedy["pid"]] > 0.15, f"greedy used only {share[greedy['pid']]:.0%}"


def test_without_libseccomp_the_worker_runs_unfiltered_with_a_warning(
        poor: Api, vms: list) -> None:
    vm = _create(vms, poor, "counter")
    status = _status(vm["pid"])
    assert status["Seccomp"] == "0"
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
    assert vm["confinement"]["seccomp"] == "off"
    assert any("seccomp unavailable" in w for w in vm["confinement"]["warnings"])
