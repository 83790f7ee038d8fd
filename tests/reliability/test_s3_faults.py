"""S3 misbehaving while deploys are running: random errors and dropped connections, a stall,
and an outage that outlasts the whole retry budget.

Each test starts its own stack: a ``redis-server`` (:class:`RedisServer`), a fresh SQLite
database, a fault proxy of its own in front of the session's moto server, ``celery -A … worker``
processes whose S3 traffic goes through that proxy, and the in-process API; everything is
stopped by PID at the end. Files are read straight from moto (the ground truth). After each
fault: every accepted deployment final (``success``, or ``failure`` where the fault outlasts
the retries), one row each, every widget's file its newest successful deployment's content,
nothing ``running``.

The ten-second outage and the permanent ``403`` are in ``test_s3_and_messages.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from tests.conftest import BUCKET
from tests.support.api import OrgClient, make_org_client
from tests.support.chaos_s3 import ChaosS3Proxy
from tests.support.outage_s3 import OutageS3Proxy, StallS3Proxy
from tests.support.reliability import (
    Counts,
    Load,
    RedisServer,
    Workers,
    check,
    environment,
    finish_leftovers,
    fresh_sqlite,
    org_deployments,
    wait_all_final,
)

pytestmark = pytest.mark.e2e

CHAOS_JOBS = 100
CHAOS_P = 0.3
STALL_SECONDS = 20.0
STALL_JOBS = 100
# Short enough that several reads time out within the stall (the production default is 20 s).
STALL_READ_TIMEOUT = 4.0
API_P99_LIMIT = 2.0  # seconds: the deploy route never calls S3, so a stall must not show here
# Celery retries of widgets.deploy in the outage test (tests.support.short_retries); production
# has worker.constants.MAX_RETRIES (8, up to ~6 minutes of backoff).
SHORT_RETRIES = 2


@dataclass
class Stack:
    org: OrgClient
    workers: Workers
    s3: Any

    def container(self, widget_id: str) -> dict[str, Any] | None:
        try:
            obj = self.s3.get_object(Bucket=BUCKET, Key=self.org.container_key(widget_id))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return dict(json.loads(obj["Body"].read()))

    def check(self, accepted: list[dict[str, Any]]) -> Counts:
        return check(self.org.id, accepted, self.s3, BUCKET)


@contextlib.contextmanager
def _stack(
    services: dict[str, Any],
    tmp_path: Path,
    s3_url: str,
    *,
    app: str = "worker",
    concurrency: int = 4,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Own Redis, fresh SQLite, the API in process and one worker whose S3 is ``s3_url``."""
    from api_stub.app import app as api

    redis_server = RedisServer(tmp_path)
    env = {
        "DATABASE_URL": fresh_sqlite(tmp_path),
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": s3_url,
        **(env or {}),
    }
    org_id = None
    try:
        with (
            environment(**env),
            TestClient(api) as http,
            Workers(tmp_path, env, app=app) as workers,
        ):
            workers.start(concurrency=concurrency)
            org = make_org_client(http)
            org_id = org.id
            yield Stack(org, workers, services["s3"])
    finally:
        if org_id is not None:
            with environment(**env):
                finish_leftovers(org_id)
        redis_server.stop()


def _in_flight(org_id: str) -> int:
    return sum(1 for r in org_deployments(org_id) if r.status in ("ready", "running"))


def _wait_in_flight(load: Load, org_id: str, accepted: int, timeout: float = 60) -> int:
    """Wait until ``accepted`` requests were accepted and at least two jobs are unfinished."""
    deadline = time.monotonic() + timeout
    while True:
        busy = _in_flight(org_id)
        if len(load.accepted) >= accepted and busy >= 2:
            return busy
        assert time.monotonic() < deadline, (len(load.accepted), busy)
        time.sleep(0.05)


def _assert_clean(counts: Counts, jobs: int) -> None:
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0), counts
    assert counts.jobs == jobs and counts.final == jobs, counts


def _http_5xx(load: Load) -> int:
    return sum(n for s, n in load.statuses().items() if s >= 500)


# -- a. 30 % of S3 requests fail -----------------------------------------------------------------


