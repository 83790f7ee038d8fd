"""Authentication (sessions, bearer tokens, admin token) and tenant isolation, on both databases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from sqlmodel import select

from tests.support.api import ADMIN, ADMIN_TOKEN
from worker.db import unit_of_work
from worker.models import ApiKey
from worker.settings import DEV_ADMIN_TOKEN, get_settings

ORG_ROUTES = [
    ("GET", "/widgets", None),
    ("POST", "/widgets", {"name": "w"}),
    ("GET", "/metadata/purposes", None),
    ("POST", "/metadata/purposes", {"description": {"en": "x"}}),
    ("GET", "/preferences", None),
    ("POST", "/preferences", {"name": {"en": "x"}}),
    ("GET", "/widgets/deployments", None),
    ("POST", "/widgets/deployments", {"widget_id": "w-1"}),
]


def assert_error(r, code: int, name: str, class_name: str) -> dict:
    assert r.status_code == code, r.text
    body = r.json()
    assert set(body) == {"code", "name", "className", "message", "errors"}, body
    assert (body["code"], body["name"], body["className"]) == (code, name, class_name)
    return body


def not_authenticated(r) -> None:
    assert_error(r, 401, "NotAuthenticated", "not-authenticated")
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")


def signed(claims: dict, key: str | None = None) -> str:
    return jwt.encode(claims, key or get_settings().signing_key, algorithm="HS256")


def counts(org) -> list[int]:
    lists = [
        org.req("GET", p).json()["total"]
        for p in ("/widgets", "/metadata/purposes", "/preferences")
    ]
    return [*lists, len(org.req("GET", "/widgets/deployments").json())]


@pytest.mark.parametrize(("method", "path", "body"), ORG_ROUTES)
def test_no_token_is_401_and_changes_nothing(database, org, method, path, body):
    r = org.http.request(method, path, params={"organization_id": org.id}, json=body)
    not_authenticated(r)
    assert counts(org) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
    ],
)
def test_missing_malformed_or_garbage_token_is_401(database, org, authorization):
    r = org.http.get(
        "/widgets", params={"organization_id": org.id}, headers={"Authorization": authorization}
    )
    not_authenticated(r)


def test_forged_expired_or_incomplete_tokens_are_401(database, org):
    now = datetime.now(UTC)
    key_id = jwt.decode(org.token, options={"verify_signature": False})["sub"]  # a real key
    good_claims = {"sub": key_id, "org": org.id, "iat": now, "exp": now + timedelta(minutes=5)}
    # Control: a correctly signed, current token for this organization is accepted.
    assert (
        org.req(
            "GET", "/widgets", headers={"Authorization": f"Bearer {signed(good_claims)}"}
        ).status_code
        == 200
    )
    for token in (
        signed(good_claims, key="some-other-signing-key-of-enough-length"),
        signed({**good_claims, "iat": now - timedelta(hours=2), "exp": now - timedelta(hours=1)}),
        signed({"sub": "k", "org": org.id}),  # no expiry
        signed({"sub": "k", "exp": now + timedelta(minutes=5)}),  # no organization
        jwt.encode(good_claims, None, algorithm="none"),  # unsigned
    ):
        not_authenticated(org.req("GET", "/widgets", headers={"Authorization": f"Bearer {token}"}))


def test_token_of_one_organization_for_another_is_403(database, make_org):
    a, b = make_org(), make_org()
    b.widget()
    b.purpose()
    for method, path, body in ORG_ROUTES:
        r = a.req(method, path, org_id=b.id, json=body)
        err = assert_error(r, 403, "Forbidden", "forbidden")
        assert "data" not in err
    assert counts(b) == [1, 1, 0, 0]
    assert counts(a) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/organizations"),
        ("POST", "/organizations"),
        ("POST", "/organizations/{id}/api-keys"),
    ],
)
def test_admin_routes_need_the_admin_token(database, org, method, path):
    path = path.format(id=org.id)
    body = {"name": "intruder"} if path == "/organizations" else None
    for headers in (
        {},
        {"Authorization": "Bearer wrong-admin-token"},
        {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
    ):
        not_authenticated(org.http.request(method, path, json=body, headers=headers))
    # An organization's own access token is no admin token either.
    r = org.http.request(method, path, json=body, headers={"Authorization": f"Bearer {org.token}"})
    assert r.status_code in (401, 403), r.text
    names = [
        o["name"]
        for o in org.http.get("/organizations", params={"$limit": 1000}, headers=ADMIN).json()[
            "data"
        ]
    ]
    assert "intruder" not in names
    # Control: the admin token itself works.
    assert org.http.get("/organizations", headers=ADMIN).status_code == 200


def test_sessions_exchange_key_and_secret_for_a_token(database, api):
    org = api.post("/organizations", json={"name": "acme"}, headers=ADMIN).json()
    cred = api.post(f"/organizations/{org['id']}/api-keys", headers=ADMIN).json()
    assert cred["organization_id"] == org["id"] and cred["secret"]
    with unit_of_work() as session:
        stored = session.exec(select(ApiKey).where(ApiKey.id == cred["key"])).one()
        assert cred["secret"] not in stored.secret_hash  # only a hash is kept

    good = {"type": "api-key", "key": cred["key"], "secret": cred["secret"]}
    r = api.post("/sessions", json=good)
    assert r.status_code == 201, r.text
    token = r.json()["access_token"]
    ok = api.get(
        "/widgets",
        params={"organization_id": org["id"]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert ok.status_code == 200, ok.text

    for bad in (
        {**good, "secret": cred["secret"] + "x"},
        {**good, "secret": "wrong"},
        {**good, "key": str(uuid.uuid4())},
        {**good, "key": "../" + cred["key"]},
    ):
        not_authenticated(api.post("/sessions", json=bad))
    r = api.post("/sessions", json={**good, "type": "password"})
    assert_error(r, 400, "BadRequest", "bad-request")
    assert "type" in r.json()["errors"]


def test_other_organization_cannot_read_or_change_rows_by_id(database, make_org):
    a, b = make_org(), make_org()
    pur, pref = a.purpose(), a.preference()
    w = a.widget([pur], [pref])
    dep = a.deploy(w["id"])
    for path in (
        f"/widgets/{w['id']}",
        f"/widgets/deployments/{dep['id']}",
        f"/metadata/purposes/{pur['id']}",
        f"/preferences/{pref['id']}",
    ):
        err = assert_error(b.req("GET", path), 404, "NotFound", "not-found")
        assert a.id not in err["message"]
    assert_error(
        b.req("PATCH", f"/widgets/{w['id']}", json={"name": "x"}), 404, "NotFound", "not-found"
    )
    assert_error(
        b.req("PATCH", f"/metadata/purposes/{pur['id']}", json={"metadata": {"x": 1}}),
        404,
        "NotFound",
        "not-found",
    )
    assert_error(
        b.req("PATCH", f"/preferences/{pref['id']}", json={"type": "single"}),
        404,
        "NotFound",
        "not-found",
    )
    assert_error(b.req("DELETE", f"/metadata/purposes/{pur['id']}"), 404, "NotFound", "not-found")
    assert_error(b.req("DELETE", f"/preferences/{pref['id']}"), 404, "NotFound", "not-found")
    # Unchanged (a worker started by another test may have published it meanwhile: not an edit).
    after = a.req("GET", f"/widgets/{w['id']}").json()
    assert (after["name"], after["version"], after["updated_at"]) == (
        w["name"],
        w["version"],
        w["updated_at"],
    )
    assert a.req("GET", f"/metadata/purposes/{pur['id']}").json() == pur
    assert a.req("GET", f"/preferences/{pref['id']}").json() == pref


def test_lists_never_contain_other_organizations_rows(database, make_org):
    a, b = make_org(), make_org()
    wa = a.widget([a.purpose()], [a.preference()])
    a.deploy(wa["id"])
    wb = b.widget([b.purpose()], [b.preference()])
    db = b.deploy(wb["id"])
    for org, own in ((a, a.id), (b, b.id)):
        for path in ("/widgets", "/metadata/purposes", "/preferences"):
            body = org.req("GET", path).json()
            assert body["total"] == 1 and len(body["data"]) == 1, (path, body)
            assert {row["organization_id"] for row in body["data"]} == {own}
        deps = org.req("GET", "/widgets/deployments").json()
        assert len(deps) == 1 and deps[0]["organization_id"] == own
    leaked = b.req("GET", "/widgets/deployments", params={"widget_id": wa["id"]})
    assert leaked.status_code == 200 and leaked.json() == []
    assert [
        d["id"] for d in b.req("GET", "/widgets/deployments", params={"widget_id": wb["id"]}).json()
    ] == [db["id"]]
