"""The OpenAPI document says what the API answers, and ``/docs`` works offline.

FastAPI's generated document is completed once, globally (no route decorator needs to know):

- every error status an operation can answer, with the ``Error`` schema (the Didomi shape):
  400 (any parameter or body), 401/403 (bearer-secured operations), 404 (an organization route
  or a path with IDs), 408/413 (a request body: api_stub.edge), 409 (listed below or declared
  by the route), 500 (anything unexpected), 503 (any request: the database unavailable or busy
  past the request's deadline, api_stub.errors and api_stub.edge, or the object store; with
  ``Retry-After``); FastAPI's 422, which the API never answers, is gone;
- ``Location`` on every 202 (required);
- file parts of multipart bodies marked ``format: binary`` (OpenAPI 3.0 style, next to 3.1's
  ``contentMediaType``), so generated clients send bytes, not text;
- ``/health``'s body as the named ``Health`` schema, shared by its 200 and 503 (two inline
  copies of one titled schema make client generators emit duplicate models);
- ID path parameters with their pattern; no ``authorization`` header parameter (the security
  schemes say it);
- request bodies say what every body value must be (``api_stub.schemas.common.json_problems``
  enforces it): no NUL character in any string or object key (PostgreSQL cannot store one), as
  a pattern where the type is known, in words on free-form objects (``metadata``,
  ``components``); a multipart body has exactly its declared parts;
- OpenAPI ``links`` (:data:`LINKS`): how the answer of one operation names the objects of
  the next (a created widget's ``id`` is the ``widget_id`` of its GET, PATCH, DELETE, deploys and
  uploads; a deployment's ``id``, not its ``deployment_id``, is the one its ``Location`` and GET
  take), for clients, Swagger UI and schemathesis's stateful tests.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from api_stub.errors import ERROR_NAMES, ErrorBody
from api_stub.openapi_links import add_links
from api_stub.schemas.common import MAX_JSON_DEPTH, SAFE_ID_PATTERN
from api_stub.schemas.health import Health
from worker.ids import MAX_ID_LENGTH

# Swagger UI 5 (OpenAPI 3.1) from a pinned package (fastapi-offline), served by the app.
DOCS_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
DOCS_ASSETS_PATH = "/docs/assets"

ERROR_REF = {"$ref": "#/components/schemas/Error"}
HEALTH_REF = {"$ref": "#/components/schemas/Health"}
# Any string without a NUL character (a regular expression in both ECMA-262 and Python syntax).
NO_NUL_PATTERN = "^[^\\x00]*$"
FREE_FORM_RULES = (
    "Any JSON object: no NUL character in any string or key, at any depth; finite numbers; at "
    f"most {MAX_JSON_DEPTH} levels of nesting in the whole body"
)
# Operations answering 409 whose route does not declare it: (method, path).
CONFLICTS = frozenset({("post", "/widgets/deployments")})
_DESCRIPTIONS = {
    400: "Invalid request: the offending fields are named in `errors`",
    401: "Missing, invalid or expired bearer token (or a revoked API key)",
    403: "The token is not valid for this organization or route",
    404: "Not found (another organization's objects are never visible)",
    408: "The request body did not arrive in time",
    409: "Conflict with the current state",
    413: "Request body too large",
    500: "Unexpected error",
    503: "A backing service (database, broker, storage) is unavailable",
}
RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before retrying",
    "schema": {"type": "integer", "minimum": 0},
}
_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")


def _error_response(code: int) -> dict[str, Any]:
    return {
        "description": _DESCRIPTIONS.get(code, ERROR_NAMES.get(code, ("Error", ""))[0]),
        "content": {"application/json": {"schema": ERROR_REF}},
    }


def _statuses(method: str, path: str, op: dict[str, Any]) -> set[int]:
    schemes = {name for req in op.get("security", []) for name in req}
    params = op.get("parameters", [])
    has_body = "requestBody" in op
    codes = {500, 503}
    if params or has_body:
        codes.add(400)
    if schemes:
        codes |= {401, 403}
    if "OrganizationToken" in schemes or any(p.get("in") == "path" for p in params):
        codes.add(404)
    if has_body:
        codes |= {408, 413}
    if (method, path) in CONFLICTS:
        codes.add(409)
    if path == "/sessions":
        codes.add(401)
    return codes


def _complete_operation(method: str, path: str, op: dict[str, Any]) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)
    for code in _statuses(method, path, op):
        responses.setdefault(str(code), _error_response(code))
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400 and "content" not in response:
            response["content"] = {"application/json": {"schema": ERROR_REF}}
    if "202" in responses:
        responses["202"].setdefault("headers", {})["Location"] = {
            "description": "Where to follow the accepted job",
            "required": True,
            "schema": {"type": "string"},
        }
    if "503" in responses:
        responses["503"].setdefault("headers", {})["Retry-After"] = copy.deepcopy(
            RETRY_AFTER_HEADER
        )
    kept = []
    for param in op.get("parameters", []):
        if param.get("in") == "header" and param.get("name", "").lower() == "authorization":
            continue
        if param.get("in") == "path" and (param["name"].endswith("_id") or param["name"] == "key"):
            param["schema"] = {
                **param.get("schema", {}),
                "type": "string",
                "pattern": SAFE_ID_PATTERN,
                "maxLength": MAX_ID_LENGTH,
            }
        kept.append(param)
    if "parameters" in op:
        op["parameters"] = kept


def _mark_binary_parts(op: dict[str, Any], schemas: dict[str, Any]) -> None:
    """String properties of a multipart body that carry a file (``contentMediaType``) also get
    ``format: binary``: generators (openapi-python-client) otherwise upload ``str(file)``."""
    content = op.get("requestBody", {}).get("content", {})
    body = content.get("multipart/form-data", {}).get("schema", {})
    ref = body.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        body = schemas.get(ref.rsplit("/", 1)[1], {})
    if "properties" in body:
        # The route takes exactly its declared parts (``form_limits``): no other field.
        body.setdefault("additionalProperties", False)
    for prop in body.get("properties", {}).values():
        for part in (prop, prop.get("items", {})):
            if part.get("type") == "string" and "contentMediaType" in part:
                part.setdefault("format", "binary")


def _request_components(schema: dict[str, Any]) -> set[str]:
    """The component schemas a JSON request body uses, directly or through other components."""
    found: set[str] = set()
    pending: list[Any] = [
        media.get("schema", {})
        for item in schema.get("paths", {}).values()
        for method in _METHODS
        if method in item
        for media_type, media in item[method].get("requestBody", {}).get("content", {}).items()
        if media_type == "application/json"
    ]
    components = schema.get("components", {}).get("schemas", {})
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            ref = node.get("$ref", "")
            name = ref.rsplit("/", 1)[-1]
            if ref.startswith("#/components/schemas/") and name not in found:
                found.add(name)
                pending.append(components.get(name, {}))
            pending.extend(v for k, v in node.items() if k != "$ref")
    return found


def _json_safe_values(node: Any) -> None:
    """Say what ``json_problems`` refuses in a request body: a NUL character in a string or an
    object key (a pattern on typed strings and keys; in words for free-form objects, as a
    recursive schema of JSON values breaks client generators such as openapi-python-client)."""
    if isinstance(node, list):
        for item in node:
            _json_safe_values(item)
        return
    if not isinstance(node, dict):
        return
    plain = not ({"pattern", "enum", "const", "format"} & node.keys())
    if node.get("type") == "string" and plain:
        node["pattern"] = NO_NUL_PATTERN
    if node.get("type") == "object" and "properties" not in node:
        node.setdefault("propertyNames", {}).setdefault("pattern", NO_NUL_PATTERN)
        if node.get("additionalProperties", True) in (True, {}):
            node.setdefault("description", FREE_FORM_RULES)
    for key, value in node.items():
        if key != "propertyNames":
            _json_safe_values(value)


def complete_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ErrorBody.model_json_schema()
    for name in _request_components(schema):
        _json_safe_values(schemas[name])
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                _complete_operation(method, path, item[method])
                _mark_binary_parts(item[method], schemas)
    if path_item := schema.get("paths", {}).get("/health", {}).get("get"):
        ok = path_item["responses"].get("200")
        if ok is not None:  # /health answers 503 with the same body
            schemas["Health"] = Health.model_json_schema()
            ok["content"] = {"application/json": {"schema": HEALTH_REF}}
            path_item["responses"]["503"] = {
                **copy.deepcopy(ok),
                "description": _DESCRIPTIONS[503],
                "headers": {"Retry-After": copy.deepcopy(RETRY_AFTER_HEADER)},
            }
    add_links(schema.get("paths", {}))
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generated = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
                servers=app.servers,
            )
            app.openapi_schema = complete_openapi(generated)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(DOCS_ASSETS_PATH, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - docs",
            swagger_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_PATH}/favicon.png",
        )
