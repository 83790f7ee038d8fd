"""widgets.cleanup_drafts: which drafts are stale, batches, two cleanups at once, the task on a
real worker, and the CLI dry run.

The service-level tests freeze time at ``NOW`` (2001): widgets dated relative to it are far older
than anything other tests create, and each test works in fresh organizations and looks only at
them, because the database is shared by the whole session.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import col, select

from tests.conftest import BUCKET, PROJECT_ROOT
from tests.support.jobs import poll
from worker import constants as c
from worker.celery import app
from worker.db import unit_of_work
from worker.models import ArchiveJob, Deployment, Organization, Widget, utcnow
from worker.processes import BIN_DIR
from worker.services.cleanup import archive_stale_drafts, find_stale_drafts

NOW = datetime(2001, 6, 1, 12, 0, tzinfo=UTC)
DAYS = 30
STALE = timedelta(days=DAYS + 1)


def new_org() -> str:
    org = Organization(name=f"cleanup-{uuid.uuid4().hex[:8]}")
    with unit_of_work() as s:
        s.add(org)
    return org.id


def add_widget(
    org_id: str,
    age: timedelta,
    *,
    now: datetime = NOW,
    published: bool = False,
    edited_after_publish: bool = False,
    deployment: str | None = None,
    archived: bool = False,
) -> str:
    """A widget last edited ``age`` before ``now``, optionally with a deployment of a status."""
    stamp = now - age
    w = Widget(
        organization_id=org_id,
        name=f"w-{uuid.uuid4().hex[:6]}",
        version=2 if edited_after_publish else 1,
        published_version=1 if published else None,
        archived_at=stamp if archived else None,
        created_at=stamp,
        updated_at=stamp,
    )
    with unit_of_work() as s:
        s.add(w)
        if deployment is not None:
            s.add(
                Deployment(
                    organization_id=org_id, widget_id=w.id, status=deployment, enqueued_at=utcnow()
                )
            )
    return w.id


def widgets_of(*org_ids: str) -> dict[str, Widget]:
    with unit_of_work() as s:
        rows = s.exec(select(Widget).where(col(Widget.organization_id).in_(org_ids))).all()
        return {w.id: w for w in rows}


def jobs_of(*org_ids: str) -> list[ArchiveJob]:
    with unit_of_work() as s:
        stmt = select(ArchiveJob).where(col(ArchiveJob.organization_id).in_(org_ids))
        return list(s.exec(stmt).all())


def jobs_per_widget(*org_ids: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs_of(*org_ids):
        counts[job.widget_id] = counts.get(job.widget_id, 0) + 1
    return counts


@pytest.fixture
def fresh_org() -> Iterator[Callable[[], str]]:
    """Organizations for one test; their leftover drafts are hidden from later cleanups."""
    created: list[str] = []

    def make() -> str:
        created.append(new_org())
        return created[-1]

    yield make
    if created:
        with unit_of_work() as s:
            rows = s.exec(
                select(Widget).where(
                    col(Widget.organization_id).in_(created), col(Widget.archived_at).is_(None)
                )
            ).all()
            for w in rows:
                w.archived_at = utcnow()
                s.add(w)


def test_selection_rules(database, fresh_org):
    org = fresh_org()
    stale = {
        "old draft": add_widget(org, STALE),
        "just past the window": add_widget(org, timedelta(days=DAYS, minutes=1)),
        "draft whose deploy failed": add_widget(org, STALE, deployment="failure"),
    }
    kept = {
        "recent draft": add_widget(org, timedelta(days=5)),
        "just inside the window": add_widget(org, timedelta(days=DAYS) - timedelta(minutes=1)),
        "published": add_widget(org, STALE * 3, published=True),
        "unpublished changes": add_widget(
            org, STALE * 3, published=True, edited_after_publish=True
        ),
        "deployment ready": add_widget(org, STALE, deployment="ready"),
        "deployment running": add_widget(org, STALE, deployment="running"),
        "already archived": add_widget(org, STALE, archived=True),
    }
    found = {w.id for w in find_stale_drafts(DAYS, 10_000, now=NOW) if w.organization_id == org}
    assert found == set(stale.values()), {
        name: wid in found for name, wid in {**stale, **kept}.items()
    }
    # The dry run changes nothing.
    assert all(w.archived_at is None for w in widgets_of(org).values() if w.id in found)
    assert jobs_of(org) == []
    # A longer retention keeps them all.
    later = find_stale_drafts(DAYS + 10, 10_000, now=NOW)
    assert [w for w in later if w.organization_id == org] == []


def test_archives_only_stale_drafts_through_archive_jobs(database, fresh_org):
    org = fresh_org()
    old = add_widget(org, STALE)
    untouched = [
        add_widget(org, timedelta(days=2)),
        add_widget(org, STALE, published=True),
        add_widget(org, STALE, published=True, edited_after_publish=True),
        add_widget(org, STALE, deployment="ready"),
        add_widget(org, STALE, deployment="running"),
    ]
    report = archive_stale_drafts(DAYS, 100, now=NOW)
    mine = [a for a in report.archived if a[0] == org]
    assert [a[1] for a in mine] == [old]

    rows = widgets_of(org)
    assert rows[old].archived_at is not None  # hidden from /widgets at once
    for wid in untouched:
        assert rows[wid].archived_at is None, wid
    (job,) = jobs_of(org)
    assert (job.widget_id, job.id, job.status) == (old, mine[0][2], "ready")
    assert job.enqueued_at is not None and job.result is None

    # A second run finds nothing more for this organization and creates no second job.
    again = archive_stale_drafts(DAYS, 100, now=NOW)
    assert [a for a in again.archived if a[0] == org] == []
    assert jobs_per_widget(org) == {old: 1}


def test_archives_every_stale_draft_in_batches(database, fresh_org):
    org = fresh_org()
    ids = {add_widget(org, STALE + timedelta(hours=i)) for i in range(5)}
    # One batch of two is all a single batch may take, whoever's drafts they are.
    first = archive_stale_drafts(DAYS, 2, max_batches=1, now=NOW)
    assert len(first.archived) == 2
    rest = archive_stale_drafts(DAYS, 2, now=NOW)
    mine = [a[1] for a in first.archived + rest.archived if a[0] == org]
    assert sorted(mine) == sorted(ids)
    assert jobs_per_widget(org) == dict.fromkeys(ids, 1)
    assert all(w.archived_at is not None for w in widgets_of(org).values())


def test_each_batch_is_handed_over_after_its_commit(database, fresh_org):
    """The cleanup task sends a batch's archive jobs as soon as it is committed, not at the end
    of the run: at hand-over time the batch's rows are already archived with ``ready`` jobs."""
    org = fresh_org()
    ids = {add_widget(org, STALE + timedelta(hours=i)) for i in range(5)}
    handed: list[list[tuple[str, str, str]]] = []

    def on_batch(jobs: list[tuple[str, str, str]]) -> None:
        mine = [j for j in jobs if j[0] == org]
        rows = widgets_of(org)  # a session of its own: sees only committed rows
        assert all(rows[wid].archived_at is not None for _, wid, _ in mine)
        handed.append(jobs)

    report = archive_stale_drafts(DAYS, 2, now=NOW, on_batch_committed=on_batch)
    assert [j for batch in handed for j in batch] == report.archived
    assert all(len(batch) <= 2 for batch in handed) and len(handed) >= 3
    assert {j[1] for batch in handed for j in batch if j[0] == org} == ids


