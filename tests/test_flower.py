"""``celery -A worker flower`` with the project's settings: a real worker and Flower on loopback
(as subprocesses, on their own Redis database), basic auth required outside development."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.conftest import BUCKET, PROJECT_ROOT, migrate, reset_process_state
from tests.support.api import OrgClient, make_org_client
from worker import constants as c
from worker.celery import app
from worker.ids import new_id
from worker.processes import BIN_DIR, ManagedProcess, free_port, port_open, wait_until

AUTH = ("ops", "secret")


def _broker_db(url: str, db: int) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{db}"


@pytest.fixture
def prod_env(services: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """Production settings, a fresh migrated SQLite file and a Redis database of its own, so the
    session's in-process worker never sees these messages (and Flower sees no other worker)."""
    db_url = f"sqlite:///{tmp_path / 'flower.db'}"
    migrate(db_url)
    return {
        **os.environ,
        "APP_ENV": "production",
        "SECRET_KEY": "flower-test-secret-key-" + uuid.uuid4().hex,
        "ADMIN_TOKEN": os.environ["ADMIN_TOKEN"],
        "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}",
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": _broker_db(services["broker"], 7),
    }


def _make_org_and_widget(database_url: str) -> tuple[OrgClient, dict[str, Any]]:
    """Through the API, in this process, on the subprocesses' database."""
    from api_stub.app import app as api_app

    saved = os.environ["DATABASE_URL"]
    os.environ["DATABASE_URL"] = database_url
    reset_process_state()
    try:
        with TestClient(api_app) as http:
            org = make_org_client(http)
            return org, org.widget()
    finally:
        os.environ["DATABASE_URL"] = saved
        reset_process_state()


def test_flower_shows_tasks_and_workers_behind_basic_auth(prod_env, tmp_path, s3):
    worker_name = f"flower-test-{uuid.uuid4().hex[:6]}@localhost"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    celery = str(BIN_DIR / "celery")
    procs: list[ManagedProcess] = []
    try:
        procs.append(
            ManagedProcess(
                "worker",
                [celery, "-A", "worker", "worker", "-n", worker_name, "--concurrency", "1"],
                prod_env,
                tmp_path,
                PROJECT_ROOT,
            )
        )
        flower = ManagedProcess(
            "flower",
            [celery, "-A", "worker", "flower", "--address=127.0.0.1", f"--port={port}"],
            prod_env,
            tmp_path,
            PROJECT_ROOT,
        )
        procs.append(flower)

        def listed() -> bool:
            assert all(p.alive() for p in procs), [p.log_tail() for p in procs]
            if not port_open(port):
                return False
            r = httpx.get(f"{base}/api/workers", params={"refresh": 1}, auth=AUTH, timeout=10)
            return r.status_code == 200 and worker_name in r.json()

        wait_until(listed, 90, "Flower to list the worker")

        org, widget = _make_org_and_widget(prod_env["DATABASE_URL"])
        kwargs = {"organization_id": org.id, "widget_id": widget["id"], "deployment_id": new_id()}
        with app.connection_for_write(prod_env["CELERY_BROKER_URL"]) as conn:
            result = app.send_task(
                c.DEPLOY_TASK, kwargs=kwargs, queue=c.DEPLOY_QUEUE, connection=conn
            )

        info: dict[str, Any] = {}

        def succeeded() -> bool:
            assert all(p.alive() for p in procs), [p.log_tail() for p in procs]
            r = httpx.get(f"{base}/api/task/info/{result.id}", auth=AUTH, timeout=10)
            if r.status_code != 200:
                return False
            info.update(r.json())
            return info.get("state") in ("SUCCESS", "FAILURE")

        wait_until(succeeded, 90, f"Flower to report task {result.id}")
        assert info["state"] == "SUCCESS", info
        assert info["name"] == c.DEPLOY_TASK
        assert info["worker"] == worker_name
        s3.head_object(Bucket=BUCKET, Key=org.container_key(widget["id"]))

        workers = httpx.get(f"{base}/api/workers", auth=AUTH, timeout=10)
        assert workers.status_code == 200 and worker_name in workers.json()
        for path in (f"/api/task/info/{result.id}", "/api/workers", "/"):
            assert httpx.get(base + path, timeout=10).status_code == 401, path
            wrong = httpx.get(base + path, auth=("ops", "wrong"), timeout=10)
            assert wrong.status_code == 401, path
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_production_flower_without_basic_auth_refuses_to_start(prod_env):
    env = {k: v for k, v in prod_env.items() if k != "FLOWER_BASIC_AUTH"}
    port = free_port()
    out = subprocess.run(
        [
            str(BIN_DIR / "celery"),
            "-A",
            "worker",
            "flower",
            "--address=127.0.0.1",
            f"--port={port}",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "FLOWER_BASIC_AUTH" in lines[0]
