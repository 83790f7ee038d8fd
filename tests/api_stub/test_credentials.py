"""API keys can be revoked (admin) and their tokens stop working at once; a token naming a key
that does not exist is refused; a 405 says which methods are allowed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt
import pytest

from tests.support.api import ADMIN
from worker.settings import get_settings


def new_key_token(org) -> tuple[str, str, str]:
    cred = org.http.post(f"/organizations/{org.id}/api-keys", headers=ADMIN)
    assert cred.status_code == 201, cred.text
    key, secret = cred.json()["key"], cred.json()["secret"]
    r = org.http.post("/sessions", json={"type": "api-key", "key": key, "secret": secret})
    assert r.status_code == 201, r.text
    return key, secret, r.json()["access_token"]


def as_token(org, token: str, method: str = "GET", path: str = "/widgets", **kw):
    return org.http.request(
        method,
        path,
        params={"organization_id": org.id},
        headers={"Authorization": f"Bearer {token}"},
        **kw,
    )


def test_a_revoked_key_and_its_tokens_stop_working_at_once(database, org):
    key, secret, token = new_key_token(org)
    assert as_token(org, token).status_code == 200
    r = org.http.delete(f"/organizations/{org.id}/api-keys/{key}", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["key"] == key and r.json()["organization_id"] == org.id
    assert "secret" not in r.json()
    for method, kw in (("GET", {}), ("POST", {"content": b"{not json"})):
        denied = as_token(org, token, method, **kw)
        assert denied.status_code == 401, denied.text
        assert denied.json()["name"] == "NotAuthenticated"
    r = org.http.post("/sessions", json={"type": "api-key", "key": key, "secret": secret})
    assert r.status_code == 401
    # The organization's other key is untouched.
    assert org.req("GET", "/widgets").status_code == 200
    # Revoking again: it is gone.
    r = org.http.delete(f"/organizations/{org.id}/api-keys/{key}", headers=ADMIN)
    assert r.status_code == 404 and r.json()["name"] == "NotFound"


def test_revocation_is_admin_only_and_scoped_to_the_organization(database, make_org):
    a, b = make_org(), make_org()
    key, _, token = new_key_token(a)
    path = f"/organizations/{a.id}/api-keys/{key}"
    assert a.http.delete(path).status_code == 401
    assert a.http.delete(path, headers={"Authorization": f"Bearer {token}"}).status_code == 403
    # Through another organization's path, the key does not exist.
    r = a.http.delete(f"/organizations/{b.id}/api-keys/{key}", headers=ADMIN)
    assert r.status_code == 404
    assert a.http.delete(f"/organizations/{a.id}/api-keys/nope", headers=ADMIN).status_code == 404
    assert a.http.delete(f"/organizations/{a.id}/api-keys/a..b", headers=ADMIN).status_code == 400
    assert as_token(a, token).status_code == 200


@pytest.mark.parametrize("sub", ["no-such-key", "k"])
def test_a_token_naming_an_unknown_key_is_refused(database, org, sub):
    now = datetime.now(UTC)
    claims = {"sub": sub, "org": org.id, "iat": now, "exp": now + timedelta(minutes=5)}
    token = jwt.encode(claims, get_settings().signing_key, algorithm="HS256")
    r = as_token(org, token)
    assert r.status_code == 401, r.text


def test_a_token_naming_another_organizations_key_is_refused(database, make_org):
    a, b = make_org(), make_org()
    b_key = jwt.decode(b.token, options={"verify_signature": False})["sub"]
    now = datetime.now(UTC)
    claims = {"sub": b_key, "org": a.id, "iat": now, "exp": now + timedelta(minutes=5)}
    token = jwt.encode(claims, get_settings().signing_key, algorithm="HS256")
    assert as_token(a, token).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/widgets", {"GET", "POST"}),
        ("DELETE", "/metadata/purposes", {"GET", "POST"}),
        ("PUT", "/organizations", {"GET", "POST"}),
        ("POST", "/health", {"GET"}),
    ],
)
def test_405_names_the_allowed_methods(database, org, method, path, allowed):
    r = org.req(method, path, headers=ADMIN if path == "/organizations" else {})
    assert r.status_code == 405, r.text
    assert r.json()["name"] == "MethodNotAllowed"
    assert {m.strip() for m in r.headers["allow"].split(",")} >= allowed
