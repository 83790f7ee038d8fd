"""Scheduled deploys (``publish_at``) and their cancellation, through the API, beat's tick
(``widgets.send_due_deployments``, its body run here as beat would), a real in-process worker
and real S3 (moto)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

from tests.api_stub.test_archive_api import assert_error
from tests.conftest import BUCKET
from tests.support.api import OrgClient
from worker.models import utcnow
from worker.services import schedule


def send_due_deployments() -> None:
    """The body of beat's ``widgets.send_due_deployments``, run here as beat's tick would be
    (imported late: the task module configures the Celery app, once the test's settings are)."""
    from worker.tasks.maintenance import send_due_deployments as tick

    tick()


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def live_file(s3: Any, org: OrgClient, widget_id: str) -> dict[str, Any] | None:
    try:
        obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(widget_id))
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(obj["Body"].read())


def schedule_deploy(org: OrgClient, widget_id: str, publish_at: datetime, **body: Any) -> Any:
    return org.req(
        "POST",
        "/widgets/deployments",
        json={"widget_id": widget_id, "publish_at": rfc3339(publish_at), **body},
    )


def tick_until_sent(org: OrgClient, dep_id: str, due: datetime, timeout: float = 30) -> None:
    """Beat's tick, every 0.2 s, until the deployment has left ``scheduled``."""
    deadline = time.monotonic() + timeout
    while org.req("GET", f"/widgets/deployments/{dep_id}").json()["status"] == "scheduled":
        assert time.monotonic() < deadline, "never sent"
        send_due_deployments()
        if utcnow() < due:
            time.sleep(0.2)


def test_a_scheduled_deploy_publishes_the_snapshot_frozen_when_requested(
    database, org, celery_worker, s3
):
    w = org.widget(name="reviewed")
    due = utcnow() + timedelta(seconds=2)
    r = schedule_deploy(org, w["id"], due)
    assert r.status_code == 202, r.text
    dep = r.json()
    assert dep["status"] == "scheduled"
    assert dep["config"]["widget"]["name"] == "reviewed" and dep["sequence"] is not None
    assert datetime.fromisoformat(dep["publish_at"]) == due
    # An edit after the request does not change what goes live.
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "later"}).status_code == 200
    send_due_deployments()  # not due yet: nothing is sent
    assert org.req("GET", f"/widgets/deployments/{dep['id']}").json()["status"] == "scheduled"
    assert live_file(s3, org, w["id"]) is None
    listed = org.req("GET", "/widgets/deployments", params={"widget_id": w["id"]}).json()
    assert [d["status"] for d in listed] == ["scheduled"]

    tick_until_sent(org, dep["id"], due)
    done = org.wait_deployment(dep["id"])
    assert done["status"] == "success", done
    body = live_file(s3, org, w["id"])
    assert body is not None
    assert body["deployment_id"] == dep["deployment_id"] and body["widget"]["name"] == "reviewed"
    assert org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == (
        "unpublished_changes"
    )


def test_a_deploy_requested_after_a_scheduled_one_is_newer_and_wins(
    database, org, celery_worker, s3
):
    w = org.widget(name="scheduled")
    due = utcnow() + timedelta(seconds=2)
    scheduled = schedule_deploy(org, w["id"], due).json()
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "hotfix"}).status_code == 200
    # Published at once: the pending scheduled snapshot is not a newer one to coalesce into.
    hotfix = org.wait_deployment(org.deploy(w["id"])["id"])
    assert hotfix["status"] == "success" and hotfix["live_deployment_id"] == hotfix["deployment_id"]
    assert hotfix["sequence"] > scheduled["sequence"]

    tick_until_sent(org, scheduled["id"], due)
    done = org.wait_deployment(scheduled["id"])
    # Overtaken: success without a write, naming the newer file that stays live.
    assert done["status"] == "success", done
    assert done["live_deployment_id"] == hotfix["deployment_id"]
    body = live_file(s3, org, w["id"])
    assert body is not None and body["widget"]["name"] == "hotfix"
    assert org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == "published"


def test_cancel_stops_a_scheduled_deploy_before_it_is_due(database, org, celery_worker, s3):
    w = org.widget()
    due = utcnow() + timedelta(hours=1)
    dep = schedule_deploy(org, w["id"], due).json()
    r = org.req("POST", f"/widgets/deployments/{dep['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["finished_at"] is not None
    again = org.req("POST", f"/widgets/deployments/{dep['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    # Past its time, the tick does not take it.
    assert all(d[2] != dep["deployment_id"] for d in schedule.take_due(due + timedelta(days=1)))
    assert live_file(s3, org, w["id"]) is None

    # Once the tick took it (due), it can no longer be cancelled; nor can an ordinary deploy.
    soon = utcnow() + timedelta(seconds=1)
    taken = schedule_deploy(org, w["id"], soon).json()
    tick_until_sent(org, taken["id"], soon)
    assert_error(org.req("POST", f"/widgets/deployments/{taken['id']}/cancel"), 409)
    assert org.wait_deployment(taken["id"])["status"] == "success"
    assert_error(org.req("POST", f"/widgets/deployments/{taken['id']}/cancel"), 409)


def test_publish_at_must_be_a_future_rfc3339_time_within_a_year(database, org, celery_worker):
    w = org.widget()
    now = utcnow()
    cases = {
        "past": rfc3339(now - timedelta(minutes=1)),
        "too far": rfc3339(now + timedelta(days=400)),
        "no offset": (now + timedelta(hours=1)).replace(tzinfo=None).isoformat(),
        "not a time": "tomorrow",
    }
    for case, value in cases.items():
        r = org.req(
            "POST", "/widgets/deployments", json={"widget_id": w["id"], "publish_at": value}
        )
        assert r.status_code == 400, (case, r.text)
        assert "publish_at" in r.json()["errors"], (case, r.text)
    # Nothing was created by the refused requests.
    assert org.req("GET", "/widgets/deployments", params={"widget_id": w["id"]}).json() == []


def test_a_promotion_can_be_scheduled(database, org, celery_worker, s3):
    w = org.widget(name="previewed")
    preview = org.wait_deployment(org.deploy(w["id"], target="preview")["id"])
    assert preview["status"] == "success", preview
    due = utcnow() + timedelta(seconds=1)
    r = org.req(
        "POST",
        f"/widgets/deployments/{preview['id']}/promote",
        json={"publish_at": rfc3339(due)},
    )
    assert r.status_code == 202, r.text
    promoted = r.json()
    assert promoted["status"] == "scheduled" and promoted["target"] == "production"
    tick_until_sent(org, promoted["id"], due)
    assert org.wait_deployment(promoted["id"])["status"] == "success"
    body = live_file(s3, org, w["id"])
    assert body is not None and body["deployment_id"] == promoted["deployment_id"]
    assert body["widget"]["name"] == "previewed"
