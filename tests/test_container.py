"""popek container run: programs stay inside their container, and images unpack safely.

The root filesystem is built here from the bundled busybox and Lua, Debian's riscv64
C library (libc6-riscv64-cross) and a probe cross-built as a dynamically linked program
(tests/user/container_probe.c). The probe tries every path trick to leave the root;
the test places "SECRET" where an escape would land and "inside" where the container's
own root puts it. Programs that need no container print under it what they print under
qemu-riscv64 outside. Images are OCI layouts and docker save tarballs written here with
tarfile and json; hostile ones must be refused without writing outside the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from popek.user.container.rootfs import RootFS
from tests.cross_built import CC, INSTALL, SOURCES, build
from tests.test_exec import PROGRAMS, environment, program, run_qemu, sysroot

TIMEOUT = 300
APPLETS = ("sh", "cat", "ls", "echo", "hostname", "id", "pwd", "mkdir", "rm", "ps", "sleep")
LOADER = "ld-linux-riscv64-lp64d.so.1"


def run_container(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "popek", "container", "run", *args],
                          capture_output=True, env=env or environment(), timeout=TIMEOUT)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``site/root`` (the container's /), ``site/volume`` (bound at /data) and
    ``site/marker``, the host file an escape from the root would reach."""
    compiler = shutil.which(CC)
    if compiler is None:
        pytest.fail(f"{CC} is needed to build the container probe: {INSTALL}")
    site = tmp_path_factory.mktemp("container")
    root = site / "root"
    for directory in ("bin", "lib", "tmp", "etc", "data"):
        (root / directory).mkdir(parents=True)
    shutil.copy(program("busybox"), root / "bin")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for name in ("lua", "hello-dynamic"):
        shutil.copy(program(name), root / "bin")
    for name in (LOADER, "libc.so.6"):
        shutil.copy(sysroot() / "lib" / name, root / "lib")
    subprocess.run([compiler, "-O1", "-Wall", "-Werror", "-o", str(root / "bin" / "probe"),
                    str(SOURCES / "container_probe.c")], check=True)
    (root / "marker").write_text("inside\n")
    (site / "marker").write_text("SECRET\n")
    (site / "volume").mkdir()
    (site / "volume" / "volume.txt").write_text("from the volume\n")
    return site


PROBE_OUTPUT = """\
hostname: probe-box
pid 1 ppid 0 uid 0 gid 0
marker owner: 0
proc pids: 1
dotdot: inside
relative dotdot: inside
symlink to /: inside
relative symlink: inside
proc self root: inside
proc 1 root: inside
proc self cwd: inside
openat root dotdot: inside
proc self fd: inside
openat bind dotdot: inside
openat bind absolute: inside
bind file: from the volume
bind write: EROFS
cwd moved dotdot: inside
getcwd: /tmp/moved/b
getcwd after /..: /
readlink proc self root: /
readlink up: ../../../../../..
proc other pid: ENOENT
child 3 (parent 1): kill(-1) = 0
kill(0) = 0, pgrp 1
reaped 3 and 2, status 7
init urged: 0
connect 192.0.2.1: ENETUNREACH
bind 127.0.0.1: ok
mmap 8 MiB: ok, 256 MiB: ENOMEM
reserve 256 MiB: ok
"""

SENTINEL = """
import signal, sys, time
signal.signal(signal.SIGURG, lambda *_: open(sys.argv[1], "w").write("urged"))
print("ready", flush=True)
time.sleep(120)
"""


