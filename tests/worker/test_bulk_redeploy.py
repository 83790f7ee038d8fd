"""Bulk redeploys: the fan-out is idempotent, resumable and runs in bounded slices (one message
each, well inside the soft time limit), progress counts are consistent.

Recovery by the reconciler (a send that failed, a slice's message lost) is in
``test_bulk_reconcile.py``."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import func, select

from tests.support.jobs import poll
from worker.db import unit_of_work
from worker.models import BulkJob, Deployment
from worker.services import bulk
from worker.services.bulk import Slice


class Crash(Exception):
    """Stands in for the process dying mid fan-out (a kill here would also take the test)."""


def new_job(org_id: str, selector: dict[str, Any]) -> str:
    with unit_of_work() as s:
        return bulk.create(s, org_id, selector, "test", "because").id


def rows(bulk_id: str) -> list[Deployment]:
    with unit_of_work() as s:
        return list(s.exec(select(Deployment).where(Deployment.bulk_id == bulk_id)).all())


def load(bulk_id: str) -> BulkJob:
    with unit_of_work() as s:
        job = s.get(BulkJob, bulk_id)
        assert job is not None
        return job


def progress(bulk_id: str) -> bulk.Progress:
    with unit_of_work() as s:
        job = s.get(BulkJob, bulk_id)
        assert job is not None
        return bulk.progress(s, job)


def fan_out_all(bulk_id: str, send: bulk.SendChunk, **limits: Any) -> list[Slice]:
    """Run slices until the job is finished, as the chain of messages would."""
    slices = [bulk.fan_out(bulk_id, send, **limits)]
    while not slices[-1].done:
        slices.append(bulk.fan_out(bulk_id, send, **limits))
    return slices


def test_fan_out_resumed_after_a_crash_creates_no_second_deployment(database, org):
    widgets = [org.widget()["id"] for _ in range(10)]
    bulk_id = new_job(org.id, {"widget_ids": widgets})
    sent: list[str] = []

    def crashing_send(_org: str, chunk: list[tuple[str, str]]) -> None:
        if len(sent) >= 4:  # the second batch's chunk
            raise Crash
        sent.extend(d for _, d in chunk)

    with pytest.raises(Crash):
        bulk.fan_out(bulk_id, crashing_send, batch=4)  # several batches with few widgets
    assert 0 < len(rows(bulk_id)) < 10  # it died half-way through
    fan_out_all(bulk_id, lambda _o, chunk: sent.extend(d for _, d in chunk), batch=4)
    again = bulk.fan_out(
        bulk_id, lambda _o, chunk: sent.extend(d for _, d in chunk), batch=4
    )  # a redelivery
    assert again == Slice(sent=0, batches=0, done=True)
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


def test_a_slice_is_bounded_by_its_batches_and_its_time_budget(database, org):
    widgets = sorted(org.widget()["id"] for _ in range(7))
    bulk_id = new_job(org.id, {"widget_ids": widgets})
    sent: list[str] = []

    def send(_org: str, chunk: list[tuple[str, str]]) -> None:
        sent.extend(w for w, _ in chunk)

    first = bulk.fan_out(bulk_id, send, batch=2, max_batches=2)
    assert first == Slice(sent=4, batches=2, done=False)
    assert load(bulk_id).cursor == widgets[3] and sorted(sent) == widgets[:4]
    assert progress(bulk_id).status == "running"
    # A spent time budget (0 s) stops the slice after its first batch, however many are allowed.
    second = bulk.fan_out(bulk_id, send, batch=2, max_batches=100, budget=0.0)
    assert second == Slice(sent=2, batches=1, done=False)
    last = bulk.fan_out(bulk_id, send, batch=2, max_batches=100)
    assert last == Slice(sent=1, batches=1, done=True)
    assert sorted(sent) == widgets and len(rows(bulk_id)) == 7
    job = load(bulk_id)
    assert job.fanned_out_at is not None and job.attempts == 0  # progress resets the count


def test_a_cursor_never_moves_back(database, org):
    """Two messages of one job (a redelivery and a re-send) may run at once: the one behind
    must not pull the cursor back over the other's work (it would only repeat it, but still)."""
    widgets = sorted(org.widget()["id"] for _ in range(4))
    bulk_id = new_job(org.id, {"widget_ids": widgets})
    bulk.fan_out(bulk_id, lambda *_: None, batch=3, max_batches=1)
    bulk._advance(bulk_id, widgets[0])  # the slower message finishing an older batch
    assert load(bulk_id).cursor == widgets[2]


