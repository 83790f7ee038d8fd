"""Rollback (``source_deployment_id``), audit fields and snapshot diffs, through the API and a
real in-process worker."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from tests.conftest import BUCKET


def deployed(org: Any, widget_id: str, **body: Any) -> dict[str, Any]:
    done = org.wait_deployment(org.deploy(widget_id, **body)["id"])
    assert done["status"] == "success", done
    return done


def live_body(s3: Any, org: Any, widget_id: str) -> dict[str, Any]:
    obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(widget_id))
    return json.loads(obj["Body"].read())


def without_id(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "deployment_id"}


def test_rollback_republishes_the_source_bytes_and_keeps_status_truthful(
    database, org, celery_worker, s3
):
    w = org.widget(name="v1")
    v1 = deployed(org, w["id"])
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "v2"}).status_code == 200
    deployed(org, w["id"])
    assert org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == "published"

    rb = deployed(
        org, w["id"], source_deployment_id=v1["deployment_id"], reason="v2 broke the banner"
    )
    assert rb["source_deployment_id"] == v1["deployment_id"]
    assert rb["reason"] == "v2 broke the banner"
    assert without_id(rb["config"]) == without_id(v1["config"])
    body = live_body(s3, org, w["id"])
    assert body["deployment_id"] == rb["deployment_id"]
    assert without_id(body) == without_id(v1["config"])  # same bytes apart from its own id
    # The widget's current content (v2) is not what is live (v1) any more.
    assert org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == (
        "unpublished_changes"
    )


def test_rollback_source_must_be_a_successful_deployment_of_the_same_widget(
    database, org, make_org, celery_worker
):
    w, other = org.widget(), org.widget()
    ok = deployed(org, w["id"])
    of_other = deployed(org, other["id"])
    r = org.req(
        "POST",
        "/widgets/deployments",
        json={"widget_id": w["id"], "source_deployment_id": of_other["deployment_id"]},
    )
    assert r.status_code == 400 and "source_deployment_id" in r.json()["errors"], r.text
    stranger = make_org()
    theirs = stranger.widget()
    their_dep = deployed(stranger, theirs["id"])
    r = org.req(
        "POST",
        "/widgets/deployments",
        json={"widget_id": w["id"], "source_deployment_id": their_dep["deployment_id"]},
    )
    assert r.status_code == 404 and r.json()["name"] == "NotFound", r.text
    r = org.req(
        "POST", "/widgets/deployments", json={"widget_id": w["id"], "source_deployment_id": "nope"}
    )
    assert r.status_code == 404, r.text
    # By row id works as well as by deployment_id.
    r = org.req(
        "POST",
        "/widgets/deployments",
        json={"widget_id": w["id"], "source_deployment_id": ok["id"]},
    )
    assert r.status_code == 202 and r.json()["source_deployment_id"] == ok["deployment_id"]


def test_rollback_racing_a_normal_deploy_newest_request_wins(database, org, celery_worker, s3):
    w = org.widget(name="v1")
    v1 = deployed(org, w["id"])
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "v2"}).status_code == 200
    deployed(org, w["id"])
    # Both requested at once; whichever froze its snapshot last (higher sequence) is live.
    results: dict[str, Any] = {}
    bodies = {"rollback": {"source_deployment_id": v1["deployment_id"]}, "deploy": {}}
    threads = [
        threading.Thread(target=lambda k=k: results.update({k: org.deploy(w["id"], **bodies[k])}))
        for k in bodies
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    done = {k: org.wait_deployment(v["id"]) for k, v in results.items()}
    assert all(d["status"] == "success" for d in done.values()), done
    newest = max(done.values(), key=lambda d: d["sequence"])
    assert without_id(live_body(s3, org, w["id"])) == without_id(newest["config"])


def test_created_by_is_the_api_key_or_producer_and_is_filterable(database, org, celery_worker):
    w = org.widget()
    by_api = deployed(org, w["id"])
    assert by_api["created_by"] not in ("", "producer", "unknown")
    listed = org.req("GET", "/widgets/deployments", params={"created_by": by_api["created_by"]})
    assert [d["id"] for d in listed.json()] == [by_api["id"]]
    none = org.req("GET", "/widgets/deployments", params={"created_by": "producer"})
    assert none.status_code == 200 and none.json() == []


def test_diff_against_another_snapshot_and_against_live(database, org, celery_worker):
    purpose = org.purpose(metadata={"color": "red"})
    w = org.widget([purpose], name="before")
    first = deployed(org, w["id"])
    org.req("PATCH", f"/widgets/{w['id']}", json={"name": "after"})
    second = deployed(org, w["id"])

    r = org.req("GET", f"/widgets/deployments/{second['id']}/diff", params={"against": first["id"]})
    assert r.status_code == 200, r.text
    ops = r.json()
    assert {"op": "replace", "path": "/widget/name", "value": "after"} in ops
    assert all(op["path"] != "/deployment_id" for op in ops)
    assert {"op": "replace", "path": "/version", "value": second["config"]["version"]} in ops

    live = org.req("GET", f"/widgets/deployments/{first['id']}/diff", params={"against": "live"})
    assert {"op": "replace", "path": "/widget/name", "value": "before"} in live.json()
    same = org.req("GET", f"/widgets/deployments/{second['id']}/diff", params={"against": "live"})
    assert same.json() == []


def test_diff_of_another_organizations_deployment_is_404(database, org, make_org, celery_worker):
    w = org.widget()
    mine = deployed(org, w["id"])
    stranger = make_org()
    theirs = deployed(stranger, stranger.widget()["id"])
    r = org.req("GET", f"/widgets/deployments/{mine['id']}/diff", params={"against": theirs["id"]})
    assert r.status_code == 404, r.text
    r = org.req("GET", f"/widgets/deployments/{theirs['id']}/diff", params={"against": "live"})
    assert r.status_code == 404, r.text


def test_organizations_sharing_a_deployment_id_each_publish_roll_back_and_diff_their_own(
    database, make_org, celery_worker, s3
):
    """``deployment_id`` is unique per organization: the same key in two organizations gives two
    independent deployments, and a rollback or a diff naming the key finds the caller's own."""
    a, b = make_org(), make_org()
    key = f"shared-{uuid.uuid4().hex}"
    wa, wb = a.widget(name="a-v1"), b.widget(name="b-v1")
    theirs = deployed(a, wa["id"], deployment_id=key)
    mine = deployed(b, wb["id"], deployment_id=key)
    assert theirs["id"] != mine["id"]
    assert live_body(s3, a, wa["id"])["widget"]["name"] == "a-v1"
    assert live_body(s3, b, wb["id"])["widget"]["name"] == "b-v1"
    assert live_body(s3, a, wa["id"])["deployment_id"] == key
    assert live_body(s3, b, wb["id"])["deployment_id"] == key
    # The live deployment is found by key within the organization.
    same = b.req("GET", f"/widgets/deployments/{mine['id']}/diff", params={"against": "live"})
    assert same.status_code == 200 and same.json() == [], same.text

    assert b.req("PATCH", f"/widgets/{wb['id']}", json={"name": "b-v2"}).status_code == 200
    deployed(b, wb["id"])
    rb = deployed(b, wb["id"], source_deployment_id=key)
    assert rb["source_deployment_id"] == key
    assert without_id(rb["config"]) == without_id(mine["config"])
    assert live_body(s3, b, wb["id"])["widget"]["name"] == "b-v1"
    # a's deployment of the same key was neither used nor touched.
    assert a.req("GET", f"/widgets/deployments/{theirs['id']}").json() == theirs
    assert live_body(s3, a, wa["id"])["widget"]["name"] == "a-v1"
