"""S3 faults and malformed task messages, against real ``celery -A worker worker`` processes.

The module starts one stack: a Redis database of its own, a fresh SQLite database, an
:class:`~tests.support.outage_s3.OutageS3Proxy` in front of the session's moto server, a
prefork worker whose S3 traffic goes through the proxy, and the in-process API; everything is
stopped by PID at the end. Each test switches its own fault on and off and checks the suite's
invariants after. Files are read straight from moto (the ground truth).
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.connection import Connection
from kombu.messaging import Producer

from tests.conftest import BUCKET
from tests.support.api import OrgClient, make_org_client
from tests.support.outage_s3 import OutageS3Proxy
from tests.support.reliability import (
    Load,
    Worker,
    Workers,
    check,
    environment,
    finish_leftovers,
    fresh_sqlite,
    org_deployments,
    ping,
    wait_all_final,
)

pytestmark = pytest.mark.e2e

BROKER_DB = 13
OUTAGE_SECONDS = 10.0


@dataclass
class Stack:
    broker: str
    proxy: OutageS3Proxy
    worker: Worker
    http: TestClient
    s3: Any

    def org(self) -> OrgClient:
        return make_org_client(self.http)


@pytest.fixture(scope="module")
def stack(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from api_stub.app import app as api

    tmp = tmp_path_factory.mktemp("s3-faults")
    broker = services["broker"].rsplit("/", 1)[0] + f"/{BROKER_DB}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    proxy = OutageS3Proxy(services["moto_url"])
    env = {
        "DATABASE_URL": fresh_sqlite(tmp),
        "CELERY_BROKER_URL": broker,
        "S3_ENDPOINT_URL": proxy.url,
        "S3_MAX_ATTEMPTS": "2",
    }
    try:
        with environment(**env), TestClient(api) as http, Workers(tmp, env) as workers:
            worker = workers.start(concurrency=4)
            yield Stack(broker, proxy, worker, http, services["s3"])
    finally:
        proxy.close()
        client.flushdb()
        client.close()


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


def _in_flight(org_id: str) -> int:
    return sum(1 for r in org_deployments(org_id) if r.status in ("ready", "running"))


def test_s3_outage_of_ten_seconds_mid_run(stack: Stack, guarantee: Any) -> None:
    org = stack.org()
    try:
        widgets = [org.widget() for _ in range(8)]
        stack.proxy.slow(0.1)  # uploads take a while: some are in flight when S3 goes away
        load = Load(org, widgets, threads=4)
        runner = load.in_background(48, pace=0.15)
        deadline = time.monotonic() + 60
        while not (len(load.accepted) >= 12 and _in_flight(org.id) >= 2):
            assert time.monotonic() < deadline, "no work in flight"
            time.sleep(0.05)
        in_flight = _in_flight(org.id)
        start = time.monotonic()
        stack.proxy.outage()
        time.sleep(OUTAGE_SECONDS)
        stack.proxy.restore()
        end = time.monotonic()
        runner.join(timeout=120)
        injected = stack.proxy.injected
        retried = sum(1 for r in org_deployments(org.id) if r.attempts > 1)
        wait_all_final(org.id, 180, tick=_reconcile)
        counts = check(org.id, load.accepted, stack.s3, BUCKET)
    finally:
        stack.proxy.restore()
        stack.proxy.slow(0)
        finish_leftovers(org.id)

    assert injected > 0 and retried > 0, (injected, retried)
    assert load.statuses() == {202: 48}
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    assert counts.failures == 0 and counts.jobs == 48
    guarantee(
        f"S3 unavailable for {OUTAGE_SECONDS:.0f} s (503 to every request)",
        jobs=counts.jobs,
        faults=injected,
        in_flight_at_fault=in_flight,
        retried_jobs=retried,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        http_5xx=sum(n for s, n in load.statuses().items() if s >= 500),
        api_p99_s=round(load.p99_between(start, end), 3),
    )


def _container(stack: Stack, org: OrgClient, widget_id: str) -> dict[str, Any]:
    obj = stack.s3.get_object(Bucket=BUCKET, Key=org.container_key(widget_id))
    return json.loads(obj["Body"].read())


def test_permanent_403_fails_readably_and_a_redeploy_after_recovery_succeeds(
    stack: Stack, guarantee: Any
) -> None:
    org = stack.org()
    try:
        widget = org.widget()
        first = org.wait_deployment(org.deploy(widget["id"])["id"])
        assert first["status"] == "success", first
        edited = org.req("PATCH", f"/widgets/{widget['id']}", json={"name": "renamed"})
        assert edited.status_code == 200, edited.text
        assert edited.json()["publication_status"] == "unpublished_changes"

        stack.proxy.deny(["PUT"])  # e.g. the bucket policy lost the worker's s3:PutObject
        denied = org.wait_deployment(org.deploy(widget["id"])["id"], timeout=60)
        injected = stack.proxy.injected
        after = org.req("GET", f"/widgets/{widget['id']}").json()
        live = _container(stack, org, widget["id"])

        stack.proxy.restore()
        again = org.wait_deployment(org.deploy(widget["id"])["id"], timeout=60)
        recovered = _container(stack, org, widget["id"])
        counts = check(org.id, [first, denied, again], stack.s3, BUCKET)
    finally:
        stack.proxy.restore()
        finish_leftovers(org.id)

    assert denied["status"] == "failure", denied
    assert "AccessDenied" in (denied["error"] or "") or "Access Denied" in (denied["error"] or "")
    assert len(denied["error"]) < 500 and "Traceback" not in denied["error"]
    assert after["publication_status"] == "unpublished_changes"  # unchanged by the failure
    assert live["deployment_id"] == first["deployment_id"]  # the old file stays up
    assert again["status"] == "success", again
    assert recovered["deployment_id"] == again["deployment_id"]
    assert recovered["widget"]["name"] == "renamed"
    assert org.req("GET", f"/widgets/{widget['id']}").json()["publication_status"] == "published"
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    guarantee(
        "S3 answers 403 AccessDenied (permanent)",
        jobs=counts.jobs,
        faults=injected,
        failures=counts.failures,
        attempts_of_failed=1,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        error=denied["error"][:80],
    )


# -- malformed task messages -------------------------------------------------------------------


def _publish_raw(
    conn: Connection,
    queue: str,
    task: str,
    body: bytes,
    content_type: str = "application/json",
) -> str:
    from worker.celery import app

    task_id = f"malformed-{uuid.uuid4().hex[:10]}"
    q = app.amqp.queues[queue]
    Producer(conn.default_channel).publish(
        body,
        exchange=q.exchange,
        routing_key=q.routing_key,
        declare=[q],
        serializer=None,
        content_type=content_type,
        content_encoding="binary" if "json" not in content_type else "utf-8",
        headers={"lang": "py", "task": task, "id": task_id, "root_id": task_id},
    )
    return task_id


def _json_task(args: list[Any], kwargs: dict[str, Any]) -> bytes:
    return json.dumps([args, kwargs, {"callbacks": None, "errbacks": None}]).encode()


_PICKLE_REFUSED = "Received invalid task message: Refusing to deserialize untrusted content"


def _receptions(log: str, what: str, task_id: str) -> int:
    """How many times the worker took the message (it logs each reception once)."""
    if what == "pickle content type":  # refused before its headers are read: no id logged
        return log.count(_PICKLE_REFUSED)
    received = log.count(f"[{task_id}] received")  # a known task
    undecodable = log.count(f"'id': '{task_id}'")  # unknown task, or a body that is not JSON
    return received or undecodable


def _seen(log: str, what: str, task_id: str) -> bool:
    return _receptions(log, what, task_id) > 0


def test_malformed_messages_never_run_never_loop_and_the_worker_stays_healthy(
    stack: Stack, guarantee: Any
) -> None:
    from worker import constants as c

    org = stack.org()
    widget = org.widget()
    valid_dep = str(uuid.uuid4())
    unsafe_dep = "../../configs/x"
    messages: list[tuple[str, str, str, bytes, str]] = [
        # (what, queue, task, body, content type)
        (
            "missing kwargs",
            c.DEPLOY_QUEUE,
            c.DEPLOY_TASK,
            _json_task([], {"organization_id": org.id}),
            "application/json",
        ),
        (
            "wrongly typed kwargs",
            c.DEPLOY_QUEUE,
            c.DEPLOY_TASK,
            _json_task([], {"organization_id": 1, "widget_id": None, "deployment_id": ["x"]}),
            "application/json",
        ),
        (
            "unsafe ids",
            c.DEPLOY_QUEUE,
            c.DEPLOY_TASK,
            _json_task(
                [],
                {
                    "organization_id": org.id,
                    "widget_id": "../" + widget["id"],
                    "deployment_id": unsafe_dep,
                },
            ),
            "application/json",
        ),
        (
            "unknown organization",
            c.DEPLOY_QUEUE,
            c.DEPLOY_TASK,
            _json_task(
                [],
                {
                    "organization_id": str(uuid.uuid4()),
                    "widget_id": widget["id"],
                    "deployment_id": str(uuid.uuid4()),
                },
            ),
            "application/json",
        ),
        (
            "unsafe archive ids",
            c.ARCHIVE_QUEUE,
            c.ARCHIVE_TASK,
            _json_task([], {"organization_id": org.id, "widget_id": "a/../b"}),
            "application/json",
        ),
        (
            "unknown task name",
            c.DEPLOY_QUEUE,
            "widgets.drop_everything",
            _json_task([], {}),
            "application/json",
        ),
        (
            "unknown task on the default queue",
            c.DEFAULT_CELERY_QUEUE,
            "os.system",
            _json_task(["true"], {}),
            "application/json",
        ),
        (
            "pickle content type",
            c.DEPLOY_QUEUE,
            c.DEPLOY_TASK,
            pickle.dumps(((), {"organization_id": org.id}, {})),
            "application/x-python-serialize",
        ),
        ("not JSON", c.DEPLOY_QUEUE, c.DEPLOY_TASK, b"{not json", "application/json"),
    ]
    ids: dict[str, str] = {}
    with Connection(stack.broker) as conn:
        for what, queue, task, body, content_type in messages:
            ids[what] = _publish_raw(conn, queue, task, body, content_type)
    client = redis.Redis.from_url(stack.broker)
    try:
        # Every message is taken and settled (acknowledged or rejected): none stays queued or
        # unacknowledged, so none can be redelivered.
        deadline = time.monotonic() + 60
        while True:
            log = stack.worker.log()
            queued = sum(client.llen(q) for q in c.QUEUES)
            settled = queued == 0 and client.hlen("unacked") == 0
            if settled and all(_seen(log, what, task_id) for what, task_id in ids.items()):
                break
            assert time.monotonic() < deadline, (queued, client.hlen("unacked"), log[-3000:])
            time.sleep(0.3)
        time.sleep(3)  # a redelivery, if any, would show up now
        log = stack.worker.log()
        leftovers = (sum(client.llen(q) for q in c.QUEUES), client.hlen("unacked"))
    finally:
        client.close()

    receptions = {what: _receptions(log, what, task_id) for what, task_id in ids.items()}
    # Nothing ran: no deployment row, no file, except what the valid deploy below creates.
    assert org_deployments(org.id) == []
    listed = stack.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"configs/{org.api_key}/")
    assert listed.get("KeyCount", 0) == 0, listed
    assert leftovers == (0, 0)
    # Each was received once, never again.
    assert set(receptions.values()) == {1}, receptions

    # The worker is healthy: it answers and still deploys.
    assert stack.worker.proc.alive()
    assert ping(stack.broker, stack.worker.name)
    good = org.wait_deployment(org.deploy(widget["id"], deployment_id=valid_dep)["id"], 60)
    assert good["status"] == "success", good
    assert len(org_deployments(org.id)) == 1
    finish_leftovers(org.id)
    guarantee(
        "malformed task messages",
        messages=len(messages),
        executed=0,
        redelivered=0,
        queued_after=leftovers[0],
        unacked_after=leftovers[1],
        worker_alive=1,
    )
