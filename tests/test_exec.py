"""popek exec against qemu-riscv64: real riscv64 programs behave as they do under QEMU.

Each test runs the same program, arguments, input and environment under popek's
process VM and under Debian's qemu-riscv64, and requires the same stdout and exit
status (or death by the same signal). The programs are the cross-built busybox,
Lua and hello-world in images/programs; workloads are small because the
interpreter runs a couple of million instructions a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bitmanip_program
import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = REPO / "images" / "programs"
SYSROOT = Path("/usr/riscv64-linux-gnu")
LUA_SCRIPT = Path(__file__).resolve().parent / "user" / "features.lua"
TIMEOUT = 300
INSTALL = "apt-get install qemu-user libc6-riscv64-cross"


def qemu_binary() -> str:
    path = shutil.which("qemu-riscv64")
    if path is None:
        pytest.fail(f"qemu-riscv64 is needed as the reference: {INSTALL}")
    return path


def sysroot() -> Path:
    if not (SYSROOT / "lib" / "ld-linux-riscv64-lp64d.so.1").exists():
        pytest.fail(f"the riscv64 sysroot {SYSROOT} is missing: {INSTALL}")
    return SYSROOT


def program(name: str) -> str:
    path = PROGRAMS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with images/recipes (busybox.sh, hello.sh...)")
    return str(path)


@pytest.fixture(scope="session")
def applets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH directory that runs every busybox applet under qemu-riscv64.

    busybox's shell runs applets by executing /proc/self/exe, which qemu-user cannot
    do (it is qemu), so the shell falls back to searching PATH: without this directory
    the reference would silently run the host's own coreutils.
    """
    directory = tmp_path_factory.mktemp("applets")
    busybox = program("busybox")
    for line in (PROGRAMS / "busybox.links").read_text().split():
        wrapper = directory / Path(line).name
        wrapper.write_text(f'#!/bin/sh\nexec {qemu_binary()} {busybox} {wrapper.name} "$@"\n')
        wrapper.chmod(0o755)
    return directory


def environment(path: Path | None = None, **extra: str) -> dict[str, str]:
    """The same small environment for both runs (popek also needs to import itself)."""
    search = f"{path}:/usr/bin:/bin" if path else "/usr/bin:/bin"
    # popek's own settings: the tier under test, and the test process's code cache
    # (conftest.py), which holds the stencil library (else each run would build it)
    popek = {name: os.environ[name] for name in ("POPEK_ENGINE", "POPEK_CODE_CACHE")
             if name in os.environ}
    return {"PATH": search, "LC_ALL": "C", "HOME": "/nonexistent", "TZ": "UTC",
            "PYTHONPATH": str(REPO), **popek, **extra}


def run_popek(args: list[str], *, stdin: bytes = b"", cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "popek.user", *args], input=stdin,
                          capture_output=True, cwd=cwd, env=env or environment(),
                          timeout=TIMEOUT)


