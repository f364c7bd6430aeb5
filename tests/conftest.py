"""Session configuration shared by every test module: the order and spread of the tests."""

from __future__ import annotations

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
