"""Archive and asset routes of the API, on SQLite and on PostgreSQL (issue 3).

Archived widgets are produced for real: DELETE through the API, the job run by the in-process
Celery worker. Routes that must refuse are checked for their answer *and* for leaving the
database and the bucket exactly as they were.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from sqlmodel import select

from tests.conftest import BUCKET
from tests.support.api import OrgClient
from worker.db import unit_of_work
from worker.models import ArchiveJob, WidgetAsset

ARCHIVED_FIELDS = {
    "id",
    "created_at",
    "updated_at",
    "name",
    "widget_created_at",
    "organization_id",
    "format",
    "last_domain_used",
    "template_id",
}
JOB_FIELDS = {"id", "widget_id", "status", "result", "error", "created_at", "updated_at"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
MAX_ASSET = 2 * 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
# The start of a file of each allowed type: the type is decided by the bytes (puremagic).
SAMPLES = {
    "image/png": PNG,
    "image/jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64,
    "image/gif": b"GIF89a" + b"\x00" * 64,
    "image/webp": b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 64,
    "image/x-icon": b"\x00\x00\x01\x00\x01\x00\x10\x10" + b"\x00" * 64,
}
ALLOWED_TYPES = list(SAMPLES)


def wait_job(org: OrgClient, location: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = org.http.get(location, headers={"Authorization": f"Bearer {org.token}"})
        assert r.status_code == 200, r.text
        if r.json()["status"] in ("success", "failure") or time.monotonic() > deadline:
            return r.json()
        time.sleep(0.05)


def archive(org: OrgClient, widget_id: str) -> dict[str, Any]:
    r = org.req("DELETE", f"/widgets/{widget_id}")
    assert r.status_code == 202, r.text
    job = wait_job(org, r.headers["location"])
    assert job["status"] == "success", job
    return job


def published_widget(org: OrgClient, **fields: Any) -> dict[str, Any]:
    w = org.widget([org.purpose()], [org.preference()], **fields)
    assert org.wait_deployment(org.deploy(w["id"])["id"])["status"] == "success"
    return w


def s3_keys(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def asset_rows(org_id: str) -> list[WidgetAsset]:
    with unit_of_work() as s:
        return list(s.exec(select(WidgetAsset).where(WidgetAsset.organization_id == org_id)).all())


def upload(org: OrgClient, widget_id: str, data: bytes, ctype: str, name: str = "a.png"):
    return org.req("POST", f"/widgets/{widget_id}/assets", files={"file": (name, data, ctype)})


def assert_error(r: Any, code: int) -> None:
    assert r.status_code == code, r.text
    body = r.json()
    assert body["code"] == code and isinstance(body["message"], str) and body["message"]


def test_archive_job_resource_and_archived_widget_has_exactly_the_didomi_fields(
    database, org, celery_worker
):
    w = published_widget(org, domain="shop.example.com", format="hosted", template_id="dsar_form")
    r = org.req("DELETE", f"/widgets/{w['id']}")
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted.keys() >= JOB_FIELDS
    assert accepted["widget_id"] == w["id"]
    assert accepted["status"] in ("ready", "running", "success")
    assert r.headers["location"].split("?")[0].endswith(accepted["id"])
    job = wait_job(org, r.headers["location"])
    assert job["id"] == accepted["id"]
    assert (job["status"], job["result"], job["error"]) == ("success", "archived", None)
    assert ISO_UTC.match(job["created_at"]) and ISO_UTC.match(job["updated_at"])

    got = org.req("GET", f"/widgets/archived/{w['id']}")
    assert got.status_code == 200, got.text
    row = got.json()
    assert set(row) == ARCHIVED_FIELDS
    assert row["id"] == w["id"] and row["organization_id"] == org.id
    assert (row["name"], row["format"], row["template_id"]) == (w["name"], "hosted", "dsar_form")
    assert row["last_domain_used"] == "shop.example.com"
    assert row["widget_created_at"] == w["created_at"]
    for key in ("created_at", "updated_at", "widget_created_at"):
        assert ISO_UTC.match(row[key]), row
    assert row["created_at"] >= w["created_at"]

    listed = org.req("GET", "/widgets/archived")
    assert listed.status_code == 200 and listed.json() == [row]
    assert org.req("GET", f"/widgets/{w['id']}").status_code == 404
    assert w["id"] not in [x["id"] for x in org.req("GET", "/widgets").json()["data"]]


def test_archived_draft_is_deleted_not_listed(database, org, celery_worker):
    draft = org.widget()
    job = archive(org, draft["id"])
    assert job["result"] == "deleted"
    assert org.req("GET", "/widgets/archived").json() == []
    assert_error(org.req("GET", f"/widgets/archived/{draft['id']}"), 404)


def test_archived_copy_of_unpublished_changes_has_the_published_name(
    sqlite_database, org, celery_worker
):
    w = org.widget(name="as-published")
    dep = org.wait_deployment(org.deploy(w["id"])["id"])
    assert dep["status"] == "success", dep
    r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited-later"})
    assert r.json()["publication_status"] == "unpublished_changes", r.text
    job = wait_job(org, org.req("DELETE", f"/widgets/{w['id']}").headers["location"])
    assert (job["status"], job["result"]) == ("success", "archived"), job
    archived = org.req("GET", f"/widgets/archived/{w['id']}")
    assert archived.status_code == 200, archived.text
    assert archived.json()["name"] == "as-published"


def test_archived_list_filter_sort_limit_skip(database, make_org, celery_worker):
    org, other = make_org(), make_org()
    widgets = [published_widget(org) for _ in range(3)]
    for w in widgets:
        archive(org, w["id"])
    theirs = published_widget(other)
    archive(other, theirs["id"])

    def ids(params: dict[str, Any], client: OrgClient = org) -> list[str]:
        r = client.req("GET", "/widgets/archived", params=params)
        assert r.status_code == 200, r.text
        assert isinstance(r.json(), list)
        return [a["id"] for a in r.json()]

    rows = org.req("GET", "/widgets/archived").json()
    by_created = [a["id"] for a in sorted(rows, key=lambda a: (a["created_at"], a["id"]))]
    assert sorted(by_created) == sorted(w["id"] for w in widgets)  # not the other org's
    assert ids({}) == by_created  # default: oldest first
    assert ids({"$sort[created_at]": "1"}) == by_created
    assert ids({"$sort[created_at]": "-1"}) == by_created[::-1]
    by_updated = [a["id"] for a in sorted(rows, key=lambda a: (a["updated_at"], a["id"]))]
    assert ids({"$sort[updated_at]": "1"}) == by_updated
    assert ids({"$sort[updated_at]": "-1"}) == by_updated[::-1]
    assert ids({"$limit": "2"}) == by_created[:2]
    assert ids({"$skip": "1"}) == by_created[1:]
    assert ids({"$limit": "1", "$skip": "1", "$sort[created_at]": "-1"}) == [by_created[1]]
    assert ids({"$limit": "0"}) == []
    assert ids({"widget_id": widgets[1]["id"]}) == [widgets[1]["id"]]
    assert ids({"widget_id": theirs["id"]}) == []  # another organization's archived widget
    assert ids({}, other) == [theirs["id"]]
    assert_error(org.req("GET", f"/widgets/archived/{theirs['id']}"), 404)
    for bad in ({"$limit": "1001"}, {"$sort[name]": "1"}, {"$sort[created_at]": "2"}, {"x": "1"}):
        assert_error(org.req("GET", "/widgets/archived", params=bad), 400)


def test_archiving_unknown_or_foreign_widget_is_404_and_changes_nothing(database, make_org, s3):
    owner, intruder = make_org(), make_org()
    w = owner.widget(domain="a.example.com")
    assert upload(owner, w["id"], PNG, "image/png").status_code == 201
    before_assets = s3_keys(s3, f"assets/{owner.api_key}/")

    assert_error(intruder.req("DELETE", f"/widgets/{w['id']}"), 404)
    assert_error(owner.req("DELETE", "/widgets/does-not-exist"), 404)
    assert_error(intruder.req("PATCH", f"/widgets/{w['id']}", json={"name": "x"}), 404)
    assert_error(upload(intruder, w["id"], PNG, "image/png"), 404)
    assert_error(intruder.req("GET", f"/widgets/{w['id']}/assets"), 404)

    assert owner.req("GET", f"/widgets/{w['id']}").json() == w
    assert [x["id"] for x in owner.req("GET", "/widgets").json()["data"]] == [w["id"]]
    assert s3_keys(s3, f"assets/{owner.api_key}/") == before_assets
    assert s3_keys(s3, f"assets/{intruder.api_key}/") == []
    assert len(asset_rows(owner.id)) == 1 and asset_rows(intruder.id) == []
    with unit_of_work() as s:
        jobs = s.exec(select(ArchiveJob).where(ArchiveJob.widget_id == w["id"])).all()
    assert jobs == []


def test_archived_widget_refuses_edits_deploys_and_assets(database, org, s3):
    w = org.widget()
    listed_before = org.req("GET", "/widgets").json()["total"]
    r = org.req("DELETE", f"/widgets/{w['id']}")
    assert r.status_code == 202, r.text
    # At once, whether or not a worker has run the job yet.
    assert_error(org.req("GET", f"/widgets/{w['id']}"), 404)
    assert org.req("GET", "/widgets").json()["total"] == listed_before - 1
    assert_error(org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited"}), 404)
    dep = org.req("POST", "/widgets/deployments", json={"widget_id": w["id"]})
    assert_error(dep, 404)
    assert org.req("GET", "/widgets/deployments", params={"widget_id": w["id"]}).json() == []
    assert_error(upload(org, w["id"], PNG, "image/png"), 404)
    assert s3_keys(s3, f"assets/{org.api_key}/") == [] and asset_rows(org.id) == []


def test_delete_twice_returns_the_same_job(database, org):
    w = org.widget()
    first = org.req("DELETE", f"/widgets/{w['id']}")
    second = org.req("DELETE", f"/widgets/{w['id']}")
    assert first.status_code == second.status_code == 202, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    with unit_of_work() as s:
        jobs = s.exec(select(ArchiveJob).where(ArchiveJob.widget_id == w["id"])).all()
    assert [j.id for j in jobs] == [first.json()["id"]]


@pytest.mark.parametrize("ctype", ALLOWED_TYPES)
def test_upload_each_allowed_type_is_stored_under_assets(database, org, s3, ctype):
    w = org.widget()
    data = SAMPLES[ctype] + ctype.encode()
    r = upload(org, w["id"], data, ctype, name="../../evil name.png")
    assert r.status_code == 201, r.text
    asset = r.json()
    assert asset["filename"] == "evil name.png"
    assert asset["widget_id"] == w["id"] and asset["content_type"] == ctype
    assert asset["size"] == len(data)
    # The client's file name never reaches the key.
    assert asset["s3_key"] == f"assets/{org.api_key}/{w['id']}/{asset['id']}"
    obj = s3.get_object(Bucket=BUCKET, Key=asset["s3_key"])
    assert obj["Body"].read() == data and obj["ContentType"] == ctype


@pytest.mark.parametrize(
    "ctype",
    ["text/html", "application/pdf", "image/tiff", "image/svg", "image/svg+xml", "image/gif"],
)
def test_upload_of_other_content_types_is_400_and_stores_nothing(database, org, s3, ctype):
    w = org.widget()
    assert_error(upload(org, w["id"], PNG, ctype), 400)
    assert s3_keys(s3, f"assets/{org.api_key}/") == [] and asset_rows(org.id) == []
    assert org.req("GET", f"/widgets/{w['id']}/assets").json() == []


def test_upload_size_limit_is_2_mib(database, org, s3):
    w = org.widget()
    too_big = upload(org, w["id"], b"\x00" * (MAX_ASSET + 1), "image/png")
    assert_error(too_big, 413)
    assert s3_keys(s3, f"assets/{org.api_key}/") == [] and asset_rows(org.id) == []
    exact = upload(org, w["id"], PNG + b"\x01" * (MAX_ASSET - len(PNG)), "image/png")
    assert exact.status_code == 201, exact.text
    assert s3_keys(s3, f"assets/{org.api_key}/") == [exact.json()["s3_key"]]


def test_asset_list_and_delete(database, make_org, s3):
    org, other = make_org(), make_org()
    w = org.widget()
    a = upload(org, w["id"], PNG, "image/png").json()
    b = upload(org, w["id"], SAMPLES["image/webp"] + b"b", "image/webp", name="b.webp").json()
    listed = org.req("GET", f"/widgets/{w['id']}/assets")
    assert listed.status_code == 200 and listed.json() == [a, b]

    assert_error(other.req("DELETE", f"/widgets/{w['id']}/assets/{a['id']}"), 404)
    assert_error(org.req("DELETE", f"/widgets/{w['id']}/assets/no-such-asset"), 404)
    assert sorted(s3_keys(s3, f"assets/{org.api_key}/")) == sorted([a["s3_key"], b["s3_key"]])

    gone = org.req("DELETE", f"/widgets/{w['id']}/assets/{a['id']}")
    assert gone.status_code == 200, gone.text
    assert gone.json()["id"] == a["id"]
    assert s3_keys(s3, f"assets/{org.api_key}/") == [b["s3_key"]]
    assert org.req("GET", f"/widgets/{w['id']}/assets").json() == [b]
    assert [r.id for r in asset_rows(org.id)] == [b["id"]]
    assert_error(org.req("DELETE", f"/widgets/{w['id']}/assets/{a['id']}"), 404)
