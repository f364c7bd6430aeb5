"""A threaded Rust program from a package registry under popek exec against qemu-riscv64.

ruff's riscv64 wheel (PyPI) holds a glibc-linked Rust binary that checks files on a
pool of threads (rayon: clone, futexes, sched_getaffinity for the pool's size). Checking
a small project with every rule must report exactly what it reports under qemu-riscv64.
The wheel is fetched with pip at test time into a cache (~/.cache/popek/pypi).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import registry_packages
from tests.test_exec import assert_same_as_qemu

SOURCES = {
    "app/__init__.py": "",
    "app/main.py": "import os, sys\n\ndef greet( name ):\n  print('hi '+name)\n"
                   "  return os.path.join(name,'x')\n",
    "app/util.py": "from typing import List\n\ndef total(xs: List[int]) -> int:\n"
                   "    s = 0\n    for x in xs: s += x\n    return s\n",
    "app/data.py": "VALUES = [1,2,3]\nunused = lambda v: v*2\nclass thing:\n    pass\n",
}


def test_ruff_checks_a_project_on_threads_like_qemu(tmp_path: Path):
    try:
        ruff = registry_packages.ruff()
    except RuntimeError as e:
        pytest.fail(str(e))
    for name, text in SOURCES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    done = assert_same_as_qemu([str(ruff), "check", "--no-cache", "--select", "ALL",
                                "--output-format", "concise", "app"], cwd=tmp_path)
    assert b"E401" in done.stdout and b"Found" in done.stdout
    assert done.returncode == 1