def test_thirty_percent_of_s3_requests_fail_and_every_deploy_succeeds(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    proxy = ChaosS3Proxy(services["moto_url"], seed=20250110)
    try:
        # Two botocore attempts per call: a fault that strikes twice in a row reaches Celery's
        # retries too (about one call in eleven).
        with _stack(services, tmp_path, proxy.url, env={"S3_MAX_ATTEMPTS": "2"}) as stack:
            org = stack.org
            widgets = [org.widget() for _ in range(40)]
            load = Load(org, widgets, threads=4)
            proxy.reset_counters()
            # 500, 503 SlowDown, a connection reset before the request is forwarded, and one
            # after it was (the write landed, the answer is lost); each request waits 5-40 ms.
            proxy.chaos(["GET", "HEAD", "PUT", "DELETE"], p=CHAOS_P, delay_ms=(5, 40))
            start = time.monotonic()
            runner = load.in_background(CHAOS_JOBS, pace=0.05)
            deadline = time.monotonic() + 60
            while not (proxy.faults() >= 3 and _in_flight(org.id) >= 2):
                assert time.monotonic() < deadline, (proxy.faults(), _in_flight(org.id))
                time.sleep(0.05)
            in_flight = _in_flight(org.id)
            runner.join(timeout=120)
            end = time.monotonic()
            rows = wait_all_final(org.id, 150)
            settled = time.monotonic() - start
            faults = proxy.faults()
            by_kind = Counter(kind for (_, kind), n in proxy.injected.items() for _ in range(n))
            requests = proxy.count()
            proxy.calm()
            counts = stack.check(load.accepted)
            statuses = load.statuses()
            p99 = load.p99_between(start, end)
            http_5xx = _http_5xx(load)
    finally:
        proxy.close()

    retried = sum(1 for r in rows if r.attempts > 1)
    assert statuses == {202: CHAOS_JOBS}, statuses
    _assert_clean(counts, CHAOS_JOBS)
    assert counts.failures == 0, [(r.deployment_id, r.error) for r in rows if r.error][:5]
    # The faults landed, at about the rate asked for, on requests of running deploys.
    assert faults >= 10 and 0.15 <= faults / requests <= 0.45, (faults, requests)
    assert by_kind.keys() >= {"500", "503", "drop"}, by_kind
    guarantee(
        f"{CHAOS_P:.0%} of S3 requests fail (500, 503 SlowDown, connection reset before/after)",
        jobs=counts.jobs,
        faults=faults,
        faults_by_kind=dict(by_kind),
        s3_requests=requests,
        in_flight_at_fault=in_flight,
        retried_jobs=retried,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        http_5xx=http_5xx,
        api_p99_s=round(p99, 3),
        all_final_s=round(settled, 1),
    )


# -- b. a 20 s stall ---------------------------------------------------------------------------


def _timed_out(error: str | None) -> bool:
    text = (error or "").lower()
    return "timeout" in text or "no answer within" in text or "timed out" in text


def test_s3_stall_of_twenty_seconds_is_bounded_by_call_timeouts(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    proxy = StallS3Proxy(services["moto_url"])
    proxy.slow(0.1)  # uploads take a while: some are in flight when S3 stops answering
    env = {
        "S3_MAX_ATTEMPTS": "2",
        "S3_READ_TIMEOUT": str(STALL_READ_TIMEOUT),
        "S3_CONNECT_TIMEOUT": "2",
    }
    try:
        with _stack(services, tmp_path, proxy.url, env=env) as stack:
            org = stack.org
            widgets = [org.widget() for _ in range(12)]
            load = Load(org, widgets, threads=4)
            # ~25 s of requests: they keep arriving during the whole stall.
            runner = load.in_background(STALL_JOBS, pace=0.8)
            in_flight = _wait_in_flight(load, org.id, accepted=12)
            start = time.monotonic()
            proxy.stall()
            timed_out: set[str] = set()  # deployments whose S3 call gave up on a timeout
            held = 0
            while time.monotonic() < start + STALL_SECONDS:
                held = max(held, proxy.holding)
                for r in org_deployments(org.id):
                    if r.status == "ready" and _timed_out(r.error):
                        timed_out.add(r.deployment_id)
                time.sleep(0.25)
            stall_end = time.monotonic()
            proxy.restore()
            runner.join(timeout=120)
            rows = wait_all_final(org.id, 150)
            recovery = time.monotonic() - stall_end
            counts = stack.check(load.accepted)
            statuses = load.statuses()
            p99 = load.p99_between(start, stall_end)
            during = sum(1 for c in load.calls if start <= c.started <= stall_end)
            stalled = proxy.stalled
    finally:
        proxy.close()

    assert statuses == {202: STALL_JOBS}, statuses
    _assert_clean(counts, STALL_JOBS)
    assert counts.failures == 0, [(r.deployment_id, r.error) for r in rows if r.error][:5]
    # The stall landed on running deploys, and their calls were ended by the client's own
    # timeouts while it lasted, not by its end.
    assert stalled > 0 and held > 0, (stalled, held)
    assert timed_out, "no S3 call timed out during the stall"
    # The API never waits on S3 for a deploy: requests during the stall stay fast.
    assert during >= 10, during
    assert p99 < API_P99_LIMIT, p99
    guarantee(
        f"S3 stalls {STALL_SECONDS:.0f} s (requests accepted, never answered)",
        jobs=counts.jobs,
        faults=stalled,
        in_flight_at_fault=in_flight,
        held_at_once=held,
        jobs_timed_out_during_stall=len(timed_out),
        read_timeout_s=STALL_READ_TIMEOUT,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        http_5xx=_http_5xx(load),
        api_requests_during_stall=during,
        api_p99_s=round(p99, 3),
        all_final_after_stall_s=round(recovery, 1),
    )


# -- c. an outage longer than the whole retry budget -------------------------------------------


def test_s3_outage_longer_than_the_retry_budget_fails_readably_and_a_redeploy_recovers(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    proxy = OutageS3Proxy(services["moto_url"])
    env = {"S3_MAX_ATTEMPTS": "2", "TEST_MAX_RETRIES": str(SHORT_RETRIES)}
    try:
        with _stack(
            services, tmp_path, proxy.url, app="tests.support.short_retries", concurrency=2, env=env
        ) as stack:
            org = stack.org
            published = org.widget()
            first = org.wait_deployment(org.deploy(published["id"])["id"])
            assert first["status"] == "success", first
            edited = org.req("PATCH", f"/widgets/{published['id']}", json={"name": "edited"})
            assert edited.json()["publication_status"] == "unpublished_changes", edited.text
            draft = org.widget()
            assert draft["publication_status"] == "draft"

            proxy.outage()
            start = time.monotonic()
            t0 = time.monotonic()
            sent = [org.deploy(published["id"]), org.deploy(draft["id"])]
            api_seconds = time.monotonic() - t0
            failed = [org.wait_deployment(d["id"], timeout=90) for d in sent]
            budget = time.monotonic() - start
            # Still down: the widgets are as they were, the old file stays up, no new file.
            after = {
                w["id"]: org.req("GET", f"/widgets/{w['id']}").json()["publication_status"]
                for w in (published, draft)
            }
            live = stack.container(published["id"])
            draft_file = stack.container(draft["id"])
            rows = {r.deployment_id: r for r in org_deployments(org.id)}
            attempts = [rows[d["deployment_id"]].attempts for d in sent]
            time.sleep(2)  # the outage outlasts the budget
            injected = proxy.injected
            proxy.restore()
            down = time.monotonic() - start

            again = [org.wait_deployment(org.deploy(w["id"])["id"], 60) for w in (published, draft)]
            recovered = stack.container(published["id"])
            recovered_draft = stack.container(draft["id"])
            final = {
                w["id"]: org.req("GET", f"/widgets/{w['id']}").json()["publication_status"]
                for w in (published, draft)
            }
            counts = stack.check([first, *failed, *again])
    finally:
        proxy.close()

    for dep in failed:
        assert dep["status"] == "failure", dep
        error = dep["error"] or ""
        assert "S3" in error and ("SlowDown" in error or "503" in error), error
        assert "Traceback" not in error and "\n" not in error and len(error) < 1000, error
    assert attempts == [1 + SHORT_RETRIES] * 2, attempts  # the whole budget, then no more
    assert injected > 0
    assert after == {published["id"]: "unpublished_changes", draft["id"]: "draft"}, after
    assert live is not None and live["deployment_id"] == first["deployment_id"], live
    assert draft_file is None, draft_file
    assert [d["status"] for d in again] == ["success", "success"], again
    assert recovered is not None and recovered["deployment_id"] == again[0]["deployment_id"]
    assert recovered["widget"]["name"] == "edited", recovered
    assert (
        recovered_draft is not None
        and recovered_draft["deployment_id"] == again[1]["deployment_id"]
    )
    assert final == {published["id"]: "published", draft["id"]: "published"}, final
    _assert_clean(counts, 5)
    assert counts.failures == 2, counts
    guarantee(
        f"S3 down (503) longer than the retry budget ({1 + SHORT_RETRIES} attempts)",
        jobs=counts.jobs,
        faults=injected,
        failures=counts.failures,
        attempts_of_failed=attempts[0],
        budget_used_s=round(budget, 1),
        outage_s=round(down, 1),
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        http_5xx=0,
        api_seconds_for_2_deploys=round(api_seconds, 3),
        error=(failed[0]["error"] or "")[:120],
    )
