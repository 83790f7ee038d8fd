"""End to end: ``uvicorn api_stub.app:app`` and ``celery -A worker worker --concurrency 2``
(prefork) as real subprocesses on the session's Redis and moto, driven over HTTP."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import BUCKET, PROJECT_ROOT, migrate
from tests.support.api import make_org_client
from worker.processes import BIN_DIR, ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.e2e


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _logs(*procs: ManagedProcess) -> str:
    return "\n".join(f"--- {p.name} (alive={p.alive()}) ---\n{p.log_tail()}" for p in procs)


def test_api_and_prefork_worker_publish_widgets(services, tmp_path, s3):
    db_url = f"sqlite:///{tmp_path / 'e2e.db'}"
    migrate(db_url)
    # A Redis database of its own: the in-process test worker (same Redis, db 0) must not take
    # these jobs, which name rows that only exist in this test's database.
    broker = services["broker"].rsplit("/", 1)[0] + "/9"
    env = {**os.environ, "DATABASE_URL": db_url, "CELERY_BROKER_URL": broker}
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    procs: list[ManagedProcess] = []
    try:
        api_cmd = [str(BIN_DIR / "uvicorn"), "api_stub.app:app"]
        api_cmd += ["--host", "127.0.0.1", "--port", str(port)]
        procs.append(ManagedProcess("api", api_cmd, env, tmp_path, PROJECT_ROOT))
        worker_cmd = [str(BIN_DIR / "celery"), "-A", "worker", "worker", "--concurrency", "2"]
        worker_cmd += ["--loglevel", "INFO", "-n", f"e2e-{uuid.uuid4().hex[:8]}@%h"]
        procs.append(ManagedProcess("worker", worker_cmd, env, tmp_path, PROJECT_ROOT))
        api_proc, worker_proc = procs
        wait_until(lambda: _healthy(base_url), 60, "the API's /health")

        with httpx.Client(base_url=base_url, timeout=30) as http:
            org = make_org_client(http)
            pur, pref = org.purpose(), org.preference()
            widgets = [org.widget([pur], [pref], name=f"e2e-{i}") for i in range(3)]
            deps = [org.deploy(w["id"]) for w in widgets]
            done = [org.wait_deployment(d["id"], timeout=90) for d in deps]
            assert [d["status"] for d in done] == ["success"] * 3, (done, _logs(*procs))

            for w, dep in zip(widgets, done, strict=True):
                obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(w["id"]))
                assert obj["ContentType"] == "application/json"
                body: dict[str, Any] = json.loads(obj["Body"].read())
                assert body == dep["config"]
                assert body["deployment_id"] == dep["deployment_id"]
                assert body["purposes"][0]["metadata"] == pur["metadata"]
                assert (
                    body["preferences"][0]["values"][0]["metadata"]
                    == (pref["values"][0]["metadata"])
                )
                got = org.req("GET", f"/widgets/{w['id']}").json()
                assert got["publication_status"] == "published"

            # Edit and redeploy: the new version replaces the file, the widget is published again.
            target = widgets[0]
            r = org.req("PATCH", f"/widgets/{target['id']}", json={"name": "e2e-edited"})
            assert r.status_code == 200, r.text
            assert r.json()["publication_status"] == "unpublished_changes"
            again = org.wait_deployment(org.deploy(target["id"])["id"], timeout=90)
            assert again["status"] == "success", (again, _logs(*procs))
            obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(target["id"]))
            body = json.loads(obj["Body"].read())
            assert body["deployment_id"] == again["deployment_id"]
            assert body["widget"]["name"] == "e2e-edited"
            got = org.req("GET", f"/widgets/{target['id']}").json()
            assert got["publication_status"] == "published"

            listed = org.req("GET", "/widgets/deployments").json()
            assert {d["id"] for d in listed} == {d["id"] for d in [*done, again]}

        assert api_proc.alive() and worker_proc.alive(), _logs(*procs)
        assert "Event loop is closed" not in worker_proc.log_tail(100_000)
    finally:
        for proc in reversed(procs):
            proc.stop()
    assert not any(p.alive() for p in procs)
