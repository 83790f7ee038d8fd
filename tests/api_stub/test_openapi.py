"""The OpenAPI document describes what the API answers (security, parameters, every status with
the error schema, no 422, Location on 202s, Retry-After on 503s), what a body may hold, and how
operations link; /docs works without any CDN. Schemathesis runs against it in
test_openapi_schemathesis.py."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from api_stub.app import app
from api_stub.openapi import NO_NUL_PATTERN
from api_stub.openapi_links import LINKS
from api_stub.schemas.deployments import BulkCreate

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
        if path in ("/", "/health", "/sessions"):
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
            assert responses["202"]["headers"]["Location"]["required"] is True, (method, path)
        for param in op.get("parameters", []):
            if param["in"] == "path":
                assert param["schema"]["pattern"], (method, path, param["name"])
                assert "404" in responses
        assert "Retry-After" in responses["503"]["headers"], (method, path)
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


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _body_schema(spec: dict[str, Any], op: dict[str, Any]) -> dict[str, Any]:
    content = op["requestBody"]["content"]
    return _resolve(spec, next(iter(content.values()))["schema"])


def test_links_lead_to_operations_with_those_parameters(spec):
    """Every link names an operation of the document, its parameters and body fields."""
    documented = 0
    for method, path, op in operations(spec):
        for status, response in op["responses"].items():
            for name, link in response.get("links", {}).items():
                documented += 1
                target_path, target_method = link["operationRef"][len("#/paths/") :].rsplit("/", 1)
                target_path = target_path.replace("~1", "/").replace("~0", "~")
                target = spec["paths"][target_path][target_method]
                params = {(p["in"], p["name"]) for p in target.get("parameters", [])}
                for qualified in link.get("parameters", {}):
                    where, _, param = qualified.partition(".")
                    assert (where, param) in params, (method, path, status, name, qualified)
                required = {p["name"] for p in target.get("parameters", []) if p.get("required")}
                given = {q.partition(".")[2] for q in link.get("parameters", {})}
                assert required - given <= {"organization_id"}, (method, path, name)
                if "requestBody" in link:
                    fields = _body_schema(spec, target)["properties"]
                    assert set(link["requestBody"]) <= set(fields), (method, path, name)
    assert documented == sum(len(links) for links in LINKS.values())
    deploy = spec["paths"]["/widgets/deployments"]["post"]["responses"]["202"]["links"]
    # A deployment is fetched by its id (what Location says), not by its deployment_id.
    assert deploy["GetDeployment"]["parameters"]["path.deployment_id"] == "$response.body#/id"


def _strings_and_maps(spec, node, seen):
    if isinstance(node, list):
        for item in node:
            yield from _strings_and_maps(spec, item, seen)
    elif isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                yield from _strings_and_maps(spec, spec["components"]["schemas"][name], seen)
            return
        if node.get("type") in ("string", "object"):
            yield node
        for key, value in node.items():
            if key != "propertyNames":
                yield from _strings_and_maps(spec, value, seen)


def test_json_bodies_say_no_nul_character(spec):
    """What api_stub.schemas.common.json_problems refuses is in the document: no NUL in a typed
    string or a key (a pattern), nor anywhere in free-form objects (in words)."""
    assert re.fullmatch(NO_NUL_PATTERN, "a\x00b") is None
    assert re.fullmatch(NO_NUL_PATTERN, "any text, ünïcode too")
    checked = 0
    for method, path, op in operations(spec):
        content = op.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            continue
        for node in _strings_and_maps(spec, content["application/json"]["schema"], set()):
            checked += 1
            # A date-time's format already excludes NUL (RFC 3339 has none).
            if node["type"] == "string" and not {"enum", "const"} & node.keys():
                if node.get("format") == "date-time":
                    continue
                assert re.fullmatch(node["pattern"], "x\x00") is None, (method, path, node)
            if node["type"] == "object" and "properties" not in node:
                assert node["propertyNames"]["pattern"] == NO_NUL_PATTERN, (method, path, node)
                if node.get("additionalProperties", True) is True:
                    assert "NUL" in node["description"], (method, path, node)
    assert checked > 50
    metadata = spec["components"]["schemas"]["PurposeCreate"]["properties"]["metadata"]
    assert metadata["additionalProperties"] is True and "NUL" in metadata["description"]


BULK_BODIES = [
    {"purpose_id": "p1"},
    {"widget_ids": ["w1", "w2"], "reason": "r"},
    {"publication_status": "published", "purpose_id": None},
    {"preference_id": "p1", "widget_ids": None, "publication_status": None},
    {},
    {"reason": "only a reason"},
    {"purpose_id": "p1", "preference_id": "p2"},
    {"widget_ids": ["w1"], "publication_status": "draft"},
    {"purpose_id": None},
]


@pytest.mark.parametrize("body", BULK_BODIES)
def test_bulk_selector_rule_is_in_the_document(spec, body):
    """The document and the server agree on "exactly one selector" (null = not given)."""
    schema = spec["components"]["schemas"]["BulkCreate"]
    valid_in_document = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        BulkCreate.model_validate(body)
        accepted = True
    except ValidationError:
        accepted = False
    assert valid_in_document == accepted, body


def test_multipart_upload_takes_only_its_file(spec):
    op = spec["paths"]["/widgets/{widget_id}/assets"]["post"]
    body = _body_schema(spec, op)
    assert body["additionalProperties"] is False
    assert body["required"] == ["file"]
    assert body["properties"]["file"]["format"] == "binary"


def test_new_preference_values_have_no_id(spec):
    schemas = spec["components"]["schemas"]
    create_values = _resolve(spec, schemas["PreferenceCreate"]["properties"]["values"]["items"])
    update_values = schemas["PreferenceUpdate"]["properties"]["values"]["items"]
    assert "id" not in create_values["properties"]
    assert create_values["additionalProperties"] is False
    assert "id" in _resolve(spec, update_values)["properties"]
