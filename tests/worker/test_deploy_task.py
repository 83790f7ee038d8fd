"""widgets.deploy on a real Celery worker, real Redis, moto's S3 server, SQLite."""

from __future__ import annotations

import json
import time
from typing import Any

import celery
from sqlmodel import select

from tests.conftest import BUCKET
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import FINAL_STATUSES, Deployment
from worker.settings import get_settings


def wait_for(check: Any, timeout: float = 60, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_deploy_publishes_container_and_marks_widget_published(
    sqlite_database, org, celery_worker, s3
):
    pur, pref = org.purpose(), org.preference()
    w = org.widget([pur], [pref])
    dep = org.deploy(w["id"])
    assert dep["status"] == "ready"
    done = org.wait_deployment(dep["id"])
    assert done["status"] == "success", done
    obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(w["id"]))
    assert obj["ContentType"] == "application/json"
    assert obj["CacheControl"] == get_settings().s3_cache_control
    assert "stale-while-revalidate" in obj["CacheControl"]  # for a CDN in front of the bucket
    body = json.loads(obj["Body"].read())
    assert body == done["config"]
    assert body["deployment_id"] == done["deployment_id"]
    assert body["purposes"][0]["metadata"] == pur["metadata"]
    assert body["preferences"][0]["metadata"] == pref["metadata"]
    assert body["preferences"][0]["values"][0]["metadata"] == pref["values"][0]["metadata"]
    assert org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == "published"


def test_producer_naming_no_queue_is_served(sqlite_database, org, celery_worker, s3, services):
    w = org.widget()
    dep_id = new_id()
    foreign = celery.Celery(broker=services["broker"])  # no routes: Celery's default queue
    try:
        kwargs = {"organization_id": org.id, "widget_id": w["id"], "deployment_id": dep_id}
        foreign.send_task("widgets.deploy", kwargs=kwargs)
    finally:
        foreign.close()

    def finished() -> Deployment | None:
        with unit_of_work() as s:
            dep = s.exec(select(Deployment).where(Deployment.deployment_id == dep_id)).first()
            return dep if dep is not None and dep.status in FINAL_STATUSES else None

    dep = wait_for(finished, timeout=30)
    assert dep is not None, "the worker never ran a message on the default queue"
    assert dep.status == "success", dep.error
    body = json.loads(s3.get_object(Bucket=BUCKET, Key=org.container_key(w["id"]))["Body"].read())
    assert body["deployment_id"] == dep_id
