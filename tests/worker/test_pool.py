"""The default pool (``worker.pool``): Celery's thread pool with the task time limits enforced.

Against real ``celery -A tests.support.short_visibility worker`` processes of the default pool
(``WORKER_POOL`` unset), a Redis server, a fresh SQLite database and moto behind a proxy that
can slow S3: a soft limit interrupts a deploy waiting on S3 at once, and the deploy is retried;
a deploy stuck where no exception reaches it (in SQLite's busy wait, in C) ends its worker
process at the hard limit, and the job is redelivered to the next worker and published.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from fastapi.testclient import TestClient
from kombu.pidbox import Mailbox

from tests.support.api import OrgClient, make_org_client
from tests.support.outage_s3 import OutageS3Proxy
from tests.support.publish_workers import Broker, enqueue, rows
from tests.support.reliability import RedisServer, Workers, environment, fresh_sqlite
from worker.celery import app
from worker.pool import EXIT_STUCK, Watchdog, _raise_in_thread

pytestmark = pytest.mark.e2e

VISIBILITY_TIMEOUT = 3  # seconds: a dead worker's messages come back this soon (tests only)
SOFT_LOGGED = re.compile(r"Soft time limit \(2s\) exceeded for widgets\.deploy\[([\w-]+)\]")


@dataclass
class Stack:
    broker: Broker
    proxy: OutageS3Proxy
    workers: Workers
    http: TestClient
    sqlite_path: Path

    def org(self) -> OrgClient:
        return make_org_client(self.http)


@pytest.fixture
def stack(services: dict[str, Any], tmp_path: Path) -> Iterator[Stack]:
    from api_stub.app import app as api

    redis_server = RedisServer(tmp_path)
    proxy = OutageS3Proxy(services["moto_url"])
    db_url = fresh_sqlite(tmp_path)
    env = {
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": proxy.url,
        "S3_READ_TIMEOUT": "60",  # a slowed request must outlast the limits under test
    }
    worker_env = {**env, "TEST_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
    try:
        with (
            environment(**env),
            TestClient(api) as http,
            Workers(tmp_path, worker_env, app="tests.support.short_visibility") as workers,
        ):
            broker = Broker(redis_server.url(), 0)
            try:
                yield Stack(broker, proxy, workers, http, Path(db_url.removeprefix("sqlite:///")))
            finally:
                broker.close()
    finally:
        proxy.close()
        redis_server.stop()


def wait_status(dep_id: str, status: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        row = rows([dep_id])[dep_id]
        if row.status == status:
            return row
        assert time.monotonic() < deadline, f"{dep_id} is {row.status} ({row.error})"
        time.sleep(0.2)


def test_the_default_pool_runs_tasks_on_threads_of_one_process(stack: Stack) -> None:
    """``WORKER_POOL`` unset: one process, no pool children, its tasks on its threads."""
    worker = stack.workers.start(concurrency=4)
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    assert children == [], f"a threads worker has no pool children: {children}"
    org = stack.org()
    (dep_id,) = enqueue(stack.broker, org, org.widget()["id"])
    wait_status(dep_id, "success", 30)
    mailbox = Mailbox(app.conf.control_exchange, type="fanout", accept=["json"])(stack.broker.conn)
    replies = mailbox._broadcast("stats", reply=True, destination=[worker.name], timeout=2)
    pool = next(r[worker.name]["pool"] for r in replies or [] if worker.name in r)
    assert pool["implementation"] == "worker.pool:TimeLimitedThreadPool", pool
    assert pool["max-concurrency"] == 4, pool


def test_a_soft_time_limit_interrupts_a_deploy_waiting_on_s3_and_it_is_retried(
    stack: Stack,
) -> None:
    worker = stack.workers.start(concurrency=4)
    org = stack.org()
    widget = org.widget()
    stack.proxy.slow(20)  # every S3 request takes 20 s: far past the 2 s soft limit
    (dep_id,) = enqueue(stack.broker, org, widget["id"], soft_time_limit=2, time_limit=30)
    deadline = time.monotonic() + 30
    while not SOFT_LOGGED.search(worker.log()):
        assert time.monotonic() < deadline, worker.log(4000)
        time.sleep(0.1)
    # The exception landed while the S3 call was still waiting (it would have taken 20 s): the
    # deploy is already back in the queue for a retry, with the soft limit as its reason.
    row = wait_status(dep_id, "ready", 5)
    assert "SoftTimeLimitExceeded" in (row.error or ""), row.error
    assert re.search(r"Task widgets\.deploy\[[\w-]+\] retry", worker.log()), worker.log(4000)
    stack.proxy.slow(0)
    wait_status(dep_id, "success", 90)


def test_a_deploy_stuck_past_the_hard_limit_ends_its_worker_and_is_redelivered(
    stack: Stack,
) -> None:
    worker = stack.workers.start(concurrency=4)
    org = stack.org()
    widget = org.widget()
    # SQLite's write lock held by this test: the deploy's first transaction waits for it inside
    # SQLite's busy handler (C code, 30 s), where no soft-limit exception can reach it.
    (dep_id,) = enqueue(
        stack.broker, org, widget["id"], countdown=2, soft_time_limit=2, time_limit=4
    )
    lock = sqlite3.connect(stack.sqlite_path, timeout=1, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")  # before the message's countdown is over
    try:
        code = worker.proc.proc.wait(timeout=30)
        assert code == EXIT_STUCK, worker.log(4000)
        log = worker.log()
        assert "outlived its hard time limit" in log, log[-4000:]
        assert "sqlalchemy" in log.split("outlived its hard time limit", 1)[1], log[-4000:]
    finally:
        lock.rollback()
        lock.close()
    # The message was held, unacknowledged, by the dead worker: the next one gets it after the
    # visibility timeout, and publishes.
    assert rows([dep_id])[dep_id].status in {"ready", "running"}
    stack.workers.start(concurrency=4)
    row = wait_status(dep_id, "success", 60)
    assert row.s3_key


def test_a_soft_limit_fired_as_its_task_ends_is_never_raised_after_it() -> None:
    """The watchdog fires while the task's thread waits for the watch's lock to leave it: the
    exception lands inside ``leave``, which finishes leaving, and nothing is raised in what runs
    next on the thread (Celery's success callback, the next task). No worker here: a real race
    would land in this window only by chance, so the two sides are stepped by hand; the process
    exit is replaced by a test failure (it is exercised for real by the hard-limit test above)."""
    dog = Watchdog(exit_process=lambda code: pytest.fail(f"exited {code}"))
    entered, go = threading.Event(), threading.Event()
    raised: list[str] = []

    def task_thread() -> None:
        entry = dog.enter(60, None, None)
        entries.append(entry)
        entered.set()
        go.wait(10)
        dog.leave(entry)  # blocks on the lock held below, then the exception lands in it
        try:
            for _ in range(10_000):  # what runs next on this thread
                sum(range(10))
        except BaseException as exc:  # the point: nothing may land here
            raised.append(type(exc).__name__)

    entries: list[Any] = []
    thread = threading.Thread(target=task_thread)
    thread.start()
    assert entered.wait(10)
    with dog._lock:  # the watchdog's side of the race, held while the thread tries to leave
        go.set()
        time.sleep(0.2)  # the thread is now blocked acquiring the lock, in C
        entries[0].soft_fired = True
        _raise_in_thread(entries[0].ident, SoftTimeLimitExceeded)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert raised == []
    assert entries[0].done


@pytest.mark.parametrize(
    ("pool", "implementation", "concurrency"),
    [
        (None, "worker.pool:TimeLimitedThreadPool", 32),
        ("threads", "worker.pool:TimeLimitedThreadPool", 32),
        ("prefork", "prefork", max(4, 4 * (os.cpu_count() or 1))),
    ],
)
def test_worker_pool_setting_picks_the_pool_and_its_default_concurrency(
    pool: str | None, implementation: str, concurrency: int
) -> None:
    from worker.celery import celery_config
    from worker.settings import Settings

    settings = Settings(app_env="development", **({"worker_pool": pool} if pool else {}))
    config = celery_config(settings)
    assert (config["worker_pool"], config["worker_concurrency"]) == (implementation, concurrency)
    explicit = Settings(
        app_env="development", worker_concurrency=7, **({"worker_pool": pool} if pool else {})
    )
    assert celery_config(explicit)["worker_concurrency"] == 7
