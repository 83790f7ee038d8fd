"""Workers killed again and again while :data:`ARCHIVES` archives are accepted and running.

Each fault of ``tests/support/worker_kills.py`` (pool child SIGKILL, whole-worker SIGKILL,
whole-worker SIGTERM) is injected :data:`~tests.support.worker_kills.KILLS` times during
:data:`ARCHIVES` archives of published widgets (some with unpublished edits), drafts, some with
assets. The stack (own Redis, fresh SQLite, slowed S3, the in-process API, two short-visibility
workers) is this module's ``worker_kill_stack``.

After each run: every accepted job ``success``, one job per widget, the file and assets gone, the
archived copy as last published, drafts deleted without a copy, deployments untouched, nothing
``running``.

``RELIABILITY_SCALE`` (default 1) multiplies the jobs and the kills for a longer run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlmodel import col, select

from tests.conftest import BUCKET
from tests.support.api import OrgClient
from tests.support.reliability import (
    FINAL,
    Call,
    CallLog,
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

ARCHIVES = 50 * SCALE
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@dataclass
class Planned:
    widget: dict[str, Any]
    result: str  # "archived" (ever published) or "deleted" (draft)
    published_name: str | None
    has_asset: bool


@dataclass
class ArchiveLoad(CallLog):
    """``DELETE /widgets/{id}`` for each widget, from a few threads; ``calls`` as in Load."""

    org: OrgClient
    widget_ids: list[str]
    threads: int = 2
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def archive_once(self, i: int, pace: float, tail: HeldTail) -> None:
        tail.wait_turn(i)
        self.timed_call("DELETE", f"/widgets/{self.widget_ids[i]}")  # 202: the archive job
        time.sleep(pace)

    def in_background(self, pace: float, tail: HeldTail) -> threading.Thread:
        def run() -> None:
            with ThreadPoolExecutor(self.threads) as pool:
                list(
                    pool.map(
                        lambda i: self.archive_once(i, pace, tail), range(len(self.widget_ids))
                    )
                )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def archive_jobs(org_id: str) -> list[Any]:
    from worker.db import unit_of_work
    from worker.models import ArchiveJob

    with unit_of_work() as s:
        return list(s.exec(select(ArchiveJob).where(ArchiveJob.organization_id == org_id)).all())


def finish_archive_leftovers(org_id: str) -> None:
    """Unfinished archive jobs of the test's organization end ``failure``, so that no later
    reconcile of the module's database sends them."""
    from worker.db import unit_of_work
    from worker.models import ArchiveJob, utcnow

    with unit_of_work() as s:
        stmt = select(ArchiveJob).where(
            ArchiveJob.organization_id == org_id, col(ArchiveJob.status).not_in(FINAL)
        )
        for job in s.exec(stmt).all():
            job.status, job.finished_at = "failure", utcnow()
            s.add(job)


