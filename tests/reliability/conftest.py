"""The fault-injection suite: each test starts what it breaks, breaks it for real while work is
in flight, stops what it started by PID, and checks the invariants after (every accepted job
final, one row per job, each widget's file its newest successful deployment's content, nothing
left ``running``).

Each test records its figures with the ``guarantee`` fixture; they are printed at the end of the
run and written to ``var/reliability-last-run.json`` (the table of docs/guarantees.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import PROJECT_ROOT

if TYPE_CHECKING:
    from tests.support.worker_kills import Stack

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


@pytest.fixture(scope="module")
def worker_kill_stack(
    services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One per test module: own Redis, fresh SQLite, S3 through a proxy that can slow it, the
    in-process API and two short-visibility workers (see ``tests/support/worker_kills.py``);
    the tests replace the workers they kill."""
    from tests.support.worker_kills import open_stack

    with open_stack(services, tmp_path_factory.mktemp("worker-kills")) as stack:
        yield stack


@pytest.fixture
def kill_stack(worker_kill_stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The module's stack with two live, ready workers of the pool the test's ``fault`` is
    injected into, and S3 at full speed."""
    from tests.support.worker_kills import WORKER_SIGKILL, pool_for

    callspec = getattr(request.node, "callspec", None)
    fault = callspec.params.get("fault", WORKER_SIGKILL) if callspec else WORKER_SIGKILL
    worker_kill_stack.prepare(pool_for(fault))
    yield worker_kill_stack
    worker_kill_stack.proxy.slow(0)
