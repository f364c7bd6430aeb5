"""A Go program from a package registry under popek exec against qemu-riscv64.

esbuild's riscv64 build (npm's ``@esbuild/linux-riscv64``, a static Go binary) uses
what Go's runtime needs of a kernel: threads made with clone, futexes, signals for
goroutine preemption (SIGURG sent with tgkill, handlers on alternate stacks), epoll
and an eventfd for the network poller, nanosleep, mmap. It must bundle and minify
the TypeScript project in tests/user/typescript exactly as it does under qemu-riscv64.
The package is fetched with npm at test time into a cache (~/.cache/popek/npm).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.test_exec import assert_same_as_qemu

ESBUILD = "@esbuild/linux-riscv64@0.24.0"
PROJECT = Path(__file__).resolve().parent / "user" / "typescript"
INSTALL = "apt-get install nodejs npm (./quickstart does)"


def npm_binary(package: str, member: str) -> Path:
    """``member`` of the npm ``package``, fetched once into the cache (npm checks the
    registry's integrity hash of the tarball)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "popek" / "npm"
    target = cache / package.replace("/", "+") / member
    if target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm is needed to fetch {package}: {INSTALL}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        packed = subprocess.run([npm, "pack", "--silent", package, "--pack-destination", scratch],
                                capture_output=True, text=True, timeout=300, cwd=scratch)
        if packed.returncode != 0:
            pytest.fail(f"npm pack {package} failed: {packed.stderr.strip()[-500:]}")
        with tarfile.open(Path(scratch) / packed.stdout.split()[-1]) as tar:
            tar.extract(member, scratch, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(scratch) / member).chmod(0o755)
        os.replace(Path(scratch) / member, target)  # atomic: parallel workers may race
    return target


def test_esbuild_bundles_and_minifies_typescript_like_qemu():
    esbuild = npm_binary(ESBUILD, "package/bin/esbuild")
    done = assert_same_as_qemu([str(esbuild), "src/main.ts", "--bundle", "--minify",
                                "--target=es2017", "--format=esm"], cwd=PROJECT)
    assert b"green" in done.stdout and b"unused" in done.stdout
