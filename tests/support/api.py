"""HTTP helpers: an organization with its access token, and a client bound to it."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

import httpx
from fastapi.testclient import TestClient

# Strong and fresh per test session: it is also what the APP_ENV=production processes started by
# tests (Flower) get, and production refuses a weak ADMIN_TOKEN.
ADMIN_TOKEN = secrets.token_urlsafe(32)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class OrgClient:
    """Sends requests as one organization (token + ``?organization_id=``)."""

    def __init__(self, http: TestClient | httpx.Client, org: dict[str, Any], token: str) -> None:
        self.http, self.org, self.token = http, org, token
        self.id: str = org["id"]
        self.api_key: str = org["api_key"]

    def req(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        org_id: str | None = None,
        **kw: Any,
    ) -> httpx.Response:
        params = {"organization_id": org_id or self.id, **(params or {})}
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return self.http.request(method, path, params=params, headers=headers, **kw)

    def purpose(self, **body: Any) -> dict[str, Any]:
        payload = {"description": {"en": "Analytics"}, "metadata": {"marker": uuid.uuid4().hex}}
        r = self.req("POST", "/metadata/purposes", json={**payload, **body})
        assert r.status_code == 201, r.text
        return r.json()

    def preference(self, **body: Any) -> dict[str, Any]:
        payload = {
            "name": {"en": "Newsletter"},
            "type": "multi",
            "metadata": {"marker": uuid.uuid4().hex},
            "values": [{"name": {"en": "Weekly"}, "metadata": {"marker": uuid.uuid4().hex}}],
        }
        r = self.req("POST", "/preferences", json={**payload, **body})
        assert r.status_code == 201, r.text
        return r.json()

    def widget(
        self,
        purposes: list[dict[str, Any]] = (),
        preferences: list[dict[str, Any]] = (),
        **body: Any,
    ) -> dict[str, Any]:  # type: ignore[assignment]
        payload = {
            "name": f"widget-{uuid.uuid4().hex[:6]}",
            "format": "embeddable",
            "template_id": "sections",
            "selected_purposes_ids": [p["id"] for p in purposes],
            "selected_preferences_ids": [p["id"] for p in preferences],
        }
        r = self.req("POST", "/widgets", json={**payload, **body})
        assert r.status_code == 201, r.text
        return r.json()

    def deploy(self, widget_id: str, **body: Any) -> dict[str, Any]:
        r = self.req("POST", "/widgets/deployments", json={"widget_id": widget_id, **body})
        assert r.status_code == 202, r.text
        return r.json()

    def wait_deployment(self, dep_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            dep = self.req("GET", f"/widgets/deployments/{dep_id}").json()
            if dep["status"] in ("success", "failure") or time.monotonic() > deadline:
                return dep
            time.sleep(0.1)

    def container_key(self, widget_id: str) -> str:
        return f"configs/{self.api_key}/containers/{widget_id}.json"


def make_org_client(http: TestClient | httpx.Client, name: str | None = None) -> OrgClient:
    r = http.post(
        "/organizations", json={"name": name or f"org-{uuid.uuid4().hex[:6]}"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    org = r.json()
    cred = http.post(f"/organizations/{org['id']}/api-keys", headers=ADMIN)
    assert cred.status_code == 201, cred.text
    body = {"type": "api-key", "key": cred.json()["key"], "secret": cred.json()["secret"]}
    token = http.post("/sessions", json=body)
    assert token.status_code == 201, token.text
    return OrgClient(http, org, token.json()["access_token"])