def test_probe_stays_inside_its_container(site: Path, tmp_path: Path):
    """Escapes land inside; pids, uid, hostname, /proc, network and memory are the
    container's; kill(-1) and kill(0) reach the container's processes and no host
    process (the sentinel shares the test's process group)."""
    urged = tmp_path / "urged"
    sentinel = subprocess.Popen([sys.executable, "-c", SENTINEL, str(urged)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert sentinel.stdout.readline() == "ready\n"
        result = run_container("--rootfs", str(site / "root"), "--hostname", "probe-box",
                               "-v", f"{site / 'volume'}:/data:ro", "--network", "none",
                               "--memory", "64m", "--", "/bin/probe")
        time.sleep(0.2)
    finally:
        sentinel.send_signal(signal.SIGTERM)
        sentinel.wait()
    stdout = result.stdout.decode()
    assert "SECRET" not in stdout
    assert stdout == PROBE_OUTPUT, result.stderr.decode()[-2000:]
    assert result.returncode == 0
    assert not urged.exists(), "a kill in the container reached a host process"
    assert not (site / "volume" / "new").exists()


def test_dynamic_program_and_lua_print_what_they_print_under_qemu(site: Path):
    """The container's own loader and C library run the program as qemu-riscv64 runs it
    with Debian's sysroot outside any container."""
    script = "print(string.format('%.6f', math.sqrt(2)), ('x'):rep(3), 7 // 2)"
    for name, args in (("hello-dynamic", ["a", "b"]), ("lua", ["-e", script])):
        reference = run_qemu([str(PROGRAMS / name), *args])
        inside = run_container("--rootfs", str(site / "root"), "--", name, *args)
        assert inside.stdout == reference.stdout.replace(str(PROGRAMS / name).encode(),
                                                         name.encode()), inside.stderr
        assert inside.returncode == reference.returncode


def test_socket_program_prints_what_it_prints_under_qemu(site: Path, tmp_path: Path):
    """TCP, UDP, IPv6 and Unix sockets (bound inside the container's /tmp) between
    threads, as under qemu-riscv64 outside."""
    sockets = build(site / "root" / "bin", "sockets")
    reference = run_qemu([str(sockets), str(tmp_path)])
    inside = run_container("--rootfs", str(site / "root"), "--", "/bin/sockets", "/tmp")
    assert inside.stdout == reference.stdout, inside.stderr[-2000:]
    assert inside.returncode == reference.returncode


def test_shell_environment_workdir_volume_devices_and_ids(site: Path, tmp_path: Path):
    """-e, -w, a writable volume, /dev, a read-only /proc, owners (the invoking user's
    files are root's inside, anyone else's nobody's, 65534), and a hostname one process
    sets and the next reads."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine").write_text("")
    expected_etc = 0 if os.getuid() == 0 else 65534
    result = run_container("--rootfs", str(site / "root"), "-e", "GREETING=hi there",
                           "-w", "/data", "-v", f"{site / 'volume'}:/data",
                           "-v", f"{other}:/other:ro", "-v", "/etc:/hostetc:ro",
                           "--hostname", "shell-box", "--",
                           "sh", "-c", 'echo "$GREETING" $HOSTNAME; pwd; hostname; id -u; '
                           "cat volume.txt; echo made > made.txt; cat /proc/self/root/marker; "
                           "echo to-stdout > /dev/stdout; echo gone > /dev/null; "
                           "echo 1 > /proc/sys/kernel/hostname || echo refused; "
                           "ls -ln /other/mine /hostetc/passwd | while read m l u rest; "
                           "do echo $u; done; hostname renamed; hostname; ps; echo end")
    lines = result.stdout.decode().splitlines()
    assert lines[:-4] == ["hi there shell-box", "/data", "shell-box", "0", "from the volume",
                          "inside", "to-stdout", "refused", str(expected_etc), "0",
                          "renamed"], \
        result.stderr
    processes = [line.split() for line in lines[-3:-1]]  # ps: only the container's own
    assert processes[0] == ["1", "0", "[sh]"] and processes[1][1:] == ["0", "[ps]"], lines
    assert (site / "volume" / "made.txt").read_text() == "made\n"


def test_processes_left_when_pid_1_ends_are_killed(site: Path):
    """As when a PID namespace's init exits: a background job does not outlive it."""
    late = site / "root" / "tmp" / "late"
    result = run_container("--rootfs", str(site / "root"), "--", "sh", "-c",
                           "(sleep 2; echo late > /tmp/late) & echo started")
    assert result.stdout == b"started\n", result.stderr
    time.sleep(3)
    assert not late.exists()


def test_cpus_caps_the_whole_container(site: Path):
    """--cpus 0.25: two busy processes get about a quarter of a core between them (CPU
    time over wall time, popek's start-ups included, which the cap does not slow)."""
    before = os.times()
    start = time.monotonic()
    loop = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; echo $i"
    result = run_container("--rootfs", str(site / "root"), "--cpus", "0.25", "--", "sh", "-c",
                           f"({loop}) & ({loop}); wait")
    wall = time.monotonic() - start
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user \
        - before.children_system
    assert result.stdout == b"3000\n3000\n", result.stderr
    assert cpu / wall < 0.6, f"{cpu:.2f} s of CPU in {wall:.2f} s"


@pytest.mark.parametrize("args, message", [
    (["--rootfs", "/etc/hostname", "--", "sh"], "not a directory"),
    (["--rootfs", "/", "--memory", "lots", "--", "sh"], "expected a size"),
    (["--rootfs", "/", "-v", "relative:/x", "--", "sh"], "is not a directory"),
])
def test_bad_flags_are_one_line_errors(args: list[str], message: str):
    result = run_container(*args)
    assert result.returncode == 2
    assert message in result.stderr.decode() and result.stderr.count(b"\n") == 1


# -- images ------------------------------------------------------------------------------
def _tar(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info, data = entry if isinstance(entry, tuple) else (entry, b"")
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _entry(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755
    return info


def _busybox_layers() -> list[bytes]:
    busybox = Path(program("busybox")).read_bytes()
    lower = _tar([_entry("bin", tarfile.DIRTYPE), _file("bin/busybox", busybox, 0o755),
                  *(_entry(f"bin/{a}", tarfile.SYMTYPE, "busybox") for a in APPLETS),
                  _entry("etc", tarfile.DIRTYPE), _file("etc/gone.txt", b"deleted\n"),
                  _file("etc/kept.txt", b"kept\n"), _entry("old", tarfile.DIRTYPE),
                  _file("old/stale.txt", b"stale\n")])
    upper = _tar([_file("etc/.wh.gone.txt", b""), _file("old/.wh..wh..opq", b""),
                  _file("old/fresh.txt", b"fresh\n"), _entry("work", tarfile.DIRTYPE)])
    return [gzip.compress(lower, mtime=0), upper]


CONFIG = {"architecture": "riscv64", "os": "linux", "config": {
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['cat /etc/kept.txt; ls /etc /old; echo "$GREETING"; pwd'],
    "Env": ["PATH=/bin", "GREETING=hello from the image"], "WorkingDir": "/work"}}


def _oci_layout(layers: list[bytes], config: dict, *, corrupt: bool = False) -> bytes:
    """An OCI image layout; ``corrupt``: the last layer's bytes differ from its digest."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifest = {"schemaVersion": 2, "config": blob(json.dumps(config).encode()),
                "layers": [blob(layer) for layer in layers]}
    if corrupt:
        blobs[manifest["layers"][-1]["digest"][7:]] = _tar([_file("swapped", b"x")])
    index = {"schemaVersion": 2, "manifests": [{
        **blob(json.dumps(manifest).encode()),
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "platform": {"architecture": config["architecture"], "os": "linux"}}]}
    return _tar([_file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                 _file("index.json", json.dumps(index).encode()),
                 *(_file(f"blobs/sha256/{d}", data) for d, data in blobs.items())])


def _docker_save(layers: list[bytes], config: dict) -> bytes:
    names = [f"layer{i}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": "config.json", "RepoTags": ["probe:latest"], "Layers": names}]
    return _tar([_file("manifest.json", json.dumps(manifest).encode()),
                 _file("config.json", json.dumps(config).encode()),
                 *(_file(n, data) for n, data in zip(names, layers, strict=True))])


@pytest.mark.parametrize("build", [_oci_layout, _docker_save])
def test_image_runs_with_its_config_and_whiteouts(build, tmp_path: Path):
    image = tmp_path / "image.tar"
    image.write_bytes(build(_busybox_layers(), CONFIG))
    cache = tmp_path / "cache"
    racing = [subprocess.Popen([sys.executable, "-m", "popek", "container", "run", "--image",
                                str(image), "--cache", str(cache)], env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(2)]
    for run in racing:  # two runs unpacking the same image at once both succeed
        out, err = run.communicate(timeout=TIMEOUT)
        assert out.startswith(b"kept\n"), err
    result = run_container("--image", str(image), "--cache", str(cache))
    assert result.stdout.decode() == ("kept\n/etc:\nkept.txt\n\n/old:\nfresh.txt\n"
                                      "hello from the image\n/work\n"), result.stderr
    again = run_container("--image", str(image), "--cache", str(cache), "--", "ls", "/old")
    assert again.stdout == b"fresh.txt\n"
    assert len(os.listdir(cache)) == 1  # unpacked once, and the runs left it unchanged


def _hostile_layers(outside: Path) -> dict[str, list[bytes]]:
    return {
        "dotdot": [_tar([_file("../../escaped.txt", b"x")])],
        "absolute": [_tar([_file(f"{outside}/escaped.txt", b"x")])],
        "device": [_tar([_entry("null", tarfile.CHRTYPE)])],
        "symlink parent": [_tar([_entry("etc", tarfile.SYMTYPE, str(outside))]),
                           _tar([_file("etc/escaped.txt", b"x")])],
        "hard link out": [_tar([_entry("passwd", tarfile.LNKTYPE, "../../../etc/passwd")])],
        "truncated layer": [_tar([_file("big", b"x" * 5000)])[:1500]],
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "device", "symlink parent",
                                  "hard link out", "truncated layer", "amd64", "bad digest",
                                  "malformed index"])
def test_hostile_image_is_refused_and_writes_nothing_outside(case: str, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    config, layers = CONFIG, _hostile_layers(outside).get(case, [_tar([])])
    if case == "amd64":
        config = {**CONFIG, "architecture": "amd64"}
    image = tmp_path / "image.tar"
    image.write_bytes(_oci_layout(layers, config, corrupt=case == "bad digest")
                      if case != "malformed index" else
                      _tar([_file("index.json", b'{"manifests": [{"digest": 5}]}')]))
    cache = tmp_path / "cache"
    result = run_container("--image", str(image), "--cache", str(cache), "--", "sh")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count(b"\n") == 1 and result.stderr.startswith(b"popek container: ")
    assert os.listdir(outside) == []
    assert not cache.exists() or os.listdir(cache) == []


def test_directory_swapped_for_a_symlink_after_resolution_stays_inside(tmp_path: Path):
    """What another process of the container could do between a path's resolution and
    the host call: the resolved name still means the directory that was resolved."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "f").write_text("inside")
    (outside / "f").write_text("SECRET")
    rootfs = RootFS(str(root), [], host_pid=lambda pid: None, guest_pid=lambda pid: 0,
                    self_pid=lambda: 1, self_exe=lambda: b"")
    host = rootfs.resolve(b"/a/f")
    (root / "a").rename(root / "a-before")
    (root / "a").symlink_to(outside)
    with open(host) as f:
        assert f.read() == "inside"
    with pytest.raises(FileNotFoundError):  # a new resolution follows the link inside
        rootfs.resolve(b"/a/f")
