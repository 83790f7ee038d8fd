"""A client generated from the served ``/openapi.json`` works: openapi-python-client (pinned dev
dependency) generates a package from a real uvicorn server's document, without a single warning,
and that package, imported as is, authenticates (admin → API key → ``POST /sessions``), creates
widgets, pages through them with ``$limit``/``$skip``/``$sort``, uploads an asset (multipart,
the bytes land on S3) and reads errors into its model of the Didomi error shape.

Every call is made with ``raise_on_unexpected_status=True``: a status the document does not
list would raise instead of being parsed.
"""

from __future__ import annotations

import importlib
import io
import os
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.conftest import BUCKET
from tests.support.api import ADMIN_TOKEN
from tests.support.api_server import uvicorn_api

PACKAGE = "generated_widgets_client"
GENERATOR_CONFIG = f"package_name_override: {PACKAGE}\npost_hooks: []\n"  # no ruff, no network


def png_1x1() -> bytes:
    """A real one-pixel PNG (signature, IHDR, IDAT, IEND)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def api_url(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {**os.environ, "S3_ENDPOINT_URL": services["moto_url"], "S3_BUCKET": BUCKET}
    with uvicorn_api(tmp_path_factory.mktemp("client-api"), env) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def gen(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The generated package, imported; ``gen.op("widgets.list_widgets_widgets_get")`` imports
    one operation module (``api/{tag}/{operation id}``), ``gen.model("WidgetCreate")`` a model."""
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text(GENERATOR_CONFIG)
    cmd = [sys.executable, "-m", "openapi_python_client", "generate"]
    cmd += ["--url", f"{api_url}/openapi.json", "--meta", "none", "--config", str(config)]
    cmd += ["--output-path", str(out / PACKAGE), "--fail-on-warning"]
    run = subprocess.run(
        cmd, cwd=out, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "warning" not in output.lower(), output
    sys.path.insert(0, str(out))
    try:
        package: ModuleType = importlib.import_module(PACKAGE)
        models = importlib.import_module(f"{PACKAGE}.models")
        types = importlib.import_module(f"{PACKAGE}.types")
        yield SimpleNamespace(
            package=package,
            models=models,
            File=types.File,
            op=lambda name: importlib.import_module(f"{PACKAGE}.api.{name}"),
            model=lambda name: getattr(models, name),
            base_url=api_url,
        )
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def authenticated(gen: SimpleNamespace, token: str) -> Any:
    return gen.package.AuthenticatedClient(
        base_url=gen.base_url, token=token, raise_on_unexpected_status=True, timeout=30
    )


@pytest.fixture
def org(gen: SimpleNamespace) -> SimpleNamespace:
    """A new organization, its API key and an access token, all through the generated client."""
    admin = authenticated(gen, ADMIN_TOKEN)
    created = gen.op("admin.create_organization_organizations_post").sync_detailed(
        client=admin, body=gen.model("OrganizationCreate")(name=f"gen-{uuid.uuid4().hex[:6]}")
    )
    assert created.status_code == 201, created.content
    org_id, org_api_key = created.parsed.id, created.parsed.api_key
    key = gen.op("admin.create_api_key_organizations_organization_id_api_keys_post").sync(
        org_id, client=admin
    )
    assert isinstance(key, gen.model("ApiKeyPublic")), key
    anonymous = gen.package.Client(base_url=gen.base_url, raise_on_unexpected_status=True)
    session = gen.op("auth.create_session_sessions_post").sync_detailed(
        client=anonymous,
        body=gen.model("SessionCreate")(type_="api-key", key=key.key, secret=key.secret),
    )
    assert session.status_code == 201, session.content
    assert isinstance(session.parsed, gen.model("SessionPublic"))
    return SimpleNamespace(
        id=org_id, client=authenticated(gen, session.parsed.access_token), api_key=org_api_key
    )


def create_widget(gen: SimpleNamespace, org: SimpleNamespace, name: str) -> Any:
    r = gen.op("widgets.create_widget_widgets_post").sync_detailed(
        client=org.client, organization_id=org.id, body=gen.model("WidgetCreate")(name=name)
    )
    assert r.status_code == 201, r.content
    assert isinstance(r.parsed, gen.model("WidgetPublic")), r.parsed
    return r.parsed


def test_generated_client_creates_widgets_and_pages_through_them(gen, org):
    created = [create_widget(gen, org, f"paged-{i}") for i in range(3)]
    assert [w.name for w in created] == ["paged-0", "paged-1", "paged-2"]
    assert created[0].organization_id == org.id
    assert created[0].publication_status.value == "draft"

    list_widgets = gen.op("widgets.list_widgets_widgets_get")
    first = list_widgets.sync(client=org.client, organization_id=org.id, limit=2, skip=0)
    assert isinstance(first, gen.model("PageWidgetPublic")), first
    assert (first.total, first.limit, first.skip) == (3, 2, 0)
    rest = list_widgets.sync(client=org.client, organization_id=org.id, limit=2, skip=2)
    assert (rest.total, rest.limit, rest.skip) == (3, 2, 2)
    assert [w.id for w in first.data + rest.data] == [w.id for w in created]

    newest_first = gen.model("ListWidgetsWidgetsGetSortCreatedAt").VALUE_NEGATIVE_1
    newest = list_widgets.sync(
        client=org.client, organization_id=org.id, limit=1, sortcreated_at=newest_first
    )
    assert [w.id for w in newest.data] == [created[-1].id]

    got = gen.op("widgets.get_widget_widgets_widget_id_get").sync(
        created[1].id, client=org.client, organization_id=org.id
    )
    assert isinstance(got, gen.model("WidgetPublic")) and got.name == "paged-1"


def test_generated_client_uploads_an_asset_as_multipart(gen, org, s3):
    widget = create_widget(gen, org, "with-logo")
    data = png_1x1()
    body = gen.model("BodyUploadAssetWidgetsWidgetIdAssetsPost")(
        file=gen.File(payload=io.BytesIO(data), file_name="logo.png", mime_type="image/png")
    )
    r = gen.op("assets.upload_asset_widgets_widget_id_assets_post").sync_detailed(
        widget.id, client=org.client, organization_id=org.id, body=body
    )
    assert r.status_code == 201, r.content
    asset = r.parsed
    assert isinstance(asset, gen.model("AssetPublic")), asset
    assert (asset.widget_id, asset.filename, asset.content_type, asset.size) == (
        widget.id,
        "logo.png",
        "image/png",
        len(data),
    )
    assert asset.s3_key == f"assets/{org.api_key}/{widget.id}/{asset.id}"
    assert s3.get_object(Bucket=BUCKET, Key=asset.s3_key)["Body"].read() == data

    listed = gen.op("assets.list_assets_widgets_widget_id_assets_get").sync(
        widget.id, client=org.client, organization_id=org.id
    )
    assert [a.id for a in listed] == [asset.id]


def test_generated_client_reads_errors_into_the_error_model(gen, org):
    Error = gen.model("ErrorBody")

    missing = gen.op("widgets.get_widget_widgets_widget_id_get").sync_detailed(
        "no-such-widget", client=org.client, organization_id=org.id
    )
    assert missing.status_code == 404
    assert isinstance(missing.parsed, Error), missing.content
    assert (missing.parsed.code, missing.parsed.name, missing.parsed.class_name) == (
        404,
        "NotFound",
        "not-found",
    )
    assert "no-such-widget" in missing.parsed.message

    too_many = gen.op("widgets.list_widgets_widgets_get").sync_detailed(
        client=org.client, organization_id=org.id, limit=1001
    )
    assert too_many.status_code == 400
    assert isinstance(too_many.parsed, Error), too_many.content
    assert (too_many.parsed.code, too_many.parsed.name) == (400, "BadRequest")
    assert "$limit" in too_many.parsed.errors.to_dict(), too_many.content

    widget = create_widget(gen, org, "svg-refused")
    svg = gen.File(
        payload=io.BytesIO(b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
        file_name="logo.svg",
        mime_type="image/svg+xml",
    )
    refused = gen.op("assets.upload_asset_widgets_widget_id_assets_post").sync_detailed(
        widget.id,
        client=org.client,
        organization_id=org.id,
        body=gen.model("BodyUploadAssetWidgetsWidgetIdAssetsPost")(file=svg),
    )
    assert refused.status_code == 400
    assert isinstance(refused.parsed, Error), refused.content
    assert "file" in refused.parsed.errors.to_dict()

    stranger = authenticated(gen, "not-a-token")
    denied = gen.op("widgets.list_widgets_widgets_get").sync_detailed(
        client=stranger, organization_id=org.id
    )
    assert denied.status_code == 401
    assert isinstance(denied.parsed, Error) and denied.parsed.code == 401, denied.content
