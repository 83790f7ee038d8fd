"""The HTTP edge (api_stub.edge): bodies bounded before they are read, authentication before any
body is parsed, no ``100 Continue`` for a refused request, stalled bodies timed out, and the
connection kept usable after errors. In-process (TestClient) and on a real uvicorn server."""

from __future__ import annotations

import json
import time
import uuid

import jwt
import pytest

from api_stub.app import create_app
from api_stub.route_policy import (
    JSON_BODY_LIMIT,
    MAX_ASSET_BYTES,
    UPLOAD_BODY_LIMIT,
    route_policy,
)
from tests.api_stub.live_server import connect, live_server, read_response, request_head
from tests.support.api import ADMIN

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"


def assert_error(r, code: int, name: str) -> dict:
    assert r.status_code == code, r.text
    body = r.json()
    assert set(body) == {"code", "name", "className", "message", "errors"}, body
    assert (body["code"], body["name"]) == (code, name)
    return body


def widget_total(org) -> int:
    return org.req("GET", "/widgets").json()["total"]


def big_json(size: int) -> bytes:
    return json.dumps({"name": "w", "components": {"blob": "x" * size}}).encode()


# Each organization route that takes a body, with a body of the right kind.
def body_routes(widget_id: str) -> list[tuple[str, str, dict]]:
    return [
        ("POST", "/widgets", {"content": b'{"name": "w"}'}),
        ("PATCH", f"/widgets/{widget_id}", {"content": b'{"name": "w"}'}),
        ("POST", "/widgets/deployments", {"content": b'{"widget_id": "%s"}' % widget_id.encode()}),
        ("POST", "/metadata/purposes", {"content": b'{"description": {"en": "x"}}'}),
        ("POST", "/preferences", {"content": b'{"name": {"en": "x"}}'}),
        ("POST", f"/widgets/{widget_id}/assets", {"files": {"file": ("a.png", PNG, "image/png")}}),
    ]


def test_json_body_over_the_limit_is_413_with_or_without_a_token(database, org):
    body = big_json(JSON_BODY_LIMIT)
    headers = {"content-type": "application/json"}
    r = org.http.post("/widgets", params={"organization_id": org.id}, content=body, headers=headers)
    err = assert_error(r, 413, "PayloadTooLarge")
    assert err["className"] == "payload-too-large"
    assert r.headers["connection"] == "close"
    r = org.req("POST", "/widgets", content=body, headers=headers)
    assert_error(r, 413, "PayloadTooLarge")
    assert widget_total(org) == 0
    # Just under the limit is read (and then validated): not a 413.
    body = json.dumps({"name": "n" * (JSON_BODY_LIMIT - 100)}).encode()
    r = org.req("POST", "/widgets", content=body, headers=headers)
    assert_error(r, 400, "BadRequest")
    assert "name" in r.json()["errors"]


def test_ten_mib_of_components_is_refused_and_nothing_is_stored(database, org):
    w = org.widget()
    body = json.dumps({"components": {"c": "x" * (10 * 1024 * 1024)}}).encode()
    r = org.req(
        "PATCH", f"/widgets/{w['id']}", content=body, headers={"content-type": "application/json"}
    )
    assert_error(r, 413, "PayloadTooLarge")
    assert org.req("GET", f"/widgets/{w['id']}").json()["components"] == {}


def test_chunked_body_is_counted_and_refused_past_the_limit(database, org):
    def chunks():
        yield b'{"name": "w", "components": {"blob": "'
        for _ in range(JSON_BODY_LIMIT // 4096 + 2):
            yield b"x" * 4096
        yield b'"}}'

    r = org.req("POST", "/widgets", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # really sent chunked
    assert_error(r, 413, "PayloadTooLarge")
    assert widget_total(org) == 0

    def small():
        yield b'{"name": '
        yield b'"chunked"}'

    r = org.req("POST", "/widgets", content=small(), headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"unknown_field": 1, "name": null}',
        b"[" * 100_000,
        b'{"name": "' + b"x" * (JSON_BODY_LIMIT - 100) + b'"}',
    ],
    ids=["malformed", "invalid", "deep", "large"],
)
def test_no_token_is_401_whatever_the_body(database, org, body):
    w = org.widget()
    for method, path, _ in body_routes(w["id"]):
        r = org.http.request(
            method,
            path,
            params={"organization_id": org.id},
            content=body,
            headers={"content-type": "application/json"},
        )
        assert_error(r, 401, "NotAuthenticated")
        assert r.headers["www-authenticate"].lower().startswith("bearer")
        # A token of another organization: 403, whatever the body, before it is read too.
    assert widget_total(org) == 1


