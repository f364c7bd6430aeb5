"""Session configuration shared by every test module: the order and spread of the tests,
and the on-disk native code cache they use."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from xdist.remote import Producer
from xdist.scheduler import LoadScopeScheduling


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that boot Linux take minutes: they start first, so the rest of the suite runs
    beside them rather than after them (xdist hands tests out in this order)."""
    items.sort(key=lambda item: item.get_closest_marker("boots_linux") is None)


class ClassScopeScheduling(LoadScopeScheduling):
    """The tests of one class run in one xdist worker, so a class-scoped fixture (a booted
    guest, say) is built once; every other test is scheduled on its own, as ``--dist load``
    does. (xdist's ``--dist loadgroup`` would group by mark, but it renames node ids in a way
    pytest 9 no longer sees.)"""

    def _split_scope(self, nodeid: str) -> str:
        parts = nodeid.split("::")
        return "::".join(parts[:2]) if len(parts) > 2 else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config,
                                log: Producer) -> ClassScopeScheduling | None:
    if config.getvalue("dist") != "load":
        return None  # the user chose a distribution mode: keep it
    return ClassScopeScheduling(config, log)


_CACHE_DIR = pytest.StashKey[str]()
_STENCIL_LIBRARY = "POPEK_TEST_STENCIL_LIBRARY"  # the session's built library (a file)


def pytest_configure(config: pytest.Config) -> None:
    """Every test process (and every popek it starts) uses a native code cache of its own,
    empty at the start, never the user's ~/.cache: a test's outcome must not depend on
    what an earlier run left there (CI starts with none). Decompressed images go to the
    session's directory too (the first test process's, which those xdist starts share)."""
    from popek.engine.native_cache import CACHE, ENV_VAR
    from popek.machine import image_cache

    directory = tempfile.mkdtemp(prefix="popek-code-cache-")
    config.stash[_CACHE_DIR] = directory
    os.environ[ENV_VAR] = directory
    os.environ.setdefault(image_cache.ENV_VAR, os.path.join(directory, "decompressed"))
    CACHE.configure(Path(directory))
    _with_stencil_library(Path(directory))


def _with_stencil_library(directory: Path) -> None:
    """Put the stencil library in the cache, as an installed popek has it (it is built
    once per popek version): the first process of the session builds it, and the test
    processes it starts copy it, so that no test's timing includes building it."""
    from popek.engine import stencils

    if not stencils.supported():
        return
    path = stencils.library_path(directory)
    built = os.environ.get(_STENCIL_LIBRARY)
    if built and Path(built).is_file():
        shutil.copyfile(built, path)
    else:
        stencils.library(directory)
        os.environ[_STENCIL_LIBRARY] = str(path)  # for the test processes xdist starts next


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash.get(_CACHE_DIR, ""), ignore_errors=True)
