"""widgets.deploy on a real Celery worker, real Redis, moto's S3 server, SQLite."""

from __future__ import annotations

import json

from tests.conftest import BUCKET


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
    assert obj["CacheControl"] == "public, max-age=60"
    body = json.loads(obj["Body"].read())
    assert body == done["config"]
    assert body["deployment_id"] == done["deployment_id"]
    assert body["purposes"][0]["metadata"] == pur["metadata"]
    assert body["preferences"][0]["metadata"] == pref["metadata"]
    assert body["preferences"][0]["values"][0]["metadata"] == pref["values"][0]["metadata"]
    assert org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == "published"
