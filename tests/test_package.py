"""popek as a Python package: ``python -m build`` makes a wheel and an sdist, and the wheel,
installed with pip into a fresh virtual environment outside the checkout, boots the
bundled guest and runs the bundled programs (the images travel inside it as package data).

One module-scoped build and install serves every test (about 50 s: the isolated build
environment and the dependencies come from PyPI, or pip's cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import popek
from tests.linux_guest import BOOT_TIMEOUT

REPO = Path(__file__).resolve().parent.parent
MANIFEST = json.loads((REPO / "images" / "manifest.json").read_text())
# What popek run, popek exec and popek serve need by default.
BUNDLED = ["linux/Image.xz", "linux/Image-smp.xz", "linux/initramfs.cpio.gz",
           "linux/disk.ext4.xz", "programs/busybox", "programs/lua"]
INSTALL_TIMEOUT = 600


def _manifest_sha256(path: str) -> str:
    (entry,) = [a for a in MANIFEST["artifacts"] if a["path"] == path]
    return entry["sha256"]


class Installed:
    """The built distributions and a virtual environment with the wheel installed."""

    def __init__(self, root: Path) -> None:
        self.dist = root / "dist"
        self.env = root / "venv"
        self.home = root / "home"  # the user's data directory: the default disk goes here
        self.home.mkdir()

    @property
    def wheel(self) -> Path:
        (wheel,) = self.dist.glob("*.whl")
        return wheel

    @property
    def sdist(self) -> Path:
        (sdist,) = self.dist.glob("*.tar.gz")
        return sdist

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A command of the installed environment, run from outside the checkout with no
        hint where the checkout is."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("POPEK_IMAGES", "PYTHONPATH", "VIRTUAL_ENV")}
        env["XDG_DATA_HOME"] = str(self.home)
        return subprocess.run([str(self.env / "bin" / argv[0]), *argv[1:]], cwd=self.home,
                              env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    inst = Installed(tmp_path_factory.mktemp("package"))
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(inst.dist), str(REPO)],
                           capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    venv.create(inst.env, with_pip=True)
    pip = subprocess.run([str(inst.env / "bin" / "python"), "-m", "pip", "install", "-q",
                          str(inst.wheel)], capture_output=True, text=True,
                         timeout=INSTALL_TIMEOUT)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return inst


@pytest.mark.boots_linux
class TestTheBuiltPackage:
    """One build and install (module fixture) serves these, and one boot: a class keeps
    them in one xdist worker, so two workers never build in the same checkout at once."""

    def test_the_version_is_declared_once_and_names_both_distributions(
            self, installed: Installed) -> None:
        assert installed.wheel.name == f"popek-{popek.__version__}-py3-none-any.whl"
        assert installed.sdist.name == f"popek-{popek.__version__}.tar.gz"

    def test_the_wheel_carries_the_bundled_images_byte_for_byte(
            self, installed: Installed) -> None:
        with zipfile.ZipFile(installed.wheel) as wheel:
            for path in BUNDLED:
                data = wheel.read(f"popek/guest/{path}")
                assert hashlib.sha256(data).hexdigest() == _manifest_sha256(path), path
            assert not [n for n in wheel.namelist() if "/recipes/" in n or "/src/" in n]

    def test_the_sdist_carries_the_images_so_a_wheel_can_be_built_from_it(
            self, installed: Installed) -> None:
        with tarfile.open(installed.sdist) as sdist:
            names = sdist.getnames()
            for path in BUNDLED:
                member = sdist.getmember(f"{installed.sdist.name[:-7]}/popek/guest/{path}")
                assert member.isfile(), path  # the content, not the checkout's link
        assert any(n.endswith("/pyproject.toml") for n in names)

    def test_installed_popek_finds_its_images_inside_the_installed_package(
            self, installed: Installed) -> None:
        where = installed.run("python", "-c", "from popek import images; print(images.KERNEL)")
        kernel = Path(where.stdout.strip())
        assert kernel.is_relative_to(installed.env) and kernel.is_file(), where

    def test_installed_popek_exec_runs_a_bundled_program(self, installed: Installed) -> None:
        where = installed.run("python", "-c", "from popek import images; print(images.PROGRAMS)")
        busybox = Path(where.stdout.strip()) / "busybox"
        result = installed.run("popek", "exec", str(busybox), "sh", "-c", "echo packaged; exit 3")
        assert (result.returncode, result.stdout) == (3, "packaged\n"), result.stderr

    def test_installed_popek_run_boots_the_bundled_linux(self, installed: Installed) -> None:
        result = installed.run("popek", "run", "-c", "uname -m; ls /mnt/bin", timeout=BOOT_TIMEOUT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["riscv64", "hello-dynamic", "hello-static", "lua"]
