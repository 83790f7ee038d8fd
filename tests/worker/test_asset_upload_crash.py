"""Asset uploads without a transaction across S3: what an API process that died between the
steps leaves behind is finished by the archive (row first, then object, then ``stored``)."""

from __future__ import annotations

from typing import Any

from sqlmodel import select

from tests.conftest import BUCKET
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import WidgetAsset
from worker.s3 import get_store
from worker.services.archive import mark_archived, run_archive
from worker.services.locking import lock_widget
from worker.storage_keys import asset_key

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def keys(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def uploading_row(org_id: str, api_key: str, widget_id: str) -> WidgetAsset:
    """Step 1 of an upload: the row is committed as ``uploading`` before the object is written."""
    asset_id = new_id()
    row = WidgetAsset(
        id=asset_id,
        organization_id=org_id,
        widget_id=widget_id,
        filename="logo.png",
        content_type="image/png",
        size=len(PNG),
        s3_key=asset_key(api_key, widget_id, asset_id),
        checksum="0" * 64,
        status="uploading",
    )
    with unit_of_work() as s:
        s.add(row)
    return row


def archive(org_id: str, widget_id: str) -> str | None:
    with unit_of_work() as s:
        widget = lock_widget(s, org_id, widget_id)
        assert widget is not None
        job_id = mark_archived(s, widget).id
    return run_archive(org_id, widget_id, job_id, store=get_store).result


def test_upload_that_died_after_its_object_was_written_is_removed_by_the_archive(database, org, s3):
    w = org.widget()
    row = uploading_row(org.id, org.api_key, w["id"])
    s3.put_object(Bucket=BUCKET, Key=row.s3_key, Body=PNG, ContentType="image/png")  # step 2
    # ... and the API died before step 3: never listed, but known.
    listed = org.req("GET", f"/widgets/{w['id']}/assets")
    assert listed.status_code == 200 and listed.json() == []
    assert archive(org.id, w["id"]) == "deleted"
    assert keys(s3, f"assets/{org.api_key}/{w['id']}/") == []
    with unit_of_work() as s:
        assert s.exec(select(WidgetAsset).where(WidgetAsset.widget_id == w["id"])).all() == []


def test_object_without_a_row_under_the_widget_prefix_is_swept_by_the_archive(database, org, s3):
    """An upload whose clean-up of a refused write failed: no row, an object. The prefix sweep
    is what keeps "no object outlives its widget" true."""
    w = org.widget()
    stray = asset_key(org.api_key, w["id"], new_id())
    s3.put_object(Bucket=BUCKET, Key=stray, Body=PNG)
    other = org.widget()  # another widget's assets are not touched
    kept = asset_key(org.api_key, other["id"], new_id())
    s3.put_object(Bucket=BUCKET, Key=kept, Body=PNG)
    assert archive(org.id, w["id"]) == "deleted"
    assert keys(s3, f"assets/{org.api_key}/{w['id']}/") == []
    assert keys(s3, f"assets/{org.api_key}/{other['id']}/") == [kept]


def test_upload_completes_with_a_stored_row_and_its_object(database, org, s3):
    w = org.widget()
    r = org.req("POST", f"/widgets/{w['id']}/assets", files={"file": ("a.png", PNG, "image/png")})
    assert r.status_code == 201, r.text
    with unit_of_work() as s:
        row = s.get(WidgetAsset, r.json()["id"])
        assert row is not None and row.status == "stored"
    assert keys(s3, row.s3_key) == [row.s3_key]
