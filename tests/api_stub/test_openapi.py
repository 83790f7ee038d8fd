"""The OpenAPI document describes what the API answers (security, parameters, every status with
the error schema, no 422, Location on 202s), /docs works without any CDN, and schemathesis finds
no server error, no undocumented status and no response off its schema."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from api_stub.app import app, create_app
from tests.api_stub.live_server import live_server
from tests.conftest import _use_database as use_database
from tests.support.api import ADMIN, make_org_client

ERROR_REF = "#/components/schemas/Error"
LIST_PATHS = [
    "/widgets",
    "/metadata/purposes",
    "/preferences",
    "/widgets/deployments",
    "/widgets/archived",
    "/organizations",
]


def operations(spec):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield method, path, op


@pytest.fixture(scope="module")
def spec():
    return app.openapi()


def test_no_422_and_every_error_has_the_error_schema(spec):
    assert "HTTPValidationError" not in str(spec)
    assert spec["components"]["schemas"]["Error"]["required"] == [
        "code",
        "name",
        "className",
        "message",
        "errors",
    ]
    for method, path, op in operations(spec):
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        for status, response in responses.items():
            if int(status) >= 400 and not (path == "/health" and status == "503"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)
        assert "500" in responses


def test_security_and_organization_id(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["OrganizationToken"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["OrganizationToken"]["description"],
    }
    assert schemes["AdminToken"]["scheme"] == "bearer"
    for method, path, op in operations(spec):
        security = [name for req in op.get("security", []) for name in req]
        params = {p["name"]: p for p in op.get("parameters", [])}
        assert "authorization" not in {n.lower() for n in params}, (method, path)
        if path in ("/health", "/sessions"):
            assert security == [], (method, path)
            continue
        if path.startswith("/organizations"):
            assert security == ["AdminToken"], (method, path)
        else:
            assert security == ["OrganizationToken"], (method, path)
            org = params["organization_id"]
            assert org["in"] == "query" and org["required"] is True, (method, path)
            assert org["schema"]["pattern"]
        assert {"401", "403"} <= set(op["responses"]), (method, path)


@pytest.mark.parametrize("path", LIST_PATHS)
def test_list_parameters_are_documented(spec, path):
    params = {p["name"]: p for p in spec["paths"][path]["get"]["parameters"]}
    limit = params["$limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"]) == ("integer", 0, 1000)
    assert params["$skip"]["schema"]["minimum"] == 0
    for key in ("$sort[created_at]", "$sort[updated_at]"):
        assert params[key]["schema"]["enum"] == [1, -1]
    if path in ("/widgets/deployments", "/widgets/archived"):
        assert "widget_id" in params


def test_statuses_location_and_id_patterns(spec):
    for method, path, op in operations(spec):
        responses = op["responses"]
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses), (method, path)
        if "202" in responses:
            assert "Location" in responses["202"]["headers"], (method, path)
        for param in op.get("parameters", []):
            if param["in"] == "path":
                assert param["schema"]["pattern"], (method, path, param["name"])
                assert "404" in responses
    assert "409" in spec["paths"]["/widgets/deployments"]["post"]["responses"]
    assert "503" in spec["paths"]["/health"]["get"]["responses"]


def test_docs_are_served_without_any_cdn(api):
    r = api.get("/docs")
    assert r.status_code == 200
    assert not re.search(r"https?://", r.text), r.text
    for asset in re.findall(r'(?:href|src)="([^"]+)"', r.text):
        got = api.get(asset)
        assert got.status_code == 200, asset
        assert len(got.content) > 0
    js = api.get("/docs/assets/swagger-ui-bundle.js")
    assert "javascript" in js.headers["content-type"] and b"SwaggerUIBundle" in js.content
    assert api.get("/openapi.json").json()["openapi"].startswith("3.1")


# --- schemathesis ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_api(services):
    """The API on a real uvicorn server (SQLite), and a real organization with its token."""
    use_database(services["sqlite_url"])
    with live_server(create_app()) as address, httpx.Client(base_url=f"http://{address}") as http:
        yield address, make_org_client(http)


# Generated from the application object itself (no server or settings needed to collect).
# Valid (positive) data only, a fixed seed, a few examples per operation: it stays well under a
# minute on a small machine. The coverage phase (hundreds of boundary cases per operation) is
# for a longer CI job.
SCHEMATHESIS_CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20261129,
        "generation": {"mode": "positive", "max-examples": 5, "deterministic": True},
        "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(create_app().openapi(), config=SCHEMATHESIS_CONFIG)


@schema.parametrize()
@settings(
    max_examples=5,
    derandomize=True,  # a fixed seed: the same cases every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_failure(case, live_api):
    """Generated requests, authenticated as a real organization (or as the admin): no server
    error, every status documented, every response body on its schema."""
    address, org = live_api
    if case.path.startswith("/organizations"):
        headers = dict(ADMIN)
    else:
        headers = {"Authorization": f"Bearer {org.token}"}
        if case.query is not None and "organization_id" in case.query:
            case.query["organization_id"] = org.id
    case.call_and_validate(
        base_url=f"http://{address}",
        headers=headers,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
    )