def run_qemu(args: list[str], *, stdin: bytes = b"", cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([qemu_binary(), "-L", str(sysroot()), *args], input=stdin,
                          capture_output=True, cwd=cwd, env=env or environment(),
                          timeout=TIMEOUT)


def assert_same_as_qemu(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    reference = run_qemu(args, **kwargs)
    ours = run_popek(args, **kwargs)
    assert ours.stdout.decode(errors="replace") == reference.stdout.decode(errors="replace"), \
        ours.stderr.decode(errors="replace")[-3000:]
    assert ours.returncode == reference.returncode, ours.stderr.decode(errors="replace")[-3000:]
    return ours


def busybox_sh(applets: Path, script: str, **kwargs) -> subprocess.CompletedProcess:
    return assert_same_as_qemu([program("busybox"), "sh", "-c", script],
                               env=environment(applets), **kwargs)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small directory tree with fixed contents."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    for i, name in enumerate(["one.txt", "a/two.txt", "a/b/three.txt", "c/four.dat"]):
        (tmp_path / name).write_text("".join(f"line {j} of {name}\n" for j in range(5 + 7 * i)))
    (tmp_path / "link").symlink_to("one.txt")
    return tmp_path


def test_busybox_text_tools_match_qemu(applets: Path):
    busybox_sh(applets,
               'printf "pear\\napple\\nfig\\nbanana\\n" | sort; '
               'printf "3 x\\n1 y\\n2 z\\n" | sort -n -r | awk \'{print $2 "=" $1 * 10}\'; '
               'seq 1 100 | awk \'{s += $1} END {printf "%d %d %.3f\\n", s, NR, s / NR}\'; '
               'echo "hello world" | sed -e "s/world/there/" -e "s/^/> /"; '
               'echo "a,b,c" | awk -F, \'{for (i = NF; i > 0; i--) printf "%s ", $i; print ""}\'')


def test_busybox_directory_walk_matches_qemu(applets: Path, tree: Path):
    busybox_sh(applets,
               "ls; ls -a c; ls -l a | wc -l; find . | sort; find . -type f -name '*.txt'; "
               "find . -type l; find c a", cwd=tree)


def test_busybox_gzip_round_trip_and_sha256_match_qemu(applets: Path, tree: Path):
    busybox_sh(applets,
               "cat one.txt a/two.txt | sha256sum; gzip -c a/b/three.txt > t.gz; "
               "gunzip -c t.gz | sha256sum; sha256sum < a/b/three.txt; gunzip t.gz; "
               "cmp a/b/three.txt t && echo round trip ok; rm t; ls", cwd=tree)


def test_busybox_pipelines_fork_and_exec_like_qemu(applets: Path, tree: Path):
    busybox_sh(applets,
               "ls -R | sort | head -n 5; (cd a && pwd | sed 's|.*/||'); "
               "x=$(echo sub | tr a-z A-Z); echo $x; sh -c 'exit 3'; echo status $?", cwd=tree)


def test_subshells_forked_while_blocks_compile_match_qemu(applets: Path):
    """Each $(...) forks the whole emulator, often while tier 2's compiler thread works
    on the shell's hot blocks: every child must run, exit cleanly and say nothing."""
    ours = busybox_sh(applets,
                      'i=0; s=0; while [ $i -lt 40 ]; do '
                      'x=$(echo $((i * 7 % 13))) || echo "subshell $i failed"; '
                      's=$((s + x)); i=$((i + 1)); done; echo $s')
    assert ours.stdout == b"234\n"
    assert ours.stderr == b""


def test_shell_traps_run_the_guest_signal_handler(applets: Path):
    ours = busybox_sh(applets, 'trap "echo caught USR1" USR1; kill -USR1 $$; echo after; '
                               'trap "echo bye" EXIT; false || echo or')
    assert ours.stdout == b"caught USR1\nafter\nor\nbye\n"


def test_exit_status_passes_through(applets: Path):
    assert busybox_sh(applets, "exit 42").returncode == 42


@pytest.mark.parametrize("signal_name, number", [("SEGV", 11), ("TERM", 15)])
def test_death_by_signal_passes_through(applets: Path, signal_name: str, number: int):
    script = f"echo before; kill -{signal_name} $$; echo not reached"
    assert busybox_sh(applets, script).returncode == -number


def test_stdin_passes_through(applets: Path):
    ours = busybox_sh(applets, "read first; echo got $first; wc -l",
                      stdin=b"alpha\nbeta\ngamma\n")
    assert ours.stdout == b"got alpha\n2\n"


def test_lua_matches_qemu():
    ours = assert_same_as_qemu([program("lua"), str(LUA_SCRIPT)],
                               env=environment(POPEK_TEST_VAR="from the host"))
    assert b"coroutine\t0 1 1 2 3 5 8 13 21" in ours.stdout


def test_bit_manipulation_program_matches_qemu(tmp_path: Path):
    """Every Zba/Zbb/Zbc/Zbs instruction, hot enough for each tier to compile it."""
    ours = assert_same_as_qemu([str(bitmanip_program.build(tmp_path))])
    assert ours.stdout.count(b"\n") == 62


def test_static_hello_matches_qemu():
    assert_same_as_qemu([program("hello-static"), "one", "two"])


def test_dynamic_hello_runs_through_the_sysroot():
    ours = assert_same_as_qemu([program("hello-dynamic"), "arg"])
    assert ours.stdout.startswith(b"Hello from riscv64")


def test_strace_shows_calls_with_arguments_and_results():
    result = run_popek(["--strace", program("hello-static")])
    assert result.returncode == 0
    lines = result.stderr.decode().splitlines()
    write = next(line for line in lines if " write(1," in line)
    assert write.split()[0].isdigit()  # the pid, as qemu prints it
    assert write.endswith(f") = {len(result.stdout)}")
    assert any(" exit_group(0)" in line for line in lines)
    assert any(line.split(" ", 1)[1].startswith("brk(NULL) = 0x") for line in lines)


@pytest.mark.parametrize("kind", ["missing", "not ELF", "not RISC-V"])
def test_unrunnable_program_is_a_one_line_error_with_status_2(tmp_path: Path, kind: str):
    target = {
        "missing": tmp_path / "no-such-program",
        "not ELF": Path(__file__),
        "not RISC-V": Path(os.path.realpath(sys.executable)),
    }[kind]
    result = run_popek([str(target)])
    assert result.returncode == 2
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert b"Traceback" not in result.stderr


# System calls made directly on a loaded process, in a subprocess because the process
# VM takes over the signal dispositions of the Python process that hosts it.
SYSCALL_PROBE = """
import json, struct, sys
from popek.user.cli import default_sysroot
from popek.user.process import ExecOptions, Process
from popek.user.syscalls import dispatch

p = Process(ExecOptions(sysroot=default_sysroot()))
p.execve(sys.argv[1], [b"probe"], [])
M64 = (1 << 64) - 1

def call(nr, *args):
    for i, value in enumerate(args):
        p.hart.x[10 + i] = value & M64
    p.hart.x[17] = nr
    p.hart.pc = dispatch(p, p.hart.pc) - 4
    value = p.hart.x[10]
    return value - (1 << 64) if value >> 63 else value

scratch = call(222, 0, 8192, 3, 0x22, -1, 0)  # mmap an anonymous read-write buffer
results = {
    "write_bad_pointer": call(64, 1, 0xDEAD0000, 10),
    "read_into_unmapped": call(63, 0, 0x1000, 10),
    "stat_bad_path_pointer": call(79, -100, 0x10, scratch, 0),
    "unknown_syscall": call(1000),
    "host_overflow": (struct.pack_into("<qq", p.mem.ram, scratch, 1 << 62, 0),
                      call(101, scratch, 0))[1],
    "munmap_then_write": (call(215, scratch, 8192), call(64, 1, scratch, 1))[1],
    "brk_query_is_aligned_end": call(214, 0) == p.brk_start,
}
print(json.dumps(results))
"""


def test_bad_pointers_and_host_errors_become_error_returns():
    result = subprocess.run([sys.executable, "-c", SYSCALL_PROBE, program("hello-static")],
                            capture_output=True, env=environment(), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr.decode()
    efault, enosys, einval = -14, -38, -22
    assert json.loads(result.stdout) == {
        "write_bad_pointer": efault, "read_into_unmapped": efault,
        "stat_bad_path_pointer": efault, "unknown_syscall": enosys, "host_overflow": einval,
        "munmap_then_write": efault, "brk_query_is_aligned_end": True,
    }


@pytest.mark.parametrize("blocked_in", ["read", "busy loop"])
def test_host_signal_reaches_the_guest_handler(blocked_in: str):
    wait = "read line" if blocked_in == "read" else "while :; do :; done"
    script = f"trap 'echo handled; exit 9' TERM; echo ready; {wait}"
    child = subprocess.Popen(
        [sys.executable, "-m", "popek.user", program("busybox"), "sh", "-c", script],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment())
    try:
        assert child.stdout.readline() == b"ready\n"
        child.terminate()
        assert child.wait(timeout=TIMEOUT) == 9
        assert child.stdout.read() == b"handled\n"
    finally:
        child.kill()
        child.wait()
