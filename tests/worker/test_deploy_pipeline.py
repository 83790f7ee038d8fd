"""The deploy pipeline in this process: API → Redis → in-process Celery worker → S3 (moto, through
the fault proxy) → database; the service function is called directly where order matters."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import uuid
import warnings
from typing import Any

import pytest
from sqlmodel import select

from tests.conftest import BUCKET, reset_process_state
from worker import constants as c
from worker.celery import app
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import FINAL_STATUSES, Deployment, Widget, utcnow
from worker.s3 import S3Store, TransientS3Error, close_store, get_store
from worker.services.deploy import MAX_ATTEMPTS, run_deployment
from worker.settings import get_settings


def _send(org_id: str, widget_id: str, dep_id: str) -> None:
    kwargs = {"organization_id": org_id, "widget_id": widget_id, "deployment_id": dep_id}
    app.send_task(c.DEPLOY_TASK, kwargs=kwargs, queue=c.DEPLOY_QUEUE)


def _rows(dep_id: str) -> list[Deployment]:
    with unit_of_work() as s:
        return list(s.exec(select(Deployment).where(Deployment.deployment_id == dep_id)).all())


def _wait_row(dep_id: str, timeout: float = 30) -> Deployment:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(dep_id)
        if (rows and rows[0].status in FINAL_STATUSES) or time.monotonic() > deadline:
            assert rows, f"no deployments row for {dep_id} after {timeout}s"
            return rows[0]
        time.sleep(0.1)


def _widget(widget_id: str) -> Widget | None:
    with unit_of_work() as s:
        return s.get(Widget, widget_id)


def _insert_deployment(org_id: str, widget_id: str, **fields: Any) -> str:
    """A row as the API (or a crashed earlier delivery) left it, with no message sent for it."""
    dep = Deployment(organization_id=org_id, widget_id=widget_id, enqueued_at=utcnow(), **fields)
    with unit_of_work() as s:
        s.add(dep)
    return dep.deployment_id


def _drain(org) -> None:
    """Deliveries are processed in order (solo pool, prefetch 1): once a job sent now is done,
    every message sent before it has been handled too."""
    w, dep_id = org.widget(), new_id()
    _send(org.id, w["id"], dep_id)
    assert _wait_row(dep_id).status == "success"


def _puts(proxy, key: str, status: int | None = None) -> int:
    return sum(
        1
        for m, path, s in list(proxy.requests)
        if m == "PUT" and path.split("?")[0].endswith("/" + key) and status in (None, s)
    )


def _s3_json(s3, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _status(org, widget_id: str) -> str:
    return org.req("GET", f"/widgets/{widget_id}").json()["publication_status"]


def test_edit_then_redeploy_publishes_the_new_version(database, org, celery_worker, s3):
    w = org.widget([org.purpose()], name="first")
    first = org.wait_deployment(org.deploy(w["id"])["id"])
    assert first["status"] == "success", first
    edit = {"name": "second", "components": {"texts": {"title": {"en": "Hello"}}}}
    r = org.req("PATCH", f"/widgets/{w['id']}", json=edit)
    assert r.status_code == 200, r.text
    assert r.json()["publication_status"] == "unpublished_changes"
    second = org.wait_deployment(org.deploy(w["id"])["id"])
    assert second["status"] == "success" and second["deployment_id"] != first["deployment_id"]
    body = _s3_json(s3, org.container_key(w["id"]))
    assert body == second["config"] and body["deployment_id"] == second["deployment_id"]
    assert (body["widget"]["name"], body["widget"]["components"]) == ("second", edit["components"])
    assert _status(org, w["id"]) == "published"


def test_duplicate_delivery_publishes_once(database, org, celery_worker, s3, s3_faults):
    w, dep_id = org.widget(), new_id()
    _send(org.id, w["id"], dep_id)
    _send(org.id, w["id"], dep_id)
    _drain(org)
    rows = _rows(dep_id)
    assert len(rows) == 1 and (rows[0].status, rows[0].attempts) == ("success", 1), rows
    assert _puts(s3_faults, org.container_key(w["id"]), 200) == 1
    assert _s3_json(s3, org.container_key(w["id"]))["deployment_id"] == dep_id


def test_concurrent_duplicate_runs_publish_once(database, org, s3, s3_faults):
    w, dep_id = org.widget(), new_id()
    barrier, results, errors = threading.Barrier(4), [], []

    def run() -> None:
        barrier.wait()
        try:
            results.append(run_deployment(org.id, w["id"], dep_id, store=get_store))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [r.status for r in results] == ["success"] * 4
    assert sum(r.published for r in results) == 1
    assert len(_rows(dep_id)) == 1
    assert _puts(s3_faults, org.container_key(w["id"]), 200) == 1


def test_producer_bypassing_the_api_gets_a_row_and_a_published_file(
    sqlite_database, org, celery_worker, s3
):
    pur = org.purpose()
    w, dep_id = org.widget([pur]), f"producer-{uuid.uuid4().hex}"
    _send(org.id, w["id"], dep_id)
    dep = _wait_row(dep_id)
    assert dep.status == "success", dep.error
    assert (dep.organization_id, dep.widget_id) == (org.id, w["id"])
    body = _s3_json(s3, org.container_key(w["id"]))
    assert body == dep.config and body["deployment_id"] == dep_id
    assert body["purposes"][0]["metadata"] == pur["metadata"]
    assert _status(org, w["id"]) == "published"


@pytest.mark.parametrize(
    ("faults", "attempts"),
    [([503, 500], 1), ([503, 500, 503, 503], 2)],  # inside botocore / plus one Celery retry
    ids=["botocore-retry", "celery-retry"],
)
def test_transient_s3_errors_are_retried(
    sqlite_database, org, celery_worker, s3, s3_faults, faults, attempts
):
    w = org.widget()
    for status in faults:
        s3_faults.fail_next("PUT", status)
    dep = org.deploy(w["id"])
    done = org.wait_deployment(dep["id"], timeout=60)
    assert done["status"] == "success", done
    assert done["attempts"] == attempts and done["error"] is None
    key = org.container_key(w["id"])
    assert _puts(s3_faults, key) == len(faults) + 1
    assert _puts(s3_faults, key, 200) == 1
    assert _s3_json(s3, key)["deployment_id"] == done["deployment_id"]
    assert _status(org, w["id"]) == "published"


@pytest.mark.parametrize("published", [False, True], ids=["draft", "published"])
def test_access_denied_fails_at_once_and_keeps_widget_status(
    sqlite_database, org, celery_worker, s3, s3_faults, published
):
    w = org.widget(name="live")
    key, live = org.container_key(w["id"]), None
    if published:
        live = org.wait_deployment(org.deploy(w["id"])["id"])
        assert live["status"] == "success", live
        r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited"})
        assert r.status_code == 200, r.text
    # The failed deployment took a publish sequence; nothing else of the widget may change.
    before = _widget(w["id"]).model_dump(exclude={"publish_seq"})
    s3_faults.clear()
    s3_faults.fail_next("PUT", 403)
    t0 = time.monotonic()
    done = org.wait_deployment(org.deploy(w["id"])["id"], timeout=20)
    assert time.monotonic() - t0 < 15
    assert (done["status"], done["attempts"]) == ("failure", 1), done
    assert "AccessDenied" in done["error"]
    assert _puts(s3_faults, key) == 1
    assert _widget(w["id"]).model_dump(exclude={"publish_seq"}) == before
    assert _status(org, w["id"]) == ("unpublished_changes" if published else "draft")
    if published:
        body = _s3_json(s3, key)
        assert (body["deployment_id"], body["widget"]["name"]) == (live["deployment_id"], "live")


def test_s3_max_attempts_counts_every_request(sqlite_database, org, s3_faults):
    w = org.widget()
    s3_faults.fail_next("PUT", 503, times=10)
    with pytest.raises(TransientS3Error):
        run_deployment(org.id, w["id"], new_id(), store=get_store)
    assert _puts(s3_faults, org.container_key(w["id"])) == get_settings().s3_max_attempts == 3


def test_missing_bucket_fails_quickly_without_retry_storm(
    sqlite_database, org, celery_worker, s3_faults
):
    w = org.widget()
    saved = os.environ["S3_BUCKET"]
    os.environ["S3_BUCKET"] = f"missing-{uuid.uuid4().hex[:12]}"
    reset_process_state()
    try:
        t0 = time.monotonic()
        done = org.wait_deployment(org.deploy(w["id"])["id"], timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        os.environ["S3_BUCKET"] = saved
        reset_process_state()
    assert done["status"] == "failure", done
    assert "NoSuchBucket" in done["error"]
    assert elapsed < 15
    assert done["attempts"] == 1
    assert 1 <= _puts(s3_faults, org.container_key(w["id"])) <= 2
    assert _status(org, w["id"]) == "draft"


@pytest.mark.parametrize("row_exists", [True, False], ids=["api-row", "producer-only"])
def test_widget_archived_before_the_job_runs(
    sqlite_database, org, celery_worker, s3, s3_faults, row_exists
):
    w = org.widget()
    dep_id = _insert_deployment(org.id, w["id"]) if row_exists else new_id()
    with unit_of_work() as s:
        row = s.get(Widget, w["id"])
        assert row is not None
        row.archived_at = utcnow()
    _send(org.id, w["id"], dep_id)
    dep = _wait_row(dep_id)
    assert dep.status == "failure"
    assert "archived" in dep.error
    key = org.container_key(w["id"])
    assert _puts(s3_faults, key) == 0
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount") == 0


def test_older_deployment_running_after_a_newer_one_keeps_the_newer_file(
    database, org, s3, s3_faults
):
    w = org.widget(name="v1")
    key, older, newer = org.container_key(w["id"]), new_id(), new_id()
    # The older deployment freezes version 1, then S3 fails more often than botocore retries.
    s3_faults.fail_next("PUT", 503, times=10)
    with pytest.raises(TransientS3Error):
        run_deployment(org.id, w["id"], older, store=get_store)
    s3_faults.clear()  # the outage is over
    assert _rows(older)[0].widget_version == 1
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "v2"}).status_code == 200
    outcome = run_deployment(org.id, w["id"], newer, store=get_store)
    assert (outcome.status, outcome.published) == ("success", True)
    late = run_deployment(org.id, w["id"], older, store=get_store)  # the Celery retry
    assert (late.status, late.published, late.error) == ("success", False, None)
    assert late.live_deployment_id == newer
    assert _rows(older)[0].live_deployment_id == newer
    body = _s3_json(s3, key)
    assert (body["deployment_id"], body["widget"]["name"]) == (newer, "v2")
    assert _puts(s3_faults, key, 200) == 1
    assert _status(org, w["id"]) == "published"


def test_deploying_the_live_content_again_does_not_rewrite_the_file(
    sqlite_database, org, celery_worker, s3, s3_faults
):
    w = org.widget(name="same")
    key = org.container_key(w["id"])
    first = org.wait_deployment(org.deploy(w["id"])["id"])
    assert first["status"] == "success", first
    for name in ("other", "same"):  # edited, then edited back: unpublished changes, same content
        assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": name}).status_code == 200
    assert _status(org, w["id"]) == "unpublished_changes"
    again = org.wait_deployment(org.deploy(w["id"])["id"])
    assert again["status"] == "success", again
    assert again["live_deployment_id"] == first["deployment_id"]
    assert _puts(s3_faults, key, 200) == 1
    assert _s3_json(s3, key)["deployment_id"] == first["deployment_id"]
    assert _status(org, w["id"]) == "published"


@pytest.mark.parametrize(
    ("attempts", "outage", "reason"),
    [(MAX_ATTEMPTS, 0, "gave up"), (MAX_ATTEMPTS - 1, 10, "SlowDown")],
    ids=["poison-message", "last-attempt-fails"],
)
def test_attempt_cap_ends_failure_with_the_reason(
    sqlite_database, org, celery_worker, s3_faults, attempts, outage, reason
):
    w = org.widget()
    dep_id = _insert_deployment(org.id, w["id"], attempts=attempts, status="running")
    if outage:  # longer than botocore's retries: the Celery retry is the one that gives up
        s3_faults.fail_next("PUT", 503, times=outage)
    _send(org.id, w["id"], dep_id)
    dep = _wait_row(dep_id, timeout=60)
    assert (dep.status, dep.attempts) == ("failure", MAX_ATTEMPTS), dep
    assert "gave up" in dep.error and reason in dep.error, dep.error
    assert _puts(s3_faults, org.container_key(w["id"]), 200) == 0
    assert _status(org, w["id"]) == "draft"


def _row_of(org_id: str, dep_id: str) -> Deployment:
    with unit_of_work() as s:
        return s.exec(
            select(Deployment).where(
                Deployment.organization_id == org_id, Deployment.deployment_id == dep_id
            )
        ).one()


@pytest.mark.parametrize("widget_of", ["attacker", "victim"])
def test_forged_message_cannot_touch_another_organizations_deployment(
    sqlite_database, make_org, celery_worker, s3_faults, widget_of
):
    """``deployment_id`` is unique per organization: a message naming another organization's
    key is about a deployment of the sender's own organization, never the victim's."""
    victim, attacker = make_org(), make_org()
    vw, aw = victim.widget(), attacker.widget()
    dep_id = _insert_deployment(victim.id, vw["id"])
    before = _row_of(victim.id, dep_id).model_dump()
    _send(attacker.id, (aw if widget_of == "attacker" else vw)["id"], dep_id)
    _drain(attacker)
    assert _row_of(victim.id, dep_id).model_dump() == before
    assert _puts(s3_faults, victim.container_key(vw["id"])) == 0
    own = _row_of(attacker.id, dep_id)
    if widget_of == "attacker":  # simply the attacker's own deployment of its own widget
        assert (own.status, own.widget_id) == ("success", aw["id"]), own.error
        assert _puts(s3_faults, attacker.container_key(aw["id"]), 200) == 1
    else:  # the victim's widget is not the attacker's: its own row fails, nothing is written
        assert own.status == "failure" and "widget not found" in (own.error or ""), own
        assert _puts(s3_faults, attacker.container_key(aw["id"])) == 0


def test_producers_of_two_organizations_may_use_the_same_deployment_id(
    database, make_org, celery_worker, s3
):
    a, b = make_org(), make_org()
    wa, wb = a.widget(name="of-a"), b.widget(name="of-b")
    dep_id = f"producer-{uuid.uuid4().hex}"
    _send(a.id, wa["id"], dep_id)
    _send(b.id, wb["id"], dep_id)
    _drain(b)
    rows = {r.organization_id: r for r in _rows(dep_id)}
    assert set(rows) == {a.id, b.id}
    for org, w in ((a, wa), (b, wb)):
        row = rows[org.id]
        assert (row.status, row.widget_id, row.attempts) == ("success", w["id"], 1), row.error
        body = _s3_json(s3, org.container_key(w["id"]))
        assert body["deployment_id"] == dep_id and body["widget"]["name"] == w["name"]
        assert body == row.config
        assert _status(org, w["id"]) == "published"


def test_retry_and_failure_bookkeeping_touch_only_the_senders_deployment(
    database, make_org, s3_faults
):
    from worker.services.deploy import note_retry, record_failure

    a, b = make_org(), make_org()
    wa, wb = a.widget(), b.widget()
    dep_id = _insert_deployment(a.id, wa["id"])
    with unit_of_work() as s:
        s.add(Deployment(organization_id=b.id, widget_id=wb["id"], deployment_id=dep_id))
    before = _row_of(a.id, dep_id).model_dump()
    note_retry(b.id, dep_id, "SlowDown")
    assert _row_of(b.id, dep_id).error == "retrying: SlowDown"
    record_failure(b.id, wb["id"], dep_id, "gave up", store=get_store)
    assert (_row_of(b.id, dep_id).status, _row_of(b.id, dep_id).error) == ("failure", "gave up")
    assert _row_of(a.id, dep_id).model_dump() == before


def test_many_deploys_reuse_one_s3_client(sqlite_database, org, celery_worker, s3_faults, caplog):
    caplog.set_level(logging.WARNING)
    close_store()
    before = S3Store.clients_created
    widgets = [org.widget() for _ in range(25)]
    dep_ids: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for round_ in range(4):
            for w in widgets:
                if round_:
                    patch = {"name": f"{w['name']}-{round_}"}
                    assert org.req("PATCH", f"/widgets/{w['id']}", json=patch).status_code == 200
                dep_ids.append(org.deploy(w["id"])["deployment_id"])
        finals = [_wait_row(d, timeout=120) for d in dep_ids]
        gc.collect()
    assert len(finals) == 100
    assert all(d.status == "success" for d in finals), [d.error for d in finals if d.error]
    assert S3Store.clients_created - before == 1
    prefix = f"/{BUCKET}/configs/{org.api_key}/containers/"
    published = [p for m, p, s in list(s3_faults.requests) if m == "PUT" and prefix in p]
    assert len(published) >= len(widgets)
    noise = caplog.text + "\n".join(str(w.message) for w in caught)
    assert "Event loop is closed" not in noise
    assert "Unclosed" not in noise