def test_two_cleanups_at_once_archive_each_widget_once(database, fresh_org):
    orgs = [fresh_org(), fresh_org()]
    ids = {add_widget(orgs[i % 2], STALE + timedelta(minutes=i)) for i in range(24)}
    barrier = threading.Barrier(2)
    reports: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            reports.append(archive_stale_drafts(DAYS, 2, now=NOW))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(reports) == 2
    per_report = [[a[1] for a in r.archived if a[0] in orgs] for r in reports]
    claimed = per_report[0] + per_report[1]
    assert sorted(claimed) == sorted(ids), "a widget was archived twice or not at all"
    assert jobs_per_widget(*orgs) == dict.fromkeys(ids, 1)


def _age(widget_id: str, age: timedelta) -> None:
    with unit_of_work() as s:
        w = s.get(Widget, widget_id)
        assert w is not None
        w.updated_at = utcnow() - age
        s.add(w)


def test_cleanup_task_archives_stale_drafts_on_a_worker(sqlite_database, org, celery_worker, s3):
    stale = org.widget()
    up = org.req(
        "POST",
        f"/widgets/{stale['id']}/assets",
        files={"file": ("a.png", b"\x89PNG\r\n\x1a\n..", "image/png")},
    )
    assert up.status_code == 201, up.text
    recent = org.widget()
    published = org.widget()
    assert org.wait_deployment(org.deploy(published["id"])["id"])["status"] == "success"
    _age(stale["id"], STALE)
    _age(recent["id"], timedelta(days=DAYS - 2))
    _age(published["id"], STALE * 2)

    app.send_task(c.CLEANUP_TASK, queue=c.MAINTENANCE_QUEUE)

    def done() -> ArchiveJob | None:
        jobs = [j for j in jobs_of(org.id) if j.widget_id == stale["id"]]
        return jobs[0] if jobs and jobs[0].status in ("success", "failure") else None

    job = poll(done, 60, "the cleanup's archive job")
    assert (job.status, job.result) == ("success", "deleted"), job
    assert jobs_per_widget(org.id) == {stale["id"]: 1}
    rows = widgets_of(org.id)
    assert stale["id"] not in rows  # a draft is deleted, with its assets
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=up.json()["s3_key"]).get("KeyCount") == 0
    assert rows[recent["id"]].archived_at is None
    assert rows[published["id"]].archived_at is None
    assert org.req("GET", f"/widgets/{published['id']}").status_code == 200
    s3.head_object(Bucket=BUCKET, Key=org.container_key(published["id"]))


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "python"), "-m", "worker.cli", "cleanup", "--dry-run", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_dry_run_lists_stale_drafts_and_archives_nothing(sqlite_database, fresh_org):
    org = fresh_org()
    stale = add_widget(org, timedelta(days=40), now=utcnow())
    recent = add_widget(org, timedelta(days=3), now=utcnow())

    out = _dry_run()
    assert out.returncode == 0, out.stderr
    listed = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    mine = [row for row in listed if row["organization_id"] == org]
    assert [row["widget_id"] for row in mine] == [stale], out.stdout
    assert "would be archived" in out.stdout.splitlines()[-1]
    assert widgets_of(org)[stale].archived_at is None
    assert jobs_of(org) == []

    for longer in (_dry_run("--days", "60"), _dry_run(DRAFT_RETENTION_DAYS="60")):
        assert longer.returncode == 0, longer.stderr
        assert stale not in longer.stdout and recent not in longer.stdout
