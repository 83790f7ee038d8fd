"""Real services for the whole test session: Redis and moto's S3 server started on free loopback
ports (stopped by PID at the end), SQLite and a fresh PostgreSQL database, an in-process Celery
worker on the real broker, and HTTP clients bound to freshly created organizations.

PostgreSQL cases run whenever a server answers at ``TEST_POSTGRES_URL`` (default: the local
one); with ``REQUIRE_POSTGRES=1`` (CI) an unreachable server is an error instead of a skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.support.api import ADMIN_TOKEN, OrgClient, make_org_client
from tests.support.faulty_s3 import FaultyS3Proxy
from worker.processes import BIN_DIR, ManagedProcess, start_moto, start_redis

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "test-widgets"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def reset_process_state() -> None:
    """Forget cached settings, engine and S3 client so new environment variables take effect."""
    from worker.db import reset_engine
    from worker.s3 import close_store
    from worker.settings import get_settings

    close_store()
    reset_engine()
    get_settings.cache_clear()


def migrate(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    subprocess.run(
        [str(BIN_DIR / "alembic"), "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env=env,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis + moto (+ a fault-injecting proxy in front of moto), and the process environment."""
    logs = tmp_path_factory.mktemp("services")
    procs: list[ManagedProcess] = []
    saved = dict(os.environ)
    try:
        redis_proc, broker = start_redis(logs, PROJECT_ROOT, os.environ)
        procs.append(redis_proc)
        moto_proc, moto_url = start_moto(logs, PROJECT_ROOT, os.environ)
        procs.append(moto_proc)
        proxy = FaultyS3Proxy(moto_url)
        sqlite_url = f"sqlite:///{logs / 'widgets.db'}"
        os.environ.update(
            {
                "APP_ENV": "development",
                "DATABASE_URL": sqlite_url,
                "CELERY_BROKER_URL": broker,
                "S3_ENDPOINT_URL": proxy.url,
                "S3_BUCKET": BUCKET,
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "S3_MAX_ATTEMPTS": "3",
            }
        )
        for var in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_PROFILE",
            "DRAFT_RETENTION_DAYS",
        ):
            os.environ.pop(var, None)
        reset_process_state()
        s3 = boto3.client(
            "s3",
            endpoint_url=moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket=BUCKET)
        migrate(sqlite_url)
        yield {
            "broker": broker,
            "moto_url": moto_url,
            "proxy": proxy,
            "s3": s3,
            "sqlite_url": sqlite_url,
            "logs": logs,
        }
        proxy.close()
    finally:
        reset_process_state()
        for proc in reversed(procs):
            proc.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def postgres_url(services: dict[str, Any]) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    admin_url = os.environ.get("TEST_POSTGRES_URL", DEFAULT_PG)
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL required but unreachable at {admin_url}: {exc}")
        pytest.skip(f"no PostgreSQL at {admin_url}")
    name = f"widgets_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    migrate(url)
    yield url
    reset_process_state()
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _use_database(url: str) -> None:
    if os.environ.get("DATABASE_URL") != url:
        os.environ["DATABASE_URL"] = url
        reset_process_state()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, services: dict[str, Any]) -> str:
    """Runs the test once on SQLite and once on PostgreSQL; returns the backend name."""
    if request.param == "postgres":
        _use_database(request.getfixturevalue("postgres_url"))
    else:
        _use_database(services["sqlite_url"])
    return str(request.param)


@pytest.fixture
def sqlite_database(services: dict[str, Any]) -> str:
    """For tests that need a database but not both backends (worker tests)."""
    _use_database(services["sqlite_url"])
    return "sqlite"


@pytest.fixture
def s3(services: dict[str, Any]) -> Any:
    """A plain boto3 client straight to moto (not through the fault proxy): the ground truth."""
    return services["s3"]


@pytest.fixture
def s3_faults(services: dict[str, Any]) -> Iterator[FaultyS3Proxy]:
    proxy: FaultyS3Proxy = services["proxy"]
    proxy.clear()
    yield proxy
    proxy.clear()


@pytest.fixture
def api(services: dict[str, Any]) -> Iterator[TestClient]:
    from api_stub.app import app

    with TestClient(app) as client:
        yield client


@pytest.fixture
def make_org(api: TestClient) -> Callable[[], OrgClient]:
    """Factory: a new organization with an access token, and a client bound to it."""
    return lambda: make_org_client(api)


@pytest.fixture
def org(make_org: Callable[[], OrgClient]) -> OrgClient:
    return make_org()


@pytest.fixture(scope="session")
def celery_worker_session(services: dict[str, Any]) -> Iterator[Any]:
    """One real Celery worker (solo pool, in a thread of this process) on the session's Redis."""
    from celery.contrib.testing.worker import start_worker

    from worker.celery import app

    app.control.purge()
    with start_worker(
        app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=30
    ) as worker:
        yield worker


@pytest.fixture
def celery_worker(celery_worker_session: Any) -> Any:
    return celery_worker_session