def test_a_fan_out_that_never_progresses_is_given_up_and_reads_failure(database, org):
    widgets = [org.widget()["id"] for _ in range(3)]
    bulk_id = new_job(org.id, {"widget_ids": widgets})
    bulk.fan_out(bulk_id, lambda *_: None, batch=1, max_batches=1)  # one deployment made
    # Every later delivery died before finishing a batch (a poison slice killing its worker).
    with unit_of_work() as s:
        job = s.get(BulkJob, bulk_id)
        assert job is not None
        job.attempts = bulk.MAX_ATTEMPTS
        s.add(job)
    assert bulk.fan_out(bulk_id, lambda *_: None).done
    job = load(bulk_id)
    assert job.fanned_out_at is None and "without progress" in (job.error or "")
    assert progress(bulk_id).status == "running"  # its one deployment is still ready
    with unit_of_work() as s:
        for dep in s.exec(select(Deployment).where(Deployment.bulk_id == bulk_id)).all():
            dep.status = "success"
            s.add(dep)
    state = progress(bulk_id)
    assert (state.status, state.success, state.failure) == ("failure", 1, 0), state
    assert state.error == job.error
    shown = org.req("GET", f"/widgets/deployments/bulk/{bulk_id}").json()  # what a client reads
    assert (shown["status"], shown["error"]) == ("failure", job.error), shown
    assert bulk.fan_out(bulk_id, lambda *_: None) == Slice(0, 0, True)  # stays given up


def test_a_large_selector_runs_as_a_chain_of_slices_on_the_worker(
    database, org, celery_worker, monkeypatch
):
    """Scaled down, not mocked: a slice is 20 batches of 500 widgets (about 10,000, ~15 s at
    2.3 ms each) in production; 4-widget batches, 2 per slice, show the same chain of messages
    on 30 real widgets in seconds. ``test_bulk_fan_out_scale.py`` runs the real sizes (100,000
    widgets with ``BULK_SCALE_WIDGETS=100000``)."""
    monkeypatch.setattr(bulk, "BATCH", 4)
    monkeypatch.setattr(bulk, "SLICE_BATCHES", 2)
    by_job: dict[str, list[Slice]] = {}
    real_fan_out = bulk.fan_out

    def recorded(bulk_id: str, *args: Any, **kwargs: Any) -> Slice:
        done = real_fan_out(bulk_id, *args, **kwargs)
        by_job.setdefault(bulk_id, []).append(done)
        return done

    monkeypatch.setattr(bulk, "fan_out", recorded)  # only watches: the worker runs the real one
    widgets = {org.widget()["id"] for _ in range(30)}
    # An uncapped selector: every draft of the organization.
    r = org.req("POST", "/widgets/deployments/bulk", json={"publication_status": "draft"})
    assert r.status_code == 202, r.text
    bulk_id = r.json()["id"]

    def finished() -> dict[str, Any] | None:
        cur = org.req("GET", f"/widgets/deployments/bulk/{bulk_id}").json()
        return cur if cur["status"] in ("success", "failure") else None

    final = poll(finished, 120, "the bulk job")
    assert (final["status"], final["total"], final["success"]) == ("success", 30, 30), final
    assert {d.widget_id for d in rows(bulk_id)} == widgets  # one deployment each
    # 30 widgets, 8 per slice: four slices with work, then one that finds nothing left.
    slices = by_job[bulk_id]
    assert [s.batches for s in slices] == [2, 2, 2, 2, 0], slices
    assert all(s.sent <= 8 for s in slices) and sum(s.sent for s in slices) == 30
    assert [s.done for s in slices] == [False] * 4 + [True]
    job = load(bulk_id)
    assert job.requeues == 0 and job.fanned_out_at is not None