def test_forbidden_and_unauthenticated_before_the_body_on_every_body_route(database, make_org):
    a, b = make_org(), make_org()
    w = b.widget()
    for method, path, kwargs in body_routes(w["id"]):
        r = b.http.request(method, path, params={"organization_id": b.id}, **kwargs)
        assert_error(r, 401, "NotAuthenticated")
        r = a.req(method, path, org_id=b.id, **kwargs)
        assert_error(r, 403, "Forbidden")
        garbage = a.req(method, path, org_id=b.id, content=b"{nope")
        assert_error(garbage, 403, "Forbidden")
    assert widget_total(b) == 1


def test_admin_routes_authenticate_before_the_body(database, org):
    r = org.http.post("/organizations", content=b"{broken", headers={"content-type": "x"})
    assert_error(r, 401, "NotAuthenticated")
    r = org.http.post(
        "/organizations",
        content=b"{broken",
        headers={"content-type": "application/json", "Authorization": f"Bearer {org.token}"},
    )
    assert_error(r, 403, "Forbidden")
    r = org.http.post("/organizations", content=b"{broken", headers=ADMIN)
    assert_error(r, 400, "BadRequest")


def test_upload_limits(database, org):
    w = org.widget()
    path = f"/widgets/{w['id']}/assets"
    # The asset limit itself: one byte more is 413 (the multipart framing fits the body limit).
    too_big = PNG + b"\0" * (MAX_ASSET_BYTES + 1 - len(PNG))
    r = org.req("POST", path, files={"file": ("a.png", too_big, "image/png")})
    assert_error(r, 413, "PayloadTooLarge")
    # A body above the upload limit is refused from its Content-Length, token or not.
    huge = PNG + b"\0" * UPLOAD_BODY_LIMIT
    r = org.req("POST", path, files={"file": ("a.png", huge, "image/png")})
    assert_error(r, 413, "PayloadTooLarge")
    r = org.http.post(
        path, params={"organization_id": org.id}, files={"file": ("a.png", huge, "image/png")}
    )
    assert_error(r, 413, "PayloadTooLarge")
    # Exactly the limit is accepted.
    exact = PNG + b"\0" * (MAX_ASSET_BYTES - len(PNG))
    r = org.req("POST", path, files={"file": ("a.png", exact, "image/png")})
    assert r.status_code == 201, r.text
    assert r.json()["size"] == MAX_ASSET_BYTES


