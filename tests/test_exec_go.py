"""A Go program from a package registry under popek exec against qemu-riscv64.

esbuild's riscv64 build (npm's ``@esbuild/linux-riscv64``, a static Go binary) uses
what Go's runtime needs of a kernel: threads made with clone, futexes, signals for
goroutine preemption (SIGURG sent with tgkill, handlers on alternate stacks), epoll
and an eventfd for the network poller, nanosleep, mmap. It must bundle and minify
the TypeScript project in tests/user/typescript exactly as it does under qemu-riscv64.
The package is fetched with npm at test time into a cache (~/.cache/popek/npm).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import registry_packages
from tests.test_exec import assert_same_as_qemu

PROJECT = Path(__file__).resolve().parent / "user" / "typescript"


def test_esbuild_bundles_and_minifies_typescript_like_qemu():
    try:
        esbuild = registry_packages.esbuild()
    except RuntimeError as e:
        pytest.fail(str(e))
    done = assert_same_as_qemu([str(esbuild), "src/main.ts", "--bundle", "--minify",
                                "--target=es2017", "--format=esm"], cwd=PROJECT)
    assert b"green" in done.stdout and b"unused" in done.stdout
