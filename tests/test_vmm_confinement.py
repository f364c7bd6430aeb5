"""Workers are confined: seccomp, no privileges, and limits the kernel holds.

Two VMMs run for the module, both test builds (tests/vmm_test_build.py):

- ``confined``: this host as it is (root, cgroup v1 writable, libseccomp present);
- ``poor``: a host without libseccomp, whose cgroups are read-only, where the VMM is the
  root of a user namespace that maps no other uid (a container's lot): workers fall back
  to limiting themselves, as before cgroups, and keep uid 0, without capabilities.

In both, guest code can trigger deliberate worker bugs (a forbidden system call, a worker
that stops throttling itself to its CPU cap).

Guests are the tiny bare-metal programs of tests/vmm_guests.py. Thresholds are generous:
CI machines are small and busy.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek.vmm import jail, procstat
from tests.test_vmm_service import MEM, STOP_GUESTS, Api
from tests.vmm_process import wait_listening

CAP_SECONDS = 4.0


def _serve(tmp: Path, build: str, prefix: list[str] | None = None,
           env: dict[str, str] | None = None) -> Iterator[Api]:
    sock = tmp / "vmm.sock"
    log = tmp / "vmm.log"
    env = {**os.environ, **(env or {}), "POPEK_TEST_BUILD": build}
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "tests.vmm_test_build",
                                 "serve", "--socket", str(sock), "--state-dir",
                                 str(tmp / "state"), *STOP_GUESTS], stderr=stderr, env=env)
    api = Api(sock)
    try:
        wait_listening(sock, proc)
        yield api
    finally:
        for vm in api("list"):
            api("delete", vm["id"])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root-only file in a directory anyone may search: only its mode keeps others out."""
    folder = tmp_path_factory.mktemp("secrets")
    folder.chmod(0o755)
    path = folder / "secret"
    path.write_bytes(b"root's secret\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def confined(tmp_path_factory: pytest.TempPathFactory, secret: Path) -> Iterator[Api]:
    yield from _serve(tmp_path_factory.mktemp("confined"), "misbehave",
                      env={"POPEK_TEST_SECRET": str(secret)})


# Every cgroup mount read-only, in a mount namespace of the VMM's own: cgroups that
# cannot be written, as for a VMM that is not root and has no delegated cgroup.
_READ_ONLY_CGROUPS = ("for m in $(awk '$3 ~ /^cgroup/ {print $2}' /proc/mounts); do "
                      "mount -o remount,bind,ro \"$m\"; done; exec \"$@\"")
_POOR_HOST = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              _READ_ONLY_CGROUPS, "sh"]


@pytest.fixture(scope="module")
def poor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from _serve(tmp_path_factory.mktemp("poor"), "misbehave,no-seccomp", _POOR_HOST)


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


def _shares(*pids: int) -> dict[int, tuple[float, float]]:
    """Over a few seconds, for each of ``pids`` (workers; their vCPU threads): the fraction
    of one core it used, and the fraction of the time it was runnable (running, or waiting
    for a core). A worker that never sleeps is runnable all the time, however busy the
    host, while a worker that throttles itself sleeps."""
    def sample() -> dict[int, tuple[float, float]]:
        return {pid: (procstat.cpu_seconds(pid), sum(
            int(n) for n in Path(f"/proc/{pid}/schedstat").read_text().split()[:2]) / 1e9)
            for pid in pids}
    start, before = time.monotonic(), sample()
    time.sleep(CAP_SECONDS)
    after, wall = sample(), time.monotonic() - start
    return {pid: ((after[pid][0] - before[pid][0]) / wall,
                  (after[pid][1] - before[pid][1]) / wall) for pid in pids}


def _cgroup_dir(pid: int, controller: str) -> Path:
    """The v1 cgroup directory of ``pid`` for ``controller``, found as the kernel says."""
    path = next(line.split(":", 2)[2] for line in
                Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                if controller in line.split(":")[1].split(","))
    mount = next(line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                 if line.split()[2] == "cgroup" and controller in line.split()[3].split(","))
    return Path(mount + path)


def test_filter_leaves_out_what_a_guest_could_escape_with() -> None:
    assert not {"execve", "execveat", "fork", "vfork", "ptrace", "kill", "socket", "connect",
                "bind", "mount", "setuid", "setresuid", "prctl", "bpf", "open", "rename",
                "unlink", "chroot", "unshare", "setns", "process_vm_writev",
                "perf_event_open", "io_uring_setup"} & jail.allowed_syscalls()