def test_one_file_per_upload(database, org):
    w = org.widget()
    path = f"/widgets/{w['id']}/assets"
    files = [("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]
    assert_error(org.req("POST", path, files=files), 400, "BadRequest")
    files = [("file", ("a.png", PNG, "image/png")), ("other", ("b.png", PNG, "image/png"))]
    assert_error(org.req("POST", path, files=files), 400, "BadRequest")
    r = org.req("POST", path, files={"file": ("a.png", PNG, "image/png")}, data={"x": "1"})
    assert_error(r, 400, "BadRequest")
    assert org.req("GET", path).json() == []


def test_edge_route_table_matches_the_routes(api):
    """The edge's path tables agree with each operation's own security and body kind."""
    spec = api.get("/openapi.json").json()
    assert spec["paths"], spec
    for path, item in spec["paths"].items():
        concrete = path.replace("{", "").replace("}", "")
        for method, op in item.items():
            schemes = {name for req in op.get("security", []) for name in req}
            policy = route_policy(method.upper(), concrete)
            expected = (
                "organization"
                if "OrganizationToken" in schemes
                else "admin"
                if "AdminToken" in schemes
                else "public"
            )
            assert policy.kind == expected, (method, path)
            content = op.get("requestBody", {}).get("content", {})
            upload = "multipart/form-data" in content
            assert (policy.body_limit == UPLOAD_BODY_LIMIT) == upload, (method, path)


# --- a real server -------------------------------------------------------------------------


@pytest.fixture
def server(sqlite_database, org):
    app = create_app(body_read_timeout=1.0)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/test-only/boom", boom)
    with live_server(app) as address:
        yield address


def auth_headers(org) -> dict[str, str]:
    return {"Authorization": f"Bearer {org.token}"}


def test_refused_requests_get_no_100_continue(server, org):
    target = f"/widgets?organization_id={org.id}"
    # 1 GB announced, no token: 413 at once, no 100 Continue, connection closed.
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(
            request_head(
                "POST",
                target,
                {
                    "Content-Type": "application/json",
                    "Content-Length": "1000000000",
                    "Expect": "100-continue",
                },
            )
        )
        interim, r = read_response(sock)
        assert time.monotonic() - started < 5
        assert interim == [] and r.status == 413 and r.closed
        assert json.loads(r.body)["name"] == "PayloadTooLarge"
    # Within the limit but no token: 401, no 100 Continue.
    with connect(server) as sock:
        sock.sendall(
            request_head(
                "POST",
                target,
                {
                    "Content-Type": "application/json",
                    "Content-Length": "50",
                    "Expect": "100-continue",
                },
            )
        )
        interim, r = read_response(sock)
        assert interim == [] and r.status == 401 and r.closed
    # Control: a request that will be served gets its 100 Continue, then is served.
    body = json.dumps({"name": "continued"}).encode()
    with connect(server) as sock:
        sock.sendall(
            request_head(
                "POST",
                target,
                {
                    "Content-Type": "application/json",
                    "Content-Length": str(len(body)),
                    "Expect": "100-continue",
                    **auth_headers(org),
                },
            )
        )
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        _, r = read_response(sock)
        assert r.status == 201, r.body


def test_a_huge_content_length_is_answered_at_once_even_with_a_token(server, org):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(
            request_head(
                "POST",
                f"/widgets?organization_id={org.id}",
                {
                    "Content-Type": "application/json",
                    "Content-Length": "1000000000",
                    **auth_headers(org),
                },
            )
            + b'{"name": "w"'
        )
        _, r = read_response(sock)
        assert r.status == 413 and r.closed
        assert time.monotonic() - started < 5


def test_a_stalled_body_is_a_408_and_the_connection_is_closed(server, org):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(
            request_head(
                "POST",
                f"/widgets?organization_id={org.id}",
                {"Content-Type": "application/json", "Content-Length": "100", **auth_headers(org)},
            )
            + b'{"name": "w'
        )
        _, r = read_response(sock)
        elapsed = time.monotonic() - started
        assert r.status == 408 and r.closed, r.body
        assert json.loads(r.body)["code"] == 408
        assert 0.9 < elapsed < 10


def test_a_chunked_body_past_the_limit_on_a_real_server(server, org):
    with connect(server) as sock:
        sock.sendall(
            request_head(
                "POST",
                f"/widgets?organization_id={org.id}",
                {
                    "Content-Type": "application/json",
                    "Transfer-Encoding": "chunked",
                    **auth_headers(org),
                },
            )
        )
        chunk = b"x" * 65536
        try:
            for _ in range(JSON_BODY_LIMIT // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may have answered and closed already
        _, r = read_response(sock)
        assert r.status == 413 and r.closed


def test_the_connection_stays_usable_after_errors(server, org):
    """400, 401, 404, 405 and an unexpected 500 each leave the keep-alive connection open."""
    q = f"organization_id={org.id}"
    bad_json = b"{nope"
    steps = [
        ("POST", f"/widgets?{q}", bad_json, auth_headers(org), 400),
        ("GET", f"/widgets/{uuid.uuid4()}?{q}", b"", auth_headers(org), 404),
        ("PUT", f"/widgets?{q}", b"", auth_headers(org), 405),
        ("GET", f"/widgets?{q}", b"", {}, 401),
        ("GET", f"/test-only/boom?{q}", b"", auth_headers(org), 500),
        ("GET", f"/widgets?{q}", b"", auth_headers(org), 200),
    ]
    with connect(server) as sock:
        for method, target, body, headers, status in steps:
            head = request_head(
                method,
                target,
                {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers},
            )
            sock.sendall(head + body)
            _, r = read_response(sock)
            assert r.status == status, (method, target, r.status, r.body)
            assert r.headers.get("connection") != "close", (method, target)
            assert not r.closed, (method, target)
            if status >= 400:
                assert json.loads(r.body)["code"] == status
            if status == 405:
                assert r.headers["allow"]


def test_an_admin_token_is_no_organization_token(database, org):
    key = jwt.decode(org.token, options={"verify_signature": False})
    assert key["org"] == org.id
    r = org.http.get("/widgets", params={"organization_id": org.id}, headers=ADMIN)
    assert_error(r, 401, "NotAuthenticated")
