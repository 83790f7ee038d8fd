"""Publish ordering (worker.services.publish): the newest snapshot wins, enforced by S3's
conditional writes and the publish sequence, never by a lock held across the upload.

The deploy service runs in this process against moto through the fault proxy; the file is read
straight from moto (the ground truth).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from sqlmodel import select

from tests.conftest import BUCKET
from tests.support.stall import StallingS3Proxy
from worker.db import unit_of_work
from worker.models import Deployment, Widget, utcnow
from worker.s3 import S3Store, TransientS3Error, get_store
from worker.services.deploy import run_deployment
from worker.services.snapshot import _IDENTITY_KEYS
from worker.settings import get_settings


def queue(org_id: str, widget_id: str) -> str:
    """A deployment row as the API commits it (no message sent: the test runs it)."""
    dep = Deployment(organization_id=org_id, widget_id=widget_id, enqueued_at=utcnow())
    with unit_of_work() as s:
        s.add(dep)
    return dep.deployment_id


def row(dep_id: str) -> Deployment:
    with unit_of_work() as s:
        return s.exec(select(Deployment).where(Deployment.deployment_id == dep_id)).one()


def widget_row(widget_id: str) -> Widget:
    with unit_of_work() as s:
        w = s.get(Widget, widget_id)
        assert w is not None
        return w


def live_file(s3: Any, key: str) -> tuple[dict[str, Any], dict[str, str]]:
    obj = s3.get_object(Bucket=BUCKET, Key=key)
    return json.loads(obj["Body"].read()), obj["Metadata"]


def puts(proxy: Any, key: str) -> int:
    return sum(
        1 for m, p, s in list(proxy.requests) if m == "PUT" and p.split("?")[0].endswith(key)
    )


def test_older_snapshot_retried_after_a_catalog_edit_never_replaces_the_newer(
    database, org, s3, s3_faults
):
    purpose = org.purpose(description={"en": "old text"})
    w = org.widget([purpose])
    key = org.container_key(w["id"])
    older = queue(org.id, w["id"])
    s3_faults.fail_next("PUT", 503, times=10)  # more than botocore's attempts: a Celery retry
    with pytest.raises(TransientS3Error):
        run_deployment(org.id, w["id"], older, store=get_store)
    assert s3_faults.count("PUT", 503) >= 1, "the fault did not land on the older deploy's PUT"
    s3_faults.clear()
    frozen_old = row(older)
    assert frozen_old.sequence is not None and frozen_old.status == "running"
    # The purpose's text changes: the widget's own version does not.
    r = org.req("PATCH", f"/metadata/purposes/{purpose['id']}", json={"description": {"en": "new"}})
    assert r.status_code == 200, r.text
    newer = queue(org.id, w["id"])
    assert run_deployment(org.id, w["id"], newer, store=get_store).published
    # The older deploy's retry runs last: it must not put its snapshot back.
    retried = run_deployment(org.id, w["id"], older, store=get_store)
    assert (retried.status, retried.published) == ("success", False), retried
    assert retried.live_deployment_id == newer
    body, meta = live_file(s3, key)
    assert body["deployment_id"] == newer and body["purposes"][0]["description"] == {"en": "new"}
    assert int(meta["sequence"]) == row(newer).sequence > frozen_old.sequence
    assert widget_row(w["id"]).live_deployment_id == newer


def test_file_carries_sequence_deployment_and_checksums_as_metadata(database, org, s3):
    w = org.widget()
    dep_id = queue(org.id, w["id"])
    out = run_deployment(org.id, w["id"], dep_id, store=get_store)
    assert out.published
    dep = row(dep_id)
    _, meta = live_file(s3, org.container_key(w["id"]))
    assert meta == {
        "deployment-id": dep_id,
        "sequence": str(dep.sequence),
        "sha256": dep.checksum,
        "content-sha256": dep.content_checksum,
    }
    live = widget_row(w["id"])
    assert (live.live_seq, live.live_deployment_id) == (dep.sequence, dep_id)


def test_sequences_are_given_in_freeze_order_and_redeliveries_keep_theirs(database, org):
    w = org.widget()
    ids = [queue(org.id, w["id"]) for _ in range(3)]
    for dep_id in ids:
        run_deployment(org.id, w["id"], dep_id, store=get_store)
    run_deployment(org.id, w["id"], ids[0], store=get_store)  # a late duplicate delivery
    assert [row(i).sequence for i in ids] == [1, 2, 3]
    assert widget_row(w["id"]).publish_seq == 3


def test_same_content_is_not_uploaded_again(database, org, s3, s3_faults):
    w = org.widget()
    key = org.container_key(w["id"])
    first = queue(org.id, w["id"])
    assert run_deployment(org.id, w["id"], first, store=get_store).published
    s3_faults.clear()
    again = queue(org.id, w["id"])
    out = run_deployment(org.id, w["id"], again, store=get_store)
    assert (out.status, out.published, out.live_deployment_id) == ("success", False, first)
    assert puts(s3_faults, key) == 0
    assert live_file(s3, key)[0]["deployment_id"] == first
    # The record moved to the newer sequence: an older, different snapshot cannot come back.
    assert widget_row(w["id"]).live_seq == row(again).sequence


def test_same_content_check_looks_at_s3_not_only_the_record(database, org, s3):
    """A writer that died between its upload and its record left other bytes on S3."""
    w = org.widget()
    key = org.container_key(w["id"])
    assert run_deployment(org.id, w["id"], queue(org.id, w["id"]), store=get_store).published
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"stray":true}', Metadata={"sequence": "1"})
    again = queue(org.id, w["id"])
    out = run_deployment(org.id, w["id"], again, store=get_store)
    assert out.published, out
    assert live_file(s3, key)[0]["deployment_id"] == again


def test_same_content_redeploy_rewrites_a_foreign_file(sqlite_database, org, celery_worker, s3):
    """The same check through the session's worker: a crashed deploy's upload is replaced."""
    w = org.widget()
    first = org.wait_deployment(org.deploy(w["id"])["id"])
    assert first["status"] == "success", first
    key = org.container_key(w["id"])
    # A crashed deploy's upload: other bytes at the key, no commit.
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"other": "bytes"}')

    second = org.wait_deployment(org.deploy(w["id"])["id"])
    assert second["status"] == "success", second
    body = json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert body.get("deployment_id") in (first["deployment_id"], second["deployment_id"]), body

    def content(snapshot: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in snapshot.items() if k not in _IDENTITY_KEYS}

    assert content(body) == content(first["config"])


def test_waiting_older_deployments_coalesce_into_the_newest(database, org, s3, s3_faults):
    w = org.widget()
    key = org.container_key(w["id"])
    s3_faults.fail_next("PUT", 503, times=30)
    frozen = []
    for _ in range(3):  # each freezes, then fails its upload: three waiting snapshots
        dep_id = queue(org.id, w["id"])
        with pytest.raises(TransientS3Error):
            run_deployment(org.id, w["id"], dep_id, store=get_store)
        frozen.append(dep_id)
        assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": dep_id}).status_code == 200
    s3_faults.clear()
    outs = [run_deployment(org.id, w["id"], d, store=get_store) for d in frozen]
    assert [o.published for o in outs] == [False, False, True]
    assert {o.live_deployment_id for o in outs} == {frozen[-1]}
    assert puts(s3_faults, key) == 1
    assert live_file(s3, key)[0]["widget"]["name"] == frozen[1]  # edited before the 3rd froze


def test_s3_ahead_of_the_record_is_adopted_not_overwritten(database, org, s3, s3_faults):
    """A delivery killed between its upload and its record: the redelivery finds its own file."""
    w = org.widget()
    key = org.container_key(w["id"])
    dep_id = queue(org.id, w["id"])
    assert run_deployment(org.id, w["id"], dep_id, store=get_store).published
    with unit_of_work() as s:  # as if the record had never been written
        widget = s.get(Widget, w["id"])
        assert widget is not None
        widget.live_seq = widget.live_etag = widget.live_deployment_id = None
        dep = s.exec(select(Deployment).where(Deployment.deployment_id == dep_id)).one()
        dep.status, dep.finished_at = "running", None
    s3_faults.clear()
    out = run_deployment(org.id, w["id"], dep_id, store=get_store)
    assert (out.status, out.published) == ("success", True)
    assert s3_faults.count("PUT", 200) == 0  # its If-None-Match write was refused: no rewrite
    assert widget_row(w["id"]).live_deployment_id == dep_id
    assert live_file(s3, key)[1]["deployment-id"] == dep_id


@pytest.fixture
def stalled(services: dict[str, Any]):
    proxy = StallingS3Proxy(services["moto_url"])
    store = S3Store(get_settings().model_copy(update={"s3_endpoint_url": proxy.url}))
    try:
        yield proxy, store
    finally:
        proxy.release()
        store.close()
        proxy.close()


def test_api_answers_at_once_while_an_upload_of_the_widget_stalls(database, org, s3, stalled):
    proxy, store = stalled
    w, other = org.widget(), org.widget()
    dep_id = queue(org.id, w["id"])
    proxy.stall("PUT")
    result: dict[str, Any] = {}
    uploader = threading.Thread(
        target=lambda: result.update(out=run_deployment(org.id, w["id"], dep_id, lambda: store))
    )
    uploader.start()
    timings: list[tuple[str, float, int]] = []
    try:
        assert proxy.wait_held(30), "the deploy never reached its upload"
        for label, method, path, body in [
            ("patch", "PATCH", f"/widgets/{w['id']}", {"name": "edited meanwhile"}),
            ("deploy", "POST", "/widgets/deployments", {"widget_id": w["id"]}),
            ("patch other", "PATCH", f"/widgets/{other['id']}", {"name": "x"}),
            ("deploy other", "POST", "/widgets/deployments", {"widget_id": other["id"]}),
            ("get", "GET", f"/widgets/{w['id']}", None),
            ("archive", "DELETE", f"/widgets/{w['id']}", None),
        ]:
            t0 = time.monotonic()
            r = org.req(method, path, json=body) if body else org.req(method, path)
            timings.append((label, time.monotonic() - t0, r.status_code))
        assert proxy.held == 1 and uploader.is_alive(), "the upload was not stalled throughout"
    finally:
        proxy.release()
    uploader.join(60)
    assert [(label, code) for label, _, code in timings] == [
        ("patch", 200),
        ("deploy", 202),
        ("patch other", 200),
        ("deploy other", 202),
        ("get", 200),
        ("archive", 202),
    ]
    slow = [(label, round(t, 2)) for label, t, _ in timings if t > 2.0]
    assert slow == [], f"requests waited for the stalled upload: {slow}"
    # The widget was archived while its upload was held: that upload cannot leave a file.
    assert result["out"].status == "failure"
