"""riscv64 programs from package registries (npm, PyPI), fetched once into a cache for
tests and benchmarks: npm and pip check each download against the registry's hash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ESBUILD = "@esbuild/linux-riscv64@0.24.0"
ESBUILD_MEMBER = "package/bin/esbuild"
INSTALL = "apt-get install nodejs npm (./quickstart does)"
# ruff, a Rust program that checks files on a pool of threads (rayon), linked to glibc.
RUFF = "ruff==0.17.6"
RUFF_PLATFORM = "manylinux_2_31_riscv64"
RUFF_MEMBER = "ruff-0.17.6.data/scripts/ruff"


def cache_dir(registry: str = "npm") -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "popek" / registry


def fetch(package: str, member: str) -> Path:
    """``member`` of the npm ``package``, from the cache or fetched into it; RuntimeError
    saying what is missing if npm cannot get it."""
    cache = cache_dir()
    target = cache / package.replace("/", "+") / member
    if target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed to fetch {package}: {INSTALL}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        packed = subprocess.run([npm, "pack", "--silent", package, "--pack-destination", scratch],
                                capture_output=True, text=True, timeout=300, cwd=scratch)
        if packed.returncode != 0:
            raise RuntimeError(f"npm pack {package} failed: {packed.stderr.strip()[-500:]}")
        with tarfile.open(Path(scratch) / packed.stdout.split()[-1]) as tar:
            tar.extract(member, scratch, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(scratch) / member).chmod(0o755)
        os.replace(Path(scratch) / member, target)  # atomic: parallel workers may race
    return target


def esbuild() -> Path:
    return fetch(ESBUILD, ESBUILD_MEMBER)


def fetch_wheel(requirement: str, platform: str, member: str) -> Path:
    """``member`` of the PyPI wheel ``requirement`` built for ``platform``, from the cache
    or downloaded into it with pip; RuntimeError saying why if pip cannot get it."""
    cache = cache_dir("pypi")
    target = cache / requirement / member
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                              "--only-binary", ":all:", "--platform", platform,
                              "--dest", scratch, requirement],
                             capture_output=True, text=True, timeout=300)
        wheels = list(Path(scratch).glob("*.whl"))
        if got.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {requirement} ({platform}) failed: "
                               f"{got.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(member, scratch)
        target.parent.mkdir(parents=True, exist_ok=True)
        (Path(scratch) / member).chmod(0o755)
        os.replace(Path(scratch) / member, target)  # atomic: parallel workers may race
    return target


def ruff() -> Path:
    return fetch_wheel(RUFF, RUFF_PLATFORM, RUFF_MEMBER)