# -- confined: this host ---------------------------------------------------------------------

def test_worker_runs_without_privileges_and_filtered(confined: Api, vms: list) -> None:
    vm = _create(vms, confined, "counter")
    status = _status(vm["pid"])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    if os.geteuid() == 0:
        assert int(status["CapBnd"], 16) == 0
        assert status["Uid"].split()[1] != "0" and status["Gid"].split()[1] != "0"
    confinement = vm["confinement"]
    assert confinement["uid"] == int(status["Uid"].split()[1])
    assert confinement["seccomp"] == "filter" and confinement["no_new_privs"]
    assert int(confinement["capabilities"], 16) == 0
    assert confinement["warnings"] == [], confinement["warnings"]


def test_worker_of_a_root_vmm_is_nobody_and_cannot_open_root_files(
        confined: Api, vms: list, secret: Path) -> None:
    assert os.geteuid() == 0, "this test needs root: the VMM switches uids only as root"
    vm = _create(vms, confined, "peek")  # its worker opens the secret by path
    done = confined.wait("the guest to report", lambda: (
        info := confined.info(vm))["state"] != "running" and info)
    assert done["exit"] == {"kind": "poweroff", "code": errno.EACCES}, done
    uid = done["confinement"]["uid"]
    assert uid != 0 and done["confinement"]["gid"] != 0
    assert uid not in {p.pw_uid for p in pwd.getpwall()}  # no user's, no file's owner


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


def test_a_worker_that_sends_malformed_statistics_fails_only_its_vm(
        confined: Api, vms: list) -> None:
    """Found by the records fuzz target: such statistics were kept, and every listing of
    the VMs (GET /v1/vms) failed from then on."""
    bystander = _create(vms, confined, "counter")
    liar = _create(vms, confined, "liar")
    failed = confined.wait("the liar to fail", lambda: (
        info := confined.info(liar))["state"] == "failed" and info)
    assert "broke the protocol" in failed["failure"] and "'traps'" in failed["failure"]
    assert {vm["id"]: vm["state"] for vm in confined("list")}[bystander["id"]] == "running"


def test_kernel_holds_the_cap_of_a_worker_that_ignores_it(confined: Api, vms: list) -> None:
    vm = _create(vms, confined, "greedy", cpu_cap=10)  # its worker stops throttling itself
    assert vm["confinement"]["limits"] == "cgroup v1", vm["confinement"]
    confined.wait_log(vm, b"spinning")
    share, runnable = _shares(vm["pid"])[vm["pid"]]
    assert share < 0.15, f"capped at 10% but used {share:.0%}"
    assert runnable > 0.8, f"runnable {runnable:.0%} of the time: it slept (throttled itself)"
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
    # The weight as a nice level; an unprivileged VMM cannot go below its own (a test run
    # under `nice` starts at 10).
    assert vm["cpu"]["nice"] == max(6, os.getpriority(os.PRIO_PROCESS, 0))
    limits = Path(f"/proc/{vm['pid']}/limits").read_text()
    address_space = int(re.search(r"Max address space\s+(\d+)", limits).group(1))
    assert MEM + (128 << 20) < address_space < MEM + (1 << 30)
    poor.wait_log(vm, b"spinning")
    poor.wait_log(greedy, b"spinning")
    shares = _shares(vm["pid"], greedy["pid"])
    share, _ = shares[vm["pid"]]
    assert share < 0.15, f"capped at 10% but used {share:.0%}"
    # The control for the kernel's cap: here nothing holds a worker that ignores its own.
    share, runnable = shares[greedy["pid"]]
    assert runnable > 0.8, f"greedy was runnable {runnable:.0%} of the time (used {share:.0%})"


def test_without_libseccomp_the_worker_runs_unfiltered_with_a_warning(
        poor: Api, vms: list) -> None:
    vm = _create(vms, poor, "counter")
    status = _status(vm["pid"])
    assert status["Seccomp"] == "0"
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
    assert vm["confinement"]["seccomp"] == "off"
    assert any("seccomp unavailable" in w for w in vm["confinement"]["warnings"])


def test_where_no_other_uid_is_mapped_the_worker_keeps_uid_0_and_says_so(
        poor: Api, vms: list) -> None:
    vm = _create(vms, poor, "counter")
    status = _status(vm["pid"])
    assert status["Uid"].split()[1] == "0" and int(status["CapEff"], 16) == 0
    assert any("keeps uid 0" in w for w in vm["confinement"]["warnings"]), vm["confinement"]
