"""widgets.archive end to end through the API and a real worker (sanity of each status)."""

from __future__ import annotations

import time

import pytest

from tests.conftest import BUCKET


def wait_job(org, location: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = org.http.get(location, headers={"Authorization": f"Bearer {org.token}"}).json()
        if job["status"] in ("success", "failure") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


@pytest.mark.parametrize("state", ["draft", "published", "unpublished_changes"])
def test_archive_each_status(sqlite_database, org, celery_worker, s3, state):
    w = org.widget([org.purpose()], [org.preference()])
    up = org.req(
        "POST", f"/widgets/{w['id']}/assets", files={"file": ("a.png", b"\x89PNG..", "image/png")}
    )
    assert up.status_code == 201, up.text
    if state != "draft":
        assert org.wait_deployment(org.deploy(w["id"])["id"])["status"] == "success"
    if state == "unpublished_changes":
        assert (
            org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited"}).json()[
                "publication_status"
            ]
            == "unpublished_changes"
        )
    r = org.req("DELETE", f"/widgets/{w['id']}")
    assert r.status_code == 202, r.text
    assert org.req("GET", f"/widgets/{w['id']}").status_code == 404
    job = wait_job(org, r.headers["location"])
    assert job["status"] == "success", job
    assert job["result"] == ("deleted" if state == "draft" else "archived")
    assert keys(s3, up.json()["s3_key"]) == []
    assert keys(s3, org.container_key(w["id"])) == []
    archived = org.req("GET", f"/widgets/archived/{w['id']}")
    assert archived.status_code == (404 if state == "draft" else 200)
    again = org.req("DELETE", f"/widgets/{w['id']}")
    assert again.status_code == 202 and again.json()["id"] == job["id"]
