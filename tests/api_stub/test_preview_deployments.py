"""Preview deployments (``target: "preview"``) and their promotion to production, through the
API, a real in-process worker and real S3 (moto)."""

from __future__ import annotations

import json
from typing import Any

from tests.api_stub.test_archive_api import archive, assert_error
from tests.conftest import BUCKET
from tests.support.api import OrgClient
from worker.db import unit_of_work
from worker.models import Deployment, utcnow
from worker.services.publish import PREVIEW_CACHE_CONTROL
from worker.settings import get_settings


def deployed(org: OrgClient, widget_id: str, **body: Any) -> dict[str, Any]:
    done = org.wait_deployment(org.deploy(widget_id, **body)["id"])
    assert done["status"] == "success", done
    return done


def preview_key(org: OrgClient, widget_id: str) -> str:
    return f"configs/{org.api_key}/preview/{widget_id}.json"


def read(s3: Any, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    try:
        obj = s3.get_object(Bucket=BUCKET, Key=key)
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(obj["Body"].read()), obj


def status_of(org: OrgClient, widget_id: str) -> str:
    return str(org.req("GET", f"/widgets/{widget_id}").json()["publication_status"])


def without_id(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "deployment_id"}


def test_a_preview_publishes_its_own_object_and_never_the_production_file(
    database, org, celery_worker, s3
):
    w = org.widget(name="draft")
    preview = deployed(org, w["id"], target="preview")
    assert preview["target"] == "preview"
    assert preview["s3_key"] == preview_key(org, w["id"])
    found = read(s3, preview_key(org, w["id"]))
    assert found is not None
    body, obj = found
    assert body["deployment_id"] == preview["deployment_id"]
    assert obj["CacheControl"] == PREVIEW_CACHE_CONTROL == "no-store"
    assert obj["ContentType"] == "application/json"
    # Nothing went to production, and the widget is still a draft.
    assert read(s3, org.container_key(w["id"])) is None
    assert status_of(org, w["id"]) == "draft"

    live = deployed(org, w["id"])
    assert live["target"] == "production"
    before = read(s3, org.container_key(w["id"]))
    assert before is not None and before[0]["deployment_id"] == live["deployment_id"]
    assert before[1]["CacheControl"] == get_settings().s3_cache_control
    assert "stale-while-revalidate" in before[1]["CacheControl"]
    assert status_of(org, w["id"]) == "published"

    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited"}).status_code == 200
    second = deployed(org, w["id"], target="preview")
    # The preview followed the edit; production kept its file, byte for byte.
    preview_now = read(s3, preview_key(org, w["id"]))
    assert preview_now is not None
    assert preview_now[0]["deployment_id"] == second["deployment_id"]
    assert preview_now[0]["widget"]["name"] == "edited"
    after = read(s3, org.container_key(w["id"]))
    assert after is not None and after[1]["ETag"] == before[1]["ETag"]
    assert status_of(org, w["id"]) == "unpublished_changes"
    # Listing by target.
    listed = org.req("GET", "/widgets/deployments", params={"target": "preview"}).json()
    assert {d["id"] for d in listed} == {preview["id"], second["id"]}


def test_promotion_publishes_the_reviewed_bytes_after_an_edit(database, org, celery_worker, s3):
    w = org.widget(name="reviewed")
    preview = deployed(org, w["id"], target="preview")
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "later"}).status_code == 200

    r = org.req(
        "POST",
        f"/widgets/deployments/{preview['id']}/promote",
        json={"deployment_id": "release-1", "reason": "approved"},
    )
    assert r.status_code == 202, r.text
    assert r.headers["location"].startswith("/widgets/deployments/")
    promoted = org.wait_deployment(r.json()["id"])
    assert promoted["status"] == "success", promoted
    assert promoted["target"] == "production"
    assert promoted["deployment_id"] == "release-1"
    assert promoted["source_deployment_id"] == preview["deployment_id"]
    assert promoted["reason"] == "approved"
    found = read(s3, org.container_key(w["id"]))
    assert found is not None
    body, _ = found
    assert body["deployment_id"] == "release-1"
    assert without_id(body) == without_id(preview["config"])
    assert body["widget"]["name"] == "reviewed"  # what was reviewed, not the later edit
    # The widget's current content (the edit) is not what is live.
    assert status_of(org, w["id"]) == "unpublished_changes"
    # The same promotion sent again (same key): the same deployment, no second job.
    again = org.req(
        "POST", f"/widgets/deployments/{preview['id']}/promote", json={"deployment_id": "release-1"}
    )
    assert again.status_code == 202 and again.json()["id"] == promoted["id"], again.text


def test_only_a_published_preview_of_the_organization_can_be_promoted(
    database, org, make_org, celery_worker
):
    w = org.widget()
    production = deployed(org, w["id"])
    r = org.req("POST", f"/widgets/deployments/{production['id']}/promote", json={})
    assert_error(r, 400)
    assert "deployment_id" in r.json()["errors"]

    stranger = make_org()
    theirs = deployed(stranger, stranger.widget()["id"], target="preview")
    assert_error(org.req("POST", f"/widgets/deployments/{theirs['id']}/promote", json={}), 404)

    # A preview not published yet (its row as the API commits it, never sent): 409, nothing made.
    waiting = Deployment(
        organization_id=org.id, widget_id=w["id"], target="preview", enqueued_at=utcnow()
    )
    with unit_of_work() as session:
        session.add(waiting)
    before = org.req("GET", "/widgets/deployments").json()
    assert_error(org.req("POST", f"/widgets/deployments/{waiting.id}/promote", json={}), 409)
    assert org.req("GET", "/widgets/deployments").json() == before


def test_an_idempotency_key_is_bound_to_its_target(database, org, celery_worker):
    w = org.widget()
    first = org.deploy(w["id"], deployment_id="k-1", target="preview")
    same = org.deploy(w["id"], deployment_id="k-1", target="preview")
    assert same["id"] == first["id"]
    r = org.req("POST", "/widgets/deployments", json={"widget_id": w["id"], "deployment_id": "k-1"})
    assert_error(r, 409)
    bad = org.req("POST", "/widgets/deployments", json={"widget_id": w["id"], "target": "staging"})
    assert_error(bad, 400)  # the API's validation errors are 400s, field by field
    assert "target" in bad.json()["errors"]
    org.wait_deployment(first["id"])


def test_archiving_takes_down_the_preview_and_the_production_file(database, org, celery_worker, s3):
    published = org.widget()
    deployed(org, published["id"])
    deployed(org, published["id"], target="preview")
    draft = org.widget()  # a draft may have a preview too
    deployed(org, draft["id"], target="preview")
    for w in (published, draft):
        assert read(s3, preview_key(org, w["id"])) is not None
        archive(org, w["id"])
        assert read(s3, preview_key(org, w["id"])) is None
        assert read(s3, org.container_key(w["id"])) is None
