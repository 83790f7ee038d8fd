"""The database failing under the API's requests, seen by clients over real HTTP keep-alive
connections: a 503 in the error shape with ``Retry-After`` (or, for a read, an answer after one
retry on a fresh connection), never a 500, never a dropped connection; and the API recovers
by itself.

PostgreSQL backends killed: a real ``uvicorn api_stub.app:app`` (``APP_ENV=production``) on a
database of the test's own, two prefork workers, :data:`CLIENTS` threads each with its own
keep-alive ``httpx.Client`` sending deploys (each with its own ``deployment_id``, retried on a
503) and reads, while every backend of that database is killed (``pg_terminate_backend``) every
:data:`KILL_EVERY` seconds, :data:`KILLS` times (``RELIABILITY_SCALE`` multiplies them). The
fault is asserted to have landed: API connections were killed with a statement running or a
transaction open.

PostgreSQL hung (a proxy in front of it stops forwarding, every socket left open: a stopped
server or a network dropping packets looks the same to a client): every request is answered 503
within the edge's deadline (``api_stub.route_policy.REQUEST_DEADLINE_SECONDS``), on the client's
keep-alive connection; a deploy answered 503 left no row; once the database answers again the
API serves again, by itself.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from api_stub.route_policy import REQUEST_DEADLINE_SECONDS
from tests.conftest import BUCKET
from tests.support.freezing_proxy import FreezingProxy
from tests.support.http_api import (
    ApiServer,
    HttpClients,
    admin_org,
    clients_for,
    percentile,
    production_env,
)
from tests.support.pg_faults import Killer, own_database
from tests.support.reliability import (
    Workers,
    check,
    environment,
    org_deployments,
    p99,
    wait_all_final,
)

SCALE = max(1, int(os.environ.get("RELIABILITY_SCALE", "1")))
pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.timeout(300 * SCALE)]

BROKER_DB = 4
CLIENTS = 8
KILLS = 20 * SCALE
KILL_EVERY = 0.5
WIDGETS = 10
# After the last kill the API must answer everything again within this many seconds.
RECOVERY = 2.0
AFTER_KILLS = 4.0  # seconds of load after the last kill


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


def test_api_answers_503_never_500_while_postgres_backends_are_killed(
    services: dict[str, Any], postgres_url: str, tmp_path: Path, guarantee: Any
) -> None:
    broker = services["broker"].rsplit("/", 1)[0] + f"/{BROKER_DB}"
    flush = redis.Redis.from_url(broker)
    flush.flushdb()
    accepted: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    try:
        with own_database(postgres_url, "widgets_api_faults") as (url, name):
            env = production_env(url, broker)
            with (
                Workers(tmp_path, env) as workers,
                ApiServer(tmp_path, env) as server,
                httpx.Client(base_url=server.url, timeout=30) as http,
            ):
                workers.start(concurrency=2)
                org = admin_org(http, server.admin_token)
                widgets = [org.widget() for _ in range(WIDGETS)]

                def client_loop(load: HttpClients, c: int) -> None:
                    n = 0
                    while not stop.is_set():
                        n += 1
                        if n % 2:
                            widget = widgets[(c + n) % WIDGETS]["id"]
                            body = {"widget_id": widget, "deployment_id": str(uuid.uuid4())}
                            r = load.request("POST", "/widgets/deployments", json=body)
                            if r is not None and r.status_code == 202:
                                with lock:
                                    accepted[body["deployment_id"]] = r.json()
                        elif n % 4 == 0:
                            load.request("GET", "/widgets", params={"$limit": 20})
                        else:
                            with lock:
                                ids = [d["id"] for d in list(accepted.values())[-5:]]
                            path = f"/widgets/deployments/{ids[0]}" if ids else "/widgets"
                            load.request("GET", path)

                with clients_for(server, org, CLIENTS) as load:
                    runner = threading.Thread(target=load.run, args=(CLIENTS, client_loop))
                    runner.start()
                    try:
                        deadline = time.monotonic() + 60
                        while len(accepted) < 20:
                            assert time.monotonic() < deadline, load.figures()
                            time.sleep(0.05)
                        killer = Killer(url.rsplit("/", 1)[0], name, KILLS, KILL_EVERY)
                        start = time.monotonic()
                        killer.start()
                        killer.join(timeout=120)
                        last_kill = killer.rounds[-1] if killer.rounds else time.monotonic()
                        time.sleep(AFTER_KILLS)
                    finally:
                        stop.set()
                        runner.join(timeout=120)
                    server_log = server.log()
                with environment(DATABASE_URL=url, CELERY_BROKER_URL=broker):
                    rows = wait_all_final(org.id, 240, tick=_reconcile)
                    counts = check(org.id, list(accepted.values()), services["s3"], BUCKET)
                    keys = [r.deployment_id for r in org_deployments(org.id)]
    finally:
        flush.flushdb()
        flush.close()

    attempts = load.attempts
    figures = load.figures()
    during = [a for a in attempts if start <= a.started <= last_kill]
    bad = [a for a in attempts if a.status not in (200, 202, 503)]
    unshaped = [a for a in attempts if a.status == 503 and not (a.retry_after and a.error_shape)]
    new_connections = [a for a in attempts if a.same_connection is False]
    late = [a for a in attempts if a.started > last_kill + RECOVERY and a.status == 503]
    retried_reads = server_log.count("running it again")

    # The fault landed: API connections died with a statement running or a transaction open.
    assert killer.killed >= KILLS, killer.killed
    assert killer.api_busy_killed >= 1, (killer.api_killed, killer.api_busy_killed)
    assert len(during) > 50, len(during)
    assert not bad, (figures, sorted({(a.status, (a.body or a.exception)[:160]) for a in bad}))
    assert not unshaped, [(a.retry_after, a.body) for a in unshaped[:5]]
    # Every request, 503s included, was answered on the client's one keep-alive connection.
    assert not new_connections, (len(new_connections), figures)
    assert "Traceback" not in server_log, server_log[-5000:]
    assert not late, f"{len(late)} requests still refused {RECOVERY} s after the last kill"
    # Every accepted deploy: one row, final; a 503 left no row behind that was not retried.
    assert len(keys) == len(set(keys)) and set(accepted) == set(keys)
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0)
    assert all(r.status in ("success", "failure") for r in rows)
    guarantee(
        f"PostgreSQL backends killed {KILLS} times under API requests (HTTP keep-alive)",
        **figures,
        faults=killer.killed,
        api_connections_killed=killer.api_killed,
        api_killed_in_flight=killer.api_busy_killed,
        requests_during_fault=len(during),
        retried_reads=retried_reads,
        new_connections=len(new_connections),
        accepted=len(accepted),
        jobs=counts.jobs,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
    )


HANG_CLIENTS = 6
HANG_BOUND = REQUEST_DEADLINE_SECONDS + 3.0  # the deadline, plus scheduling on a busy machine
RECOVERY_BOUND = 30.0


def test_api_answers_503_within_its_deadline_while_postgres_hangs(
    services: dict[str, Any], postgres_url: str, tmp_path: Path, guarantee: Any
) -> None:
    broker = services["broker"].rsplit("/", 1)[0] + "/5"
    flush = redis.Redis.from_url(broker)
    flush.flushdb()
    refused: list[str] = []
    lock = threading.Lock()
    try:
        with own_database(postgres_url, "widgets_api_hang") as (url, _):
            real = make_url(url)
            with FreezingProxy(real.host or "127.0.0.1", real.port or 5432) as proxy:
                proxied = real.set(host="127.0.0.1", port=proxy.port)
                env = production_env(proxied.render_as_string(hide_password=False), broker)
                with (
                    ApiServer(tmp_path, env) as server,
                    httpx.Client(base_url=server.url, timeout=30) as http,
                ):
                    org = admin_org(http, server.admin_token)
                    widgets = [org.widget() for _ in range(3)]
                    with clients_for(server, org, HANG_CLIENTS, HANG_BOUND + 10) as load:
                        load.max_retries = 0  # every answer is measured as it is
                        load.run(HANG_CLIENTS, lambda c, i: c.request("GET", "/widgets"))
                        warm = len(load.attempts)
                        assert load.statuses() == {200: warm}, load.figures()

                        proxy.freeze()
                        frozen_at = time.monotonic()

                        def while_hung(c: HttpClients, i: int) -> None:
                            dep = str(uuid.uuid4())
                            body = {"widget_id": widgets[i % 3]["id"], "deployment_id": dep}
                            r = c.request("POST", "/widgets/deployments", json=body)
                            if r is not None and r.status_code == 503:
                                with lock:
                                    refused.append(dep)
                            c.request("GET", "/widgets")

                        load.run(HANG_CLIENTS, while_hung)
                        hung = load.attempts[warm:]
                        held = proxy.held_while_frozen

                        proxy.thaw()
                        thawed_at = time.monotonic()
                        load.max_retries = 60  # now retry 503s (Retry-After: 1 s)

                        def recover(c: HttpClients, i: int) -> None:
                            r = c.request("GET", "/widgets")
                            assert r is not None and r.status_code == 200, r and r.text
                            body = {"widget_id": widgets[i % 3]["id"]}
                            r = c.request("POST", "/widgets/deployments", json=body)
                            assert r is not None and r.status_code == 202, r and r.text

                        load.run(HANG_CLIENTS, recover)
                        recovered_in = time.monotonic() - thawed_at
                    time.sleep(2.0)  # the requests answered at their deadline finish meanwhile
                    server_log = server.log()
                with environment(DATABASE_URL=url, CELERY_BROKER_URL=broker):
                    keys = {r.deployment_id for r in org_deployments(org.id)}
    finally:
        flush.flushdb()
        flush.close()

    latencies = [a.seconds for a in hung]
    bad = [a for a in hung if a.status != 503 or not (a.retry_after and a.error_shape)]
    # The fault landed: statements reached the proxy while it was frozen.
    assert held >= 1, held
    assert len(hung) == 2 * HANG_CLIENTS
    assert not bad, sorted({(a.status, (a.body or a.exception)[:160]) for a in bad})
    assert max(latencies) <= HANG_BOUND, sorted(latencies)
    # On the client's one keep-alive connection, before, during and after the hang.
    assert all(a.same_connection is not False for a in load.attempts), load.figures()
    assert "Traceback" not in server_log, server_log[-5000:]
    assert recovered_in <= RECOVERY_BOUND, recovered_in
    # A deploy answered 503 left no row, even once its request resumed after the thaw.
    assert len(refused) == HANG_CLIENTS and not (set(refused) & keys)
    assert len(keys) == HANG_CLIENTS  # the deploys of the recovery, one row each
    guarantee(
        "PostgreSQL hangs (proxy stops forwarding, sockets open)",
        requests=len(hung),
        http_5xx=sum(1 for a in hung if a.status >= 500),
        http_500=sum(1 for a in hung if a.status == 500),
        http_503=sum(1 for a in hung if a.status == 503),
        client_errors=sum(1 for a in hung if a.status == 0),
        api_p50_s=round(percentile(latencies, 0.5), 3),
        api_p99_s=round(p99(latencies), 3),
        api_max_s=round(max(latencies), 3),
        bound_s=HANG_BOUND,
        faults=held,
        rows_from_503s=len(set(refused) & keys),
        recovered_in_s=round(recovered_in, 1),
        frozen_s=round(thawed_at - frozen_at, 1),
    )
