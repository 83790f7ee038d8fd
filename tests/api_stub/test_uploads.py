"""Uploads are decided by their bytes: the sniffed type must agree with the declared one, SVG and
anything that is not one of the allowed images is refused, file names are normalized."""

from __future__ import annotations

import pytest

from api_stub.routes.assets import content_disposition, normalize_filename
from tests.api_stub.test_archive_api import SAMPLES, asset_rows, s3_keys, upload
from tests.conftest import BUCKET
from worker.storage_keys import asset_prefix

HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'


def refused(r, message_part: str = "") -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["name"] == "BadRequest" and "file" in body["errors"], body
    assert message_part in body["message"], body


@pytest.mark.parametrize("declared", ["image/png", "image/x-icon", "image/jpeg", "image/gif"])
def test_html_declared_as_an_image_is_refused(database, org, s3, declared):
    w = org.widget()
    refused(upload(org, w["id"], HTML, declared, name="logo.png"))
    assert s3_keys(s3, f"assets/{org.api_key}/") == [] and asset_rows(org.id) == []


@pytest.mark.parametrize("declared", ["image/svg+xml", "image/png", "application/octet-stream"])
def test_svg_is_refused(database, org, s3, declared):
    w = org.widget()
    refused(upload(org, w["id"], SVG, declared, name="logo.svg"), "SVG")
    refused(upload(org, w["id"], b"<?xml version='1.0'?>\n" + SVG, declared, name="logo.svg"))
    assert s3_keys(s3, f"assets/{org.api_key}/") == []


def test_a_declared_type_must_agree_with_the_bytes(database, org):
    w = org.widget()
    r = upload(org, w["id"], SAMPLES["image/png"], "image/jpeg")
    refused(r, "declared 'image/jpeg' but its content is 'image/png'")


@pytest.mark.parametrize(
    ("declared", "stored"),
    [
        ("application/octet-stream", "image/png"),  # generated clients, curl -F
        ("image/png; charset=binary", "image/png"),
    ],
)
def test_a_generic_declared_type_takes_the_sniffed_one(database, org, s3, declared, stored):
    w = org.widget()
    r = upload(org, w["id"], SAMPLES["image/png"], declared)
    assert r.status_code == 201, r.text
    assert r.json()["content_type"] == stored
    obj = s3.get_object(Bucket=BUCKET, Key=r.json()["s3_key"])
    assert obj["ContentType"] == stored


@pytest.mark.parametrize(
    ("declared", "data", "stored"),
    [
        ("image/jpg", SAMPLES["image/jpeg"], "image/jpeg"),
        ("image/vnd.microsoft.icon", SAMPLES["image/x-icon"], "image/x-icon"),
    ],
)
def test_type_aliases_are_stored_under_the_canonical_type(database, org, declared, data, stored):
    w = org.widget()
    r = upload(org, w["id"], data, declared)
    assert r.status_code == 201, r.text
    assert r.json()["content_type"] == stored


def test_empty_and_unknown_bytes_are_refused(database, org):
    w = org.widget()
    assert upload(org, w["id"], b"", "image/png").status_code == 400
    refused(upload(org, w["id"], b"just some text", "image/png"))


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\logo.png", "logo.png"),
        ('lo"go;.png', "logo.png"),
        ("a\r\nX-Injected: 1.png", "aX-Injected 1.png"),
        ("evil\u202egnp.exe", "evilgnp.exe"),  # no right-to-left override
        ("Cafe\u0301.png", "Caf\u00e9.png"),  # NFC
        ("  .hidden.  ", "hidden"),
        ("", "asset"),
        ("/", "asset"),
        ("a" * 300 + ".png", "a" * 251 + ".png"),
    ],
)
def test_filenames_are_normalized(raw, normalized):
    assert normalize_filename(raw) == normalized


def test_a_normalized_filename_is_what_the_row_keeps(database, org):
    w = org.widget()
    r = upload(org, w["id"], SAMPLES["image/gif"], "image/gif", name="..\\dir/ logo:1.gif ")
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "logo1.gif"


def test_content_disposition_is_an_attachment_with_a_safe_name():
    assert content_disposition("logo.png") == (
        "attachment; filename=\"logo.png\"; filename*=UTF-8''logo.png"
    )
    header = content_disposition("caf\u00e9 1.png")
    assert header == "attachment; filename=\"caf_ 1.png\"; filename*=UTF-8''caf%C3%A9%201.png"
    assert header.isascii()


def test_an_unavailable_store_is_a_503_with_retry_after_and_keeps_nothing(
    database, org, s3, s3_faults
):
    """S3 answering 503 to every attempt of the upload: the client is told to come back
    (``Retry-After``, like every other 503), and neither a row nor an object is left."""
    widget_id = org.widget()["id"]
    s3_faults.fail_next("PUT", 503, times=20)  # more than botocore's attempts
    r = upload(org, widget_id, SAMPLES["image/png"], "image/png")
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json()["name"] == "Unavailable"
    assert s3_faults.count("PUT", 503) >= 2  # the fault landed, retried by botocore
    assert asset_rows(org.id) == []
    assert s3_keys(s3, asset_prefix(org.api_key, widget_id)) == []
