"""Workers killed again and again while :data:`DEPLOYS` deploys are accepted and running.

Each fault of ``tests/support/worker_kills.py`` (pool child SIGKILL, whole-worker SIGKILL,
whole-worker SIGTERM) is injected :data:`~tests.support.worker_kills.KILLS` times during
:data:`DEPLOYS` deploys across :data:`WIDGETS` widgets, every other one after an edit of the
widget, so newer snapshots differ and newest-wins is checked. The stack (own Redis, fresh SQLite,
slowed S3, the in-process API, two short-visibility workers) is this module's
``worker_kill_stack``.

After each run: every accepted job ``success``, one row per job, every widget's file its newest
successful deployment's content, nothing ``running``.

``RELIABILITY_SCALE`` (default 1) multiplies the jobs and the kills for a longer run.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import BUCKET
from tests.support.reliability import (
    Call,
    Load,
    check,
    finish_leftovers,
    org_deployments,
    wait_all_final,
)
from tests.support.worker_kills import (
    FAULT_IDS,
    FAULTS,
    KILL_EVERY,
    SCALE,
    SPAN,
    WORKER_SIGTERM,
    HeldTail,
    Stack,
    assert_faults_landed,
    inject,
    reconcile_now,
)
from tests.support.worker_probes import wait_broker_drained

pytestmark = pytest.mark.e2e

DEPLOYS = 200 * SCALE
WIDGETS = 20 * SCALE


@dataclass
class EditingLoad(Load):
    """Deploy requests; every ``edit_every``-th one is preceded by an edit of its widget, so that
    successive snapshots of a widget differ and a stale file would show."""

    edit_every: int = 2
    edits: list[int] = field(default_factory=list)  # statuses of the PATCH requests

    def deploy_once(self, i: int) -> Call:
        if i % self.edit_every == 0:
            widget = self.widgets[i % len(self.widgets)]
            try:
                r = self.org.req("PATCH", f"/widgets/{widget['id']}", json={"name": f"v{i}"})
                status = r.status_code
            except Exception:  # counted as a failed call
                status = 0
            with self._lock:
                self.edits.append(status)
        return super().deploy_once(i)


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_deploys_survive_repeated_worker_kills(
    fault: str, kill_stack: Stack, guarantee: Any
) -> None:
    t0 = time.monotonic()
    org = kill_stack.org()
    try:
        widgets = [org.widget() for _ in range(WIDGETS)]
        kill_stack.proxy.slow(0.05)  # uploads take a while: work is in flight when a kill lands
        load = EditingLoad(org, widgets, threads=4)
        tail = HeldTail(DEPLOYS)
        pace = load.threads * SPAN / DEPLOYS
        runner = load.in_background(DEPLOYS, pace=pace, wait_turn=tail.wait_turn)
        chaos, start, end = inject(
            kill_stack, fault, runner, lambda: org_deployments(org.id), tail=tail
        )
        final = wait_all_final(org.id, 150, tick=reconcile_now)
        wait_broker_drained(kill_stack.broker, 60)
        counts = check(org.id, load.accepted, kill_stack.s3, BUCKET)
        outcome = chaos.outcome()
        clean = chaos.stopped_cleanly() if fault == WORKER_SIGTERM else None
        chaos.wait_ready()
    finally:
        finish_leftovers(org.id)
    statuses, edits = load.statuses(), Counter(load.edits)

    assert statuses == {202: DEPLOYS}, statuses
    assert edits == {200: len(load.edits)}, edits
    assert_faults_landed(fault, chaos, outcome, clean)
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0), counts
    assert counts.jobs == DEPLOYS and counts.failures == 0, counts
    assert {r.status for r in final} == {"success"}
    guarantee(
        f"{fault} x{len(chaos.kills)}, every {KILL_EVERY} s, during {DEPLOYS} deploys",
        jobs=counts.jobs,
        faults=len(chaos.kills),
        kills_in_flight=outcome["hits"],
        worker_restarts=chaos.replacements,
        **{k: v for k, v in outcome.items() if k != "hits"},
        attempts=counts.attempts,
        requeues=counts.requeues,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        http_5xx=sum(n for s, n in (statuses + edits).items() if s >= 500),
        api_p99_s=round(load.p99_between(start, end), 3),
        seconds=round(time.monotonic() - t0, 1),
    )
