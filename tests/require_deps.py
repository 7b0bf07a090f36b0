"""pytest plugin: dependencies the test command installed must not be skipped past.

``scripts/test`` (the README's and CI's test command) installs the tf, gateway, plot
and test extras and names their modules in ``$BERTPOOL_REQUIRE`` (comma-separated
import names). Under it:

* a required module that does not import stops the run before any test (exit 4);
* a skip whose reason names a required module (``pytest.importorskip``, ``skipif``)
  is reported as a failure, so a broken install cannot turn a run green.

Without ``$BERTPOOL_REQUIRE`` (a developer running a subset), skips stay skips.
Loaded by tests/conftest.py; tests/test_require_deps.py tests it.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest

ENV = "BERTPOOL_REQUIRE"


def required() -> tuple[str, ...]:
    return tuple(name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip())


def pytest_configure(config) -> None:
    missing = []
    for name in required():
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or anything a broken package raises on import
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        raise pytest.UsageError(f"${ENV} requires modules that do not import: {'; '.join(missing)}")


def _names_required(reason: str) -> str | None:
    for name in required():
        top = name.split(".")[0]
        if re.search(rf"(?<![\w.]){re.escape(top)}(?![\w])", reason):
            return name
    return None


def _fail_required_skip(report) -> None:
    if not report.skipped or not required():
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
    name = _names_required(reason)
    if name is not None:
        report.outcome = "failed"
        report.longrepr = f"skipped, but ${ENV} requires {name}: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_skip(outcome.get_result())
