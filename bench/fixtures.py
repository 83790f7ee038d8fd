"""Organizations, realistic widgets, deploy messages and database polling for the sections."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import text

from bench.stack import ADMIN_TOKEN

LANGS = ("en", "fr", "de")
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TOKEN_REFRESH_SECONDS = 40 * 60  # access tokens live one hour; a full run takes longer


def _text(words: str) -> dict[str, str]:
    return {lang: f"[{lang}] {words}" for lang in LANGS}


@dataclass
class Org:
    id: str
    api_key: str
    key: str
    secret: str
    token: str = ""
    token_at: float | None = None
    purposes: list[str] = field(default_factory=list)
    preferences: list[str] = field(default_factory=list)

    def container_key(self, widget_id: str) -> str:
        return f"configs/{self.api_key}/containers/{widget_id}.json"


class Api:
    """The API as a client sees it (admin token, API keys, sessions, bearer tokens)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=60)

    def close(self) -> None:
        self.http.close()

    def _ok(self, resp: httpx.Response, status: int) -> Any:
        if resp.status_code != status:
            raise RuntimeError(f"{resp.request.method} {resp.request.url}: {resp.text[:500]}")
        return resp.json()

    def new_org(self, name: str, catalog: bool = True) -> Org:
        org = self._ok(self.http.post("/organizations", json={"name": name}, headers=ADMIN), 201)
        cred = self._ok(self.http.post(f"/organizations/{org['id']}/api-keys", headers=ADMIN), 201)
        out = Org(org["id"], org["api_key"], cred["key"], cred["secret"])
        if catalog:
            self._catalog(out)
        return out

    def headers(self, org: Org) -> dict[str, str]:
        if org.token_at is None or time.monotonic() - org.token_at > TOKEN_REFRESH_SECONDS:
            body = {"type": "api-key", "key": org.key, "secret": org.secret}
            org.token = self._ok(self.http.post("/sessions", json=body), 201)["access_token"]
            org.token_at = time.monotonic()
        return {"Authorization": f"Bearer {org.token}"}

    def _catalog(self, org: Org) -> None:
        """A few purposes and preferences with values, all with metadata, as a real tenant has."""
        params, headers = {"organization_id": org.id}, self.headers(org)
        body: dict[str, Any]
        for name in ("Analytics", "Personalised advertising", "Product improvement"):
            body = {
                "description": _text(f"We use your data for {name.lower()}."),
                "metadata": {"category": name.lower().replace(" ", "_"), "legal_basis": "consent"},
            }
            resp = self.http.post("/metadata/purposes", json=body, params=params, headers=headers)
            org.purposes.append(self._ok(resp, 201)["id"])
        for name, values in (
            ("Newsletter", ("Weekly", "Monthly", "Product news")),
            ("Channels", ("Email", "SMS", "Post")),
        ):
            body = {
                "name": _text(name),
                "description": _text(f"Choose your {name.lower()} preferences."),
                "type": "multi",
                "metadata": {"group": name.lower()},
                "values": [
                    {"name": _text(v), "metadata": {"code": v.lower().replace(" ", "_")}}
                    for v in values
                ],
            }
            resp = self.http.post("/preferences", json=body, params=params, headers=headers)
            org.preferences.append(self._ok(resp, 201)["id"])

    def widget_body(self, org: Org, name: str) -> dict[str, Any]:
        sections = [
            {
                "type": kind,
                "title": _text(f"{kind.title()} title"),
                "text": _text(f"Explanation shown in the {kind} section of the widget."),
            }
            for kind in ("header", "purposes", "preferences", "footer")
        ]
        return {
            "name": name,
            "format": "embeddable",
            "template_id": "sections",
            "enabled_languages": list(LANGS),
            "default_language": "en",
            "domain": "www.example.com",
            "selected_purposes_ids": org.purposes,
            "selected_preferences_ids": org.preferences,
            "components": {
                "theme": {"color": "#1f6feb", "font": "Inter", "radius": 8, "shadow": True},
                "sections": sections,
                "save_button": {"label": _text("Save my choices"), "style": "primary"},
            },
        }

    def create_widgets(self, org: Org, count: int, concurrency: int = 16) -> list[str]:
        return asyncio.run(self._create_widgets(org, count, concurrency))

    async def _create_widgets(self, org: Org, count: int, concurrency: int) -> list[str]:
        headers, params = self.headers(org), {"organization_id": org.id}
        ids: list[str] = []
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60, limits=limits) as http:

            async def one(i: int) -> None:
                body = self.widget_body(org, f"bench widget {i} {uuid.uuid4().hex[:6]}")
                resp = await http.post("/widgets", json=body, params=params, headers=headers)
                ids.append(self._ok(resp, 201)["id"])

            await bounded(concurrency, [one(i) for i in range(count)])
        return ids


async def bounded(concurrency: int, coros: list[Any]) -> list[Any]:
    """Run the coroutines with at most ``concurrency`` of them at once."""
    sem = asyncio.Semaphore(concurrency)

    async def run(coro: Any) -> Any:
        async with sem:
            return await coro

    return list(await asyncio.gather(*(run(c) for c in coros)))


# --- Celery ---------------------------------------------------------------------------------


def send_deploy(org_id: str, widget_id: str, deployment_id: str | None = None) -> str:
    """The plain-producer path of docs/api.md (no HTTP)."""
    from worker.celery import app

    dep_id = deployment_id or str(uuid.uuid4())
    app.send_task(
        "widgets.deploy",
        queue="deployments",
        serializer="json",
        kwargs={"organization_id": org_id, "widget_id": widget_id, "deployment_id": dep_id},
    )
    return dep_id


def worker_concurrency() -> int:
    from worker.celery import app

    stats = app.control.inspect(timeout=5, limit=1).stats() or {}
    for reply in stats.values():
        return int(reply["pool"]["max-concurrency"])
    raise RuntimeError("the worker did not answer inspect().stats()")


def purge_queue(name: str) -> int:
    from worker.celery import app

    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_purge(name) or 0)


def queue_length(name: str) -> int:
    from worker.celery import app

    with app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(name))


# --- Database -------------------------------------------------------------------------------


def scalar(sql: str, **params: Any) -> Any:
    from worker.db import read_only_engine

    with read_only_engine().connect() as conn:
        return conn.execute(text(sql), params).scalar()


def execute(sql: str, **params: Any) -> None:
    from worker.db import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(sql), params)


def final_counts(org_id: str) -> tuple[int, int]:
    """(deployments of ``org_id`` that are final, of which failed)."""
    from worker.db import read_only_engine

    sql = text(
        "select count(*), coalesce(sum(case when status = 'failure' then 1 else 0 end), 0)"
        " from deployments where organization_id = :org and status in ('success', 'failure')"
    )
    with read_only_engine().connect() as conn:
        done, failed = conn.execute(sql, {"org": org_id}).one()
    return int(done), int(failed)


def wait_final(org_id: str, target: int, timeout: float, poll: float = 0.05) -> float:
    """Wait until ``target`` deployments of the organization are final; monotonic end time."""
    deadline = time.monotonic() + timeout
    while True:
        done, _ = final_counts(org_id)
        now = time.monotonic()
        if done >= target:
            return now
        if now > deadline:
            raise TimeoutError(f"{done}/{target} deployments final after {timeout:.0f}s")
        time.sleep(poll)
