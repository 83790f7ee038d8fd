"""The fault-injection suite: each test starts what it breaks, breaks it for real while work is
in flight, stops what it started by PID, and checks the invariants after (every accepted job
final, one row per job, each widget's file its newest successful deployment's content, nothing
left ``running``).

Each test records its figures with the ``guarantee`` fixture; they are printed at the end of the
run and written to ``var/reliability-last-run.json`` (the README's "Guarantees" table).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT

_RESULTS: list[dict[str, Any]] = []
REPORT = PROJECT_ROOT / "var" / "reliability-last-run.json"


@pytest.fixture(autouse=True, scope="session")
def _celery_app_on_the_session_broker(services: dict[str, Any]) -> None:
    """The Celery app reads its configuration once per process, on first use. These tests point
    the process at brokers of their own for a while; the app must have read the session's
    first, or every later test of the session would use a broker that is gone. Session-scoped,
    so it runs before any module fixture switches ``CELERY_BROKER_URL`` (which Celery's
    ``conf.broker_url`` reads on every access)."""
    from worker.celery import app

    assert app.conf.broker_url == services["broker"]


@pytest.fixture
def guarantee(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``guarantee(fault, **figures)``: record one row of the Guarantees table."""

    def record(fault: str, **figures: Any) -> None:
        _RESULTS.append({"test": request.node.nodeid, "fault": fault, **figures})

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _RESULTS:
        return
    Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(_RESULTS, indent=2))
    terminalreporter.section("reliability figures")
    for row in _RESULTS:
        terminalreporter.write_line(json.dumps(row))
