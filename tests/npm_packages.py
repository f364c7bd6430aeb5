"""Programs from the npm registry, fetched once with npm into a cache for tests and
benchmarks (npm checks each tarball against the registry's integrity hash)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

ESBUILD = "@esbuild/linux-riscv64@0.24.0"
ESBUILD_MEMBER = "package/bin/esbuild"
INSTALL = "apt-get install nodejs npm (./quickstart does)"


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "popek" / "npm"


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
