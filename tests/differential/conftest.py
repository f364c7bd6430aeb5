"""Options for the differential suite (also settable as POPEK_DIFF_CASES / POPEK_DIFF_SEED,
which work however pytest is invoked)."""

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("differential", "differential tests against unicorn")
    group.addoption("--diff-cases", type=int, default=None,
                    help="total seeded cases across all instructions (default 100000)")
    group.addoption("--diff-seed", default=None, help="seed of the generated cases (default 1)")
