"""Bulk redeploys: the fan-out is idempotent and resumable, progress counts are consistent."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import func, select

from tests.support.jobs import poll
from worker.db import unit_of_work
from worker.models import BulkJob, Deployment
from worker.services import bulk


class Crash(Exception):
    """Stands in for the process dying mid fan-out (a kill here would also take the test)."""


def new_job(org_id: str, selector: dict[str, Any]) -> str:
    with unit_of_work() as s:
        return bulk.create(s, org_id, selector, "test", "because").id


def rows(bulk_id: str) -> list[Deployment]:
    with unit_of_work() as s:
        return list(s.exec(select(Deployment).where(Deployment.bulk_id == bulk_id)).all())


def test_fan_out_resumed_after_a_crash_creates_no_second_deployment(database, org):
    widgets = [org.widget()["id"] for _ in range(10)]
    bulk_id = new_job(org.id, {"widget_ids": widgets})
    sent: list[str] = []

    def crashing_send(_org: str, _widget: str, dep_id: str) -> None:
        if len(sent) == 6:
            raise Crash
        sent.append(dep_id)

    with pytest.raises(Crash):
        bulk.fan_out(bulk_id, crashing_send, batch=4)  # several batches with few widgets
    assert 0 < len(rows(bulk_id)) < 10  # it died half-way through
    bulk.fan_out(bulk_id, lambda _o, _w, d: sent.append(d), batch=4)
    bulk.fan_out(bulk_id, lambda _o, _w, d: sent.append(d), batch=4)  # a redelivery after it ended
    made = rows(bulk_id)
    assert sorted(d.widget_id for d in made) == sorted(widgets)  # one each, no more
    assert set(sent) == {d.deployment_id for d in made}  # every one sent (some twice: harmless)
    assert {(d.created_by, d.reason) for d in made} == {("test", "because")}
    with unit_of_work() as s:
        job = s.get(BulkJob, bulk_id)
        assert job is not None and job.fanned_out_at is not None


def test_bulk_api_runs_on_a_worker_with_consistent_progress(database, org, celery_worker):
    widgets = [org.widget()["id"] for _ in range(6)]
    r = org.req("POST", "/widgets/deployments/bulk", json={"widget_ids": widgets, "reason": "r"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"].startswith(f"/widgets/deployments/bulk/{job['id']}")
    seen: list[dict[str, Any]] = []

    def done() -> dict[str, Any] | None:
        cur = org.req("GET", f"/widgets/deployments/bulk/{job['id']}").json()
        seen.append(cur)
        return cur if cur["status"] in ("success", "failure") else None

    final = poll(done, 60, "bulk job")
    for snap in seen:  # every poll adds up
        assert snap["total"] == snap["ready"] + snap["running"] + snap["success"] + snap["failure"]
    assert (final["status"], final["total"], final["success"]) == ("success", 6, 6), final
    assert final["reason"] == "r" and final["created_by"] not in ("", "producer")
    listed = org.req("GET", "/widgets/deployments", params={"bulk_id": job["id"]}).json()
    assert sorted(d["widget_id"] for d in listed) == sorted(widgets)


def test_bulk_by_publication_status_selects_only_those_widgets(database, org, celery_worker):
    edited = org.widget()
    fresh = org.widget()
    for w in (edited, fresh):
        assert org.wait_deployment(org.deploy(w["id"])["id"])["status"] == "success"
    org.req("PATCH", f"/widgets/{edited['id']}", json={"name": "changed"})
    r = org.req(
        "POST", "/widgets/deployments/bulk", json={"publication_status": "unpublished_changes"}
    )
    assert r.status_code == 202, r.text
    bulk_id = r.json()["id"]
    poll(
        lambda: (
            org.req("GET", f"/widgets/deployments/bulk/{bulk_id}").json()["status"] == "success"
        ),
        60,
        "bulk job",
    )
    listed = org.req("GET", "/widgets/deployments", params={"bulk_id": bulk_id}).json()
    assert [d["widget_id"] for d in listed] == [edited["id"]]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"widget_ids": ["a"], "purpose_id": "b"},
        {"publication_status": "archived"},
        {"widget_ids": []},
    ],
)
def test_bulk_selector_must_be_exactly_one_valid_one(sqlite_database, org, body):
    r = org.req("POST", "/widgets/deployments/bulk", json=body)
    assert r.status_code == 400 and r.json()["name"] == "BadRequest", r.text
    with unit_of_work() as s:
        assert s.exec(select(func.count()).where(BulkJob.organization_id == org.id)).one() == 0


def test_bulk_of_another_organizations_widget_is_refused(sqlite_database, org, make_org):
    theirs = make_org().widget()
    r = org.req("POST", "/widgets/deployments/bulk", json={"widget_ids": [theirs["id"]]})
    assert r.status_code == 400 and "widget_ids" in r.json()["errors"], r.text
