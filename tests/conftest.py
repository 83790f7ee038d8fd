"""Real services for the whole test session: Redis and moto's S3 server started on free loopback
ports (stopped by PID at the end), SQLite and a fresh PostgreSQL database, an in-process Celery
worker on the real broker, and HTTP clients bound to freshly created organizations.

PostgreSQL cases run whenever a server answers at ``TEST_POSTGRES_URL`` (default: the local
one); with ``REQUIRE_POSTGRES=1`` (CI) an unreachable server is an error instead of a skip.

Tests run in random order (pytest-randomly; the seed is printed in the header and the summary,
``-p randomly --randomly-seed=N`` repeats an order, ``-p no:randomly`` turns it off), so no test
may rely on what another one left behind. What this process shares between tests is reset here:
the environment is restored after every test (:func:`_environment_restored`), and the Celery app's
own broker connections are pinned to the session's Redis (:func:`pin_celery_app`).

A stop signal (Ctrl-C, SIGTERM, SIGHUP) ends the run like Ctrl-C does, with every fixture's
clean-up, so every process the session started is stopped by PID; a second signal, or a clean-up
that takes longer than :data:`STOP_GRACE_SECONDS`, kills them at once (see
:func:`pytest_configure`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.support.api import ADMIN_TOKEN, OrgClient, make_org_client
from tests.support.faulty_s3 import FaultyS3Proxy
from worker.processes import (
    BIN_DIR,
    STOP_SIGNALS,
    ManagedProcess,
    running,
    start_moto,
    start_redis,
    stop_on_signals,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "test-widgets"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def reset_process_state() -> None:
    """Forget cached settings, engine, S3 client and the producer's pool and presumed broker
    outage, so new environment variables take effect."""
    from worker import producer
    from worker.db import reset_engine
    from worker.s3 import close_store
    from worker.settings import get_settings

    close_store()
    reset_engine()
    get_settings.cache_clear()
    reset_producer = getattr(producer, "reset", None)
    if reset_producer is not None:
        reset_producer()


# -- stopping on signals -----------------------------------------------------------------------

# After a first stop signal, the fixtures' clean-up has this long before everything is killed.
STOP_GRACE_SECONDS = 90.0
_stop_signal: list[int] = []


def _descendants() -> list[tuple[int, int]]:
    """(pid, process group) of every live process below this one (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(entry.name)], groups[int(entry.name)] = int(fields[1]), int(fields[2])
    found: list[int] = []
    frontier = {os.getpid()}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - set(found)
        found.extend(frontier)
    return [(pid, groups[pid]) for pid in found]


def kill_everything_started() -> None:
    """SIGKILL to every process group this process started and every process below it: the
    services, the tests' subprocesses and their children. Safe in a signal handler (no locks)."""
    groups = {p.pid for p in list(_running_snapshot())}
    own_group = os.getpgrp()
    for pid, group in _descendants():
        if group != own_group:
            groups.add(group)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)


def _running_snapshot() -> list[ManagedProcess]:
    """:func:`worker.processes.running` without its lock (which the interrupted main thread may
    hold): a copy of a list is atomic."""
    from worker import processes

    return [p for p in list(processes._running) if p.owner == os.getpid()]


def _force_stop(signum: int, why: str) -> None:
    # os.write, not print: the interrupted main thread may be inside a write to stderr.
    with contextlib.suppress(OSError):
        os.write(2, f"\n{why}: killing every process this test run started\n".encode())
    kill_everything_started()
    os._exit(128 + signum)


def _watchdog(signum: int) -> None:
    time.sleep(STOP_GRACE_SECONDS)
    _force_stop(signum, f"clean-up still running {STOP_GRACE_SECONDS:.0f}s after the stop signal")


def _install_stop_signals() -> None:
    """The first SIGINT, SIGTERM or SIGHUP interrupts the run like Ctrl-C (a KeyboardInterrupt,
    deferred while a service process is being started so that it is registered first): pytest
    runs every fixture's clean-up. A second signal, or a clean-up longer than
    :data:`STOP_GRACE_SECONDS`, kills every process the run started and exits."""
    stop_on_signals()
    graceful = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if _stop_signal:
            _force_stop(signum, f"second stop signal ({signal.Signals(signum).name})")
        _stop_signal.append(signum)
        threading.Thread(
            target=_watchdog, args=(signum,), name="stop-watchdog", daemon=True
        ).start()
        handler = graceful[signal.Signals(signum)]
        assert callable(handler)
        handler(signum, frame)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


def stop_leftover_processes() -> None:
    """Stop (by PID) whatever a fixture or test started and did not stop."""
    left = running()
    if left:
        names = ", ".join(f"{p.name} (pid {p.pid})" for p in left)
        print(f"\nstopping processes left running: {names}", file=sys.stderr, flush=True)
    for proc in reversed(left):
        proc.stop(timeout=5)


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        _install_stop_signals()
    atexit.register(stop_leftover_processes)  # a last resort: pytest_unconfigure stops them


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_leftover_processes()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    explorer = sys.modules.get("tests.explorer.test_interleavings")
    lines = list(getattr(explorer, "SUMMARY", []))
    if lines:
        terminalreporter.section("interleaving explorer: schedules run")
        for line in sorted(lines):
            terminalreporter.write_line(line)
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(
            f"random test order: repeat it with -p randomly --randomly-seed={seed}"
        )


# -- process state shared by the tests -------------------------------------------------------

_session_broker: list[str] = []


def pin_celery_app(broker: str) -> None:
    """Point the Celery app's own connections at ``broker`` for good.

    ``app.conf.broker_url`` reads ``CELERY_BROKER_URL`` on every access, and the app creates its
    connection and producer pools (``app.send_task`` without a connection, task retries of the
    in-process worker, ``app.control``) and the in-process worker reconnects from whatever it is
    at that moment. A test that points this process at a broker of its own for a while
    (``tests/support/reliability.environment``) and sends a countdown message (which builds the
    producer pool) used to leave every later ``app.send_task`` and retry of the session
    publishing to that test's broker: "the worker did not run the re-sent message". The read
    and write URLs win over ``CELERY_BROKER_URL``; pools built before are dropped.
    """
    from worker.celery import app

    app.conf.broker_read_url = broker
    app.conf.broker_write_url = broker
    if app._pool is not None:
        with contextlib.suppress(Exception):
            app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
    _session_broker[:] = [broker]


@pytest.fixture(autouse=True)
def _environment_restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts from the environment of the session (and of its module's fixtures):
    what a test or its fixtures changed (``DATABASE_URL`` by :func:`database`, anything else by
    mistake) is put back, with the cached settings, engine and S3 client, after it."""

    def environment() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's

    before, had_services = environment(), bool(_session_broker)
    yield
    after = environment()
    if had_services != bool(_session_broker):
        pass  # the session's services started (or stopped) during this test: theirs to set
    elif after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for key in changed:
            if key in before:
                os.environ[key] = before[key]
            else:
                del os.environ[key]
        reset_process_state()
        leaked = [k for k in changed if k != "DATABASE_URL"]
        if leaked:
            warnings.warn(
                f"{request.node.nodeid} left environment variables changed: {leaked} (restored)",
                stacklevel=1,
            )
    if _session_broker:
        from worker.celery import app

        if app.conf.broker_write_url != _session_broker[0]:
            warnings.warn(
                f"{request.node.nodeid} moved the Celery app off the session broker (re-pinned)",
                stacklevel=1,
            )
            pin_celery_app(_session_broker[0])


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
        pin_celery_app(broker)
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
        _session_broker.clear()
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