def wait_archives_final(org_id: str, count: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + 2
    while True:
        jobs = archive_jobs(org_id)
        if len(jobs) >= count and all(j.status in FINAL for j in jobs):
            return jobs
        pending = [(j.widget_id, j.status, j.error) for j in jobs if j.status not in FINAL]
        assert time.monotonic() < deadline, f"archives not final after {timeout}s: {pending[:10]}"
        if time.monotonic() >= next_tick:
            with contextlib.suppress(Exception):
                reconcile_now()
            next_tick = time.monotonic() + 2
        time.sleep(0.25)


def s3_keys(s3: Any, prefix: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def check_archives(
    org: OrgClient, plan: dict[str, Planned], accepted: list[dict[str, Any]], s3: Any
) -> dict[str, int]:
    """The archive invariants, as counts (all must be zero but ``jobs``)."""
    from worker.db import unit_of_work
    from worker.models import ArchivedWidget, Widget, WidgetAsset

    jobs = archive_jobs(org.id)
    by_id = {j.id: j for j in jobs}
    per_widget = Counter(j.widget_id for j in jobs)
    with unit_of_work() as s:
        copies = {
            a.id: a
            for a in s.exec(
                select(ArchivedWidget).where(ArchivedWidget.organization_id == org.id)
            ).all()
        }
        widgets_left = len(s.exec(select(Widget).where(Widget.organization_id == org.id)).all())
        asset_rows = len(
            s.exec(select(WidgetAsset).where(WidgetAsset.organization_id == org.id)).all()
        )
    wrong_copy = 0
    for widget_id, p in plan.items():
        copy = copies.get(widget_id)
        if p.result == "archived":
            wrong_copy += copy is None or copy.name != p.published_name
        else:
            wrong_copy += copy is not None
    listed = org.req("GET", "/widgets/archived", params={"$limit": 1000})
    assert listed.status_code == 200, listed.text
    expected_listed = {w for w, p in plan.items() if p.result == "archived"}
    return {
        "jobs": len(jobs),
        "lost": sum(
            1 for a in accepted if a["id"] not in by_id or by_id[a["id"]].status != "success"
        ),
        "duplicated": sum(1 for n in per_widget.values() if n > 1),
        "running": sum(1 for j in jobs if j.status == "running"),
        "failures": sum(1 for j in jobs if j.status == "failure"),
        "wrong_result": sum(
            1 for j in jobs if j.widget_id in plan and j.result != plan[j.widget_id].result
        ),
        "wrong_copy": wrong_copy,
        "wrong_listing": len({a["id"] for a in listed.json()} ^ expected_listed),
        "widgets_left": widgets_left,
        # A file still served for an archived widget (it must no longer render on websites).
        "stale": sum(1 for w in plan if s3_keys(s3, org.container_key(w))),
        "assets_left": asset_rows + len(s3_keys(s3, f"assets/{org.api_key}/")),
    }


def plan_archives(org: OrgClient) -> dict[str, Planned]:
    """:data:`ARCHIVES` widgets: 4 in 5 deployed (published), 1 in 5 drafts; an asset on 1 in 5
    published widgets and on every other draft. The deploys are sent, not waited for."""
    plan: dict[str, Planned] = {}
    for i in range(ARCHIVES):
        w = org.widget(name=f"archive-{i}")
        has_asset = i % 5 == 2 or i % 10 == 4
        if has_asset:
            files = {"file": ("logo.png", PNG, "image/png")}
            r = org.req("POST", f"/widgets/{w['id']}/assets", files=files)
            assert r.status_code == 201, r.text
        draft = i % 5 == 4
        if not draft:
            org.deploy(w["id"])
        result, name = ("deleted", None) if draft else ("archived", w["name"])
        plan[w["id"]] = Planned(w, result, name, has_asset)
    return plan


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_archives_survive_repeated_worker_kills(
    fault: str, kill_stack: Stack, guarantee: Any
) -> None:
    t0 = time.monotonic()
    org = kill_stack.org()
    try:
        plan = plan_archives(org)
        deployed = wait_all_final(org.id, 120, tick=reconcile_now)
        assert {d.status for d in deployed} == {"success"}
        for i, p in enumerate(plan.values()):
            if p.result == "archived" and i % 4 == 1:  # archived as last published
                r = org.req("PATCH", f"/widgets/{p.widget['id']}", json={"name": "edited"})
                assert r.status_code == 200, r.text
        kill_stack.proxy.slow(0.25)  # an archive makes a few S3 calls: work is in flight
        load = ArchiveLoad(org, list(plan), threads=2)
        tail = HeldTail(ARCHIVES)
        runner = load.in_background(pace=load.threads * SPAN / ARCHIVES, tail=tail)
        chaos, start, end = inject(
            kill_stack, fault, runner, lambda: archive_jobs(org.id), tail=tail
        )
        jobs = wait_archives_final(org.id, ARCHIVES, 150)
        wait_broker_drained(kill_stack.broker, 60)
        kill_stack.proxy.slow(0)
        counts = check_archives(org, plan, load.accepted, kill_stack.s3)
        after = org_deployments(org.id)
        outcome = chaos.outcome()
        clean = chaos.stopped_cleanly() if fault == WORKER_SIGTERM else None
        chaos.wait_ready()
    finally:
        finish_leftovers(org.id)
        finish_archive_leftovers(org.id)
    statuses = load.statuses()

    assert statuses == {202: ARCHIVES}, statuses
    assert_faults_landed(fault, chaos, outcome, clean)
    assert counts["jobs"] == ARCHIVES, counts
    assert {k: v for k, v in counts.items() if k != "jobs" and v} == {}, counts
    # Deployments are never touched by archiving: they keep every configuration.
    assert sorted((d.id, d.status) for d in after) == sorted((d.id, d.status) for d in deployed)
    guarantee(
        f"{fault} x{len(chaos.kills)}, every {KILL_EVERY} s, during {ARCHIVES} archives",
        jobs=counts["jobs"],
        faults=len(chaos.kills),
        kills_in_flight=outcome["hits"],
        worker_restarts=chaos.replacements,
        **{k: v for k, v in outcome.items() if k != "hits"},
        attempts=sum(j.attempts for j in jobs),
        requeues=sum(j.requeues for j in jobs),
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        stale=counts["stale"],
        failures=counts["failures"],
        http_5xx=sum(n for s, n in statuses.items() if s >= 500),
        api_p99_s=round(load.p99_between(start, end), 3),
        seconds=round(time.monotonic() - t0, 1),
    )
