"""Workers killed again and again while deploys and archives are accepted and running.

Three faults, each injected :data:`KILLS` times, at least :data:`KILL_EVERY` seconds apart, always
at a worker that holds a running task at that moment (asked with Celery's ``active`` control
command just before):

* **pool child SIGKILL**: the prefork child running a task is ``kill -9``-ed; the worker's parent
  notices (``WorkerLostError``) and, with ``task_reject_on_worker_lost``, puts the message back;
* **whole-worker SIGKILL**: the worker's process group is ``kill -9``-ed (a host or container
  lost): its unacknowledged messages stay in Redis until the visibility timeout brings them back;
  a new worker is started at once, as a deployment would restart it;
* **whole-worker SIGTERM**: a warm shutdown, which must finish the running tasks or hand them
  back; a new worker is started at once. Every other time ``SIGTERM`` goes to the main process
  only (``docker stop``, Kubernetes), otherwise to the whole process group, pool children
  included (systemd's default ``KillMode=control-group``, and ``./dev serve``): the children then
  die at once and their tasks are handed back like a killed child's.

Each fault runs once during :data:`DEPLOYS` deploys (across :data:`WIDGETS` widgets, every other
one after an edit of the widget, so newer snapshots differ and newest-wins is checked) and once
during :data:`ARCHIVES` archives (published widgets, some with unpublished edits, drafts, some
with assets).

The module has a ``redis-server`` of its own, a fresh SQLite database, moto behind a proxy that
slows every S3 request (so work is in flight when a kill lands), the in-process API, and two
``celery -A tests.support.short_visibility worker`` subprocesses: the project's app with a
visibility timeout of :data:`VISIBILITY_TIMEOUT` seconds, so that a killed worker's messages come
back in seconds rather than minutes (production: 240 s). Each test has an organization of its
own and starts with two live workers. The reconciler runs every two seconds while the test waits
for the jobs to finish, as beat would, with its re-send delay for jobs whose message is gone
scaled down the same way (:data:`RESEND_AFTER`): a worker SIGKILLed between popping a message
off its queue and recording it as unacknowledged (two Redis round trips in kombu) loses it, and
only the reconciler sends it again (the ``requeues`` figure). Whether a fault hit work in flight
is read from the workers' logs once the broker is drained (see :meth:`Chaos.outcome`).

After each run: every accepted job ``success``, one row per job, every widget's file its newest
successful deployment's content (archives: the file and assets gone, the archived copy as last
published, drafts deleted without a copy, deployments untouched), nothing ``running``.

``RELIABILITY_SCALE`` (default 1) multiplies the jobs and the kills for a longer run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.connection import Connection
from kombu.pidbox import Mailbox
from sqlmodel import col, select

from tests.conftest import BUCKET
from tests.support.api import OrgClient, make_org_client
from tests.support.outage_s3 import OutageS3Proxy
from tests.support.reliability import (
    FINAL,
    Call,
    Load,
    RedisServer,
    Worker,
    Workers,
    check,
    environment,
    finish_leftovers,
    fresh_sqlite,
    org_deployments,
    p99,
    ping,
    wait_all_final,
)

pytestmark = pytest.mark.e2e

SCALE = max(1, int(os.environ.get("RELIABILITY_SCALE", "1")))
DEPLOYS = 200 * SCALE
WIDGETS = 20 * SCALE
ARCHIVES = 50 * SCALE
KILLS = 4 * SCALE  # per fault and workload
KILL_EVERY = 2.5  # seconds, at least, between two kills
SPAN = KILLS * KILL_EVERY * 1.2  # the requests are paced to last about this long
VISIBILITY_TIMEOUT = 4  # seconds (production: 240)
RESEND_AFTER = 2 * VISIBILITY_TIMEOUT  # the reconciler's, for lost messages (production: 30)
CONCURRENCY = 2  # pool children per worker; two workers
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32

CHILD_SIGKILL = "pool child SIGKILL"
WORKER_SIGKILL = "whole-worker SIGKILL"
WORKER_SIGTERM = "whole-worker SIGTERM"
FAULTS = (CHILD_SIGKILL, WORKER_SIGKILL, WORKER_SIGTERM)
FAULT_IDS = ("child-sigkill", "worker-sigkill", "worker-sigterm")


def _reconcile() -> None:
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    broker: str
    proxy: OutageS3Proxy
    workers: Workers
    http: TestClient
    s3: Any

    def org(self) -> OrgClient:
        return make_org_client(self.http)

    def live(self) -> list[Worker]:
        return [w for w in self.workers.started if w.proc.alive()]


@pytest.fixture(scope="module")
def st(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The module's stack: own Redis, fresh SQLite, S3 through a proxy that can slow it, the
    in-process API and two short-visibility workers (the tests replace those they kill, so
    there are two live ones at the start of each test)."""
    from api_stub.app import app as api

    tmp = tmp_path_factory.mktemp("worker-kills")
    redis_server = RedisServer(tmp)
    proxy = OutageS3Proxy(services["moto_url"])
    env = {
        "DATABASE_URL": fresh_sqlite(tmp),
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": proxy.url,
    }
    worker_env = {**env, "TEST_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
    try:
        with (
            pytest.MonkeyPatch.context() as patch,
            environment(**env),
            TestClient(api) as http,
            Workers(tmp, worker_env, app="tests.support.short_visibility") as workers,
        ):
            # The reconciler (run by this process) re-sends a ``ready`` job that has no message
            # in the broker after RESEND_AFTER s (30): scaled down like the visibility timeout.
            # A worker SIGKILLed between taking a message off its queue (BRPOP) and recording
            # it as unacknowledged loses that message; only this re-send brings it back.
            patch.setattr("worker.services.reconcile.RESEND_AFTER", RESEND_AFTER)
            for _ in range(2):
                workers.start(concurrency=CONCURRENCY, wait=False)
            yield Stack(redis_server.url(), proxy, workers, http, services["s3"])
    finally:
        proxy.close()
        redis_server.stop()


@pytest.fixture
def stack(st: Stack) -> Iterator[Stack]:
    """The module's stack with two live, ready workers and S3 at full speed."""
    for worker in st.live():
        if WARM_SHUTDOWN in worker.log():  # stopped by an earlier test that failed half-way
            worker.proc.proc.wait(timeout=60)
    for _ in range(2 - len(st.live())):
        st.workers.start(concurrency=CONCURRENCY, wait=False)
    for worker in st.live():
        st.workers.wait_ready(worker)
    st.proxy.slow(0)
    yield st
    st.proxy.slow(0)


# -- the faults --------------------------------------------------------------------------------

RECEIVED = re.compile(r"Task widgets\.\w+\[([\w-]+)\] received")
DONE = re.compile(r"Task widgets\.\w+\[([\w-]+)\] (?:succeeded|retry|raised)")
CHILD_LOST = "Worker exited prematurely: signal 9 (SIGKILL)"  # a pool child died holding a job
WARM_SHUTDOWN = "Warm shutdown"
BROKER_KEYS = ("deployments", "archives", "maintenance", "celery", "unacked")
LOG_CHARS = 100_000_000  # whole logs


def active_tasks(broker_url: str, names: list[str], timeout: float = 0.5) -> dict[str, list[Any]]:
    """Celery's ``active`` control command: the tasks each named worker is running now (each
    with its ``id``, ``time_start`` and the ``worker_pid`` of the pool child running it).
    Returns as soon as every named worker answered; those that did not are left out."""
    from worker.celery import app

    if not names:
        return {}
    with Connection(broker_url) as conn:
        mailbox = Mailbox(
            app.conf.control_exchange, type="fanout", accept=["json"], serializer="json"
        )(conn)
        replies = mailbox._broadcast(
            "active", reply=True, destination=names, timeout=timeout, limit=len(names)
        )
    answers: dict[str, list[Any]] = {}
    for reply in replies or []:
        for name, tasks in reply.items():
            if name in names and isinstance(tasks, list):
                answers[name] = tasks
    return answers


def pool_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def broker_backlog(broker_url: str) -> int:
    """Messages still waiting in the queues or delivered and not acknowledged."""
    client = redis.Redis.from_url(broker_url)
    try:
        return sum(int(client.llen(k) if k != "unacked" else client.hlen(k)) for k in BROKER_KEYS)
    finally:
        client.close()


def wait_broker_drained(broker_url: str, timeout: float) -> None:
    """A killed worker's messages come back after the visibility timeout: wait for them to be
    delivered again and acknowledged, so that what the logs say about them is complete."""
    deadline = time.monotonic() + timeout
    while (left := broker_backlog(broker_url)) > 0:
        assert time.monotonic() < deadline, f"{left} message(s) still in the broker"
        time.sleep(0.25)


@dataclass
class Kill:
    victim: Worker
    pid: int  # the process signalled (negative: its process group)
    busy: bool  # just before, it was running a task (Celery's ``active``)


@dataclass
class Chaos:
    """Injects one kind of fault into the stack's workers, at a worker that is running a task;
    replaces a worker killed or stopped as a whole, as a deployment would restart it."""

    fault: str
    stack: Stack
    kills: list[Kill] = field(default_factory=list)
    replacements: int = 0
    gone: set[str] = field(default_factory=set)
    ready: set[str] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=dict)  # log lines of earlier tests

    def __post_init__(self) -> None:
        self.offsets = {w.name: len(w.log(LOG_CHARS)) for w in self.stack.workers.started}

    def log(self, worker: Worker) -> str:
        """The worker's log since this test began."""
        return worker.log(LOG_CHARS)[self.offsets.get(worker.name, 0) :]

    def live(self) -> list[Worker]:
        return [w for w in self.stack.workers.started if w.name not in self.gone and w.proc.alive()]

    def answering(self) -> list[Worker]:
        out = []
        for worker in self.live():
            if worker.name not in self.ready and ping(self.stack.broker, worker.name, 0.2):
                self.ready.add(worker.name)
            if worker.name in self.ready:
                out.append(worker)
        return out

    def strike(self, wait: float = 10.0) -> Kill | None:
        """Wait (up to ``wait`` s) for a worker that is running a task, then inject the fault
        into it at once; None if no worker answers at all."""
        deadline = time.monotonic() + wait
        while True:
            ready = self.answering()
            active = active_tasks(self.stack.broker, [w.name for w in ready])
            busy = [w for w in ready if active.get(w.name)]
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        candidates = busy or ready
        if not candidates:
            return None
        victim = candidates[0]  # the oldest: replacements get time to come up
        running = active.get(victim.name, [])
        if self.fault == CHILD_SIGKILL:
            # The child that started its task last is the least likely to be done already.
            latest = max(running, key=lambda t: t.get("time_start") or 0, default=None)
            pid = int(latest["worker_pid"]) if latest and latest.get("worker_pid") else 0
            pid = pid or (pool_children(victim.pid) or [victim.pid])[0]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        elif self.fault == WORKER_SIGKILL:
            pid = victim.pid
            victim.proc.signal_group(signal.SIGKILL)
            victim.proc.proc.wait(timeout=10)
        elif len(self.kills) % 2 == 0:
            pid = victim.pid
            os.kill(pid, signal.SIGTERM)  # the main process only: docker stop, Kubernetes
        else:
            # The whole process group, pool children included: systemd's default
            # (KillMode=control-group) and this project's own ``./dev serve``.
            pid = -victim.pid
            victim.proc.signal_group(signal.SIGTERM)
        kill = Kill(victim, pid, busy=bool(running))
        if self.fault != CHILD_SIGKILL:
            self.gone.add(victim.name)
            self.stack.workers.start(concurrency=CONCURRENCY, wait=False)  # the restart
            self.replacements += 1
        self.kills.append(kill)
        return kill

    def run(self, times: int, every: float, stop: Callable[[], bool]) -> None:
        """``times`` faults, at least ``every`` s apart, until ``stop()`` says the work is done."""
        for _ in range(times):
            started = time.monotonic()
            if stop() or self.strike() is None:
                return
            time.sleep(max(0.0, every - (time.monotonic() - started)))

    def wait_ready(self) -> None:
        """The workers started meanwhile answer."""
        for worker in self.live():
            self.stack.workers.wait_ready(worker)

    def stopped_cleanly(self, timeout: float = 60) -> int:
        """SIGTERM-ed workers that finished their warm shutdown and exited 0 by themselves."""
        clean = 0
        for kill in self.kills:
            code = kill.victim.proc.proc.wait(timeout=timeout)
            assert WARM_SHUTDOWN in self.log(kill.victim), kill.victim.log(3000)
            clean += code == 0
        return clean

    def outcome(self) -> dict[str, int]:
        """What the workers' logs say the faults did (read once the broker is drained).

        * child SIGKILL: ``hits`` are the children that died holding a job (the parent logs
          ``WorkerLostError``); ``redelivered`` the tasks received more than once;
        * whole worker: ``held`` are the messages the victim had received and not finished when
          signalled; each was either ``finished_by_victim`` during its warm shutdown or
          ``handed_back`` (received again by another worker); ``unaccounted`` must be 0. A kill
          ``hits`` if it finished or handed back at least one task.
        """
        logs = {w.name: self.log(w) for w in self.stack.workers.started}
        deliveries: Counter[str] = Counter()
        for log in logs.values():
            deliveries.update(RECEIVED.findall(log))
        out = Counter(
            hits=0, held=0, finished_by_victim=0, handed_back=0, unaccounted=0, redelivered=0
        )
        out["redelivered"] = sum(1 for n in deliveries.values() if n > 1)
        if self.fault == CHILD_SIGKILL:
            lost = sum(log.count(CHILD_LOST) for log in logs.values())
            out["hits"] = min(len(self.kills), lost)
            return dict(out)
        for kill in self.kills:
            log = logs[kill.victim.name]
            _, marker, after = log.partition(WARM_SHUTDOWN)
            done = set(DONE.findall(log))
            held = [t for t in dict.fromkeys(RECEIVED.findall(log)) if t not in done]
            finished = set(DONE.findall(after)) if marker else set()
            back = [t for t in held if deliveries[t] > 1]
            out["held"] += len(held) + len(finished)
            out["finished_by_victim"] += len(finished)
            out["handed_back"] += len(back)
            out["unaccounted"] += len(held) - len(back)
            out["hits"] += bool(back or finished)
        return dict(out)


# -- deploys -----------------------------------------------------------------------------------


@dataclass
class EditingLoad(Load):
    """Deploy requests; every ``edit_every``-th one is preceded by an edit of its widget, so that
    successive snapshots of a widget differ and a stale file would show."""

    edit_every: int = 2
    edits: list[int] = field(default_factory=list)  # statuses of the PATCH requests

    def deploy_once(self, i: int) -> Call:
        if i % self.edit_every == 0:
            widget = self.widgets[i % len(self.widgets)]
            try:
                r = self.org.req("PATCH", f"/widgets/{widget['id']}", json={"name": f"v{i}"})
                status = r.status_code
            except Exception:  # counted as a failed call
                status = 0
            with self._lock:
                self.edits.append(status)
        return super().deploy_once(i)


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_deploys_survive_repeated_worker_kills(fault: str, stack: Stack, guarantee: Any) -> None:
    t0 = time.monotonic()
    org = stack.org()
    try:
        widgets = [org.widget() for _ in range(WIDGETS)]
        stack.proxy.slow(0.05)  # uploads take a while: work is in flight when a kill lands
        load = EditingLoad(org, widgets, threads=4)
        runner = load.in_background(DEPLOYS, pace=load.threads * SPAN / DEPLOYS)
        chaos, start, end = inject(stack, fault, runner, lambda: org_deployments(org.id))
        final = wait_all_final(org.id, 150, tick=_reconcile)
        wait_broker_drained(stack.broker, 60)
        counts = check(org.id, load.accepted, stack.s3, BUCKET)
        outcome = chaos.outcome()
        clean = chaos.stopped_cleanly() if fault == WORKER_SIGTERM else None
        chaos.wait_ready()
    finally:
        finish_leftovers(org.id)
    statuses, edits = load.statuses(), Counter(load.edits)

    assert statuses == {202: DEPLOYS}, statuses
    assert edits == {200: len(load.edits)}, edits
    assert_faults_landed(fault, chaos, outcome, clean)
    assert (counts.lost, counts.duplicated, counts.stale, counts.running) == (0, 0, 0, 0), counts
    assert counts.jobs == DEPLOYS and counts.failures == 0, counts
    assert {r.status for r in final} == {"success"}
    guarantee(
        f"{fault} x{len(chaos.kills)}, every {KILL_EVERY} s, during {DEPLOYS} deploys",
        jobs=counts.jobs,
        faults=len(chaos.kills),
        kills_in_flight=outcome["hits"],
        worker_restarts=chaos.replacements,
        **{k: v for k, v in outcome.items() if k != "hits"},
        attempts=counts.attempts,
        requeues=counts.requeues,
        lost=counts.lost,
        duplicated=counts.duplicated,
        stale=counts.stale,
        failures=counts.failures,
        http_5xx=sum(n for s, n in (statuses + edits).items() if s >= 500),
        api_p99_s=round(load.p99_between(start, end), 3),
        seconds=round(time.monotonic() - t0, 1),
    )


def inject(
    st: Stack, fault: str, runner: threading.Thread, rows: Callable[[], list[Any]]
) -> tuple[Chaos, float, float]:
    """Once a job runs, :data:`KILLS` faults while the requests are sent and the jobs run; then
    wait for the requests to be answered."""
    chaos = Chaos(fault, st)
    deadline = time.monotonic() + 60
    while not any(r.status == "running" for r in rows()):
        assert time.monotonic() < deadline, "no job ever ran"
        time.sleep(0.05)

    def done() -> bool:
        return not runner.is_alive() and all(r.status in FINAL for r in rows())

    start = time.monotonic()
    chaos.run(KILLS, KILL_EVERY, stop=done)
    end = time.monotonic()
    runner.join(timeout=180)
    assert not runner.is_alive(), "the requests were not all answered"
    return chaos, start, end


def assert_faults_landed(
    fault: str, chaos: Chaos, outcome: dict[str, int], clean: int | None
) -> None:
    kills = len(chaos.kills)
    assert kills == KILLS, f"only {kills} faults injected before the work ran out"
    # At least half the faults demonstrably hit work in flight.
    assert outcome["hits"] * 2 >= kills, (outcome, [k.busy for k in chaos.kills])
    if fault in (CHILD_SIGKILL, WORKER_SIGKILL):
        assert outcome["redelivered"] >= 1, "no killed task was delivered again"
    if fault != CHILD_SIGKILL:
        # Every message a killed or stopping worker held was finished by it or came back.
        assert outcome["unaccounted"] == 0, outcome
    if fault == WORKER_SIGTERM:
        assert clean == kills, f"{clean} of {kills} workers finished their warm shutdown"


# -- archives ----------------------------------------------------------------------------------


@dataclass
class Planned:
    widget: dict[str, Any]
    result: str  # "archived" (ever published) or "deleted" (draft)
    published_name: str | None
    has_asset: bool


@dataclass
class ArchiveLoad:
    """``DELETE /widgets/{id}`` for each widget, from a few threads; ``calls`` as in Load."""

    org: OrgClient
    widget_ids: list[str]
    threads: int = 2
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def archive_once(self, widget_id: str, pace: float) -> None:
        t0 = time.monotonic()
        try:
            r = self.org.req("DELETE", f"/widgets/{widget_id}")
            call = Call(t0, time.monotonic() - t0, r.status_code)
            if r.status_code == 202:
                call.deployment = r.json()  # the archive job
            else:
                call.error = r.text[:500]
        except Exception as exc:  # counted as a failed call
            call = Call(t0, time.monotonic() - t0, 0, error=repr(exc)[:500])
        with self._lock:
            self.calls.append(call)
        time.sleep(pace)

    def in_background(self, pace: float) -> threading.Thread:
        def run() -> None:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(lambda w: self.archive_once(w, pace), self.widget_ids))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    @property
    def accepted(self) -> list[dict[str, Any]]:
        with self._lock:
            return [c.deployment for c in self.calls if c.deployment is not None]

    def statuses(self) -> Counter[int]:
        with self._lock:
            return Counter(c.status for c in self.calls)

    def p99_between(self, start: float, end: float) -> float:
        with self._lock:
            return p99([c.seconds for c in self.calls if start <= c.started <= end])


def archive_jobs(org_id: str) -> list[Any]:
    from worker.db import unit_of_work
    from worker.models import ArchiveJob

    with unit_of_work() as s:
        return list(s.exec(select(ArchiveJob).where(ArchiveJob.organization_id == org_id)).all())


def finish_archive_leftovers(org_id: str) -> None:
    """Unfinished archive jobs of the test's organization end ``failure``, so that no later
    reconcile of the module's database sends them."""
    from worker.db import unit_of_work
    from worker.models import ArchiveJob, utcnow

    with unit_of_work() as s:
        stmt = select(ArchiveJob).where(
            ArchiveJob.organization_id == org_id, col(ArchiveJob.status).not_in(FINAL)
        )
        for job in s.exec(stmt).all():
            job.status, job.finished_at = "failure", utcnow()
            s.add(job)


def wait_archives_final(org_id: str, count: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + 2
    while True:
        jobs = archive_jobs(org_id)
        if len(jobs) >= count and all(j.status in FINAL for j in jobs):
            return jobs
        pending = [(j.widget_id, j.status, j.error) for j in jobs if j.status not in FINAL]
        assert time.monotonic() < deadline, f"archives not final after {timeout}s: {pending[:10]}"
        if time.monotonic() >= next_tick:
            with contextlib.suppress(Exception):
                _reconcile()
            next_tick = time.monotonic() + 2
        time.sleep(0.25)


def s3_keys(s3: Any, prefix: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def check_archives(
    org: OrgClient, plan: dict[str, Planned], accepted: list[dict[str, Any]], s3: Any
) -> dict[str, int]:
    """The archive invariants, as counts (all must be zero but ``jobs``)."""
    from worker.db import unit_of_work
    from worker.models import ArchivedWidget, Widget, WidgetAsset

    jobs = archive_jobs(org.id)
    by_id = {j.id: j for j in jobs}
    per_widget = Counter(j.widget_id for j in jobs)
    with unit_of_work() as s:
        copies = {
            a.id: a
            for a in s.exec(
                select(ArchivedWidget).where(ArchivedWidget.organization_id == org.id)
            ).all()
        }
        widgets_left = len(s.exec(select(Widget).where(Widget.organization_id == org.id)).all())
        asset_rows = len(
            s.exec(select(WidgetAsset).where(WidgetAsset.organization_id == org.id)).all()
        )
    wrong_copy = 0
    for widget_id, p in plan.items():
        copy = copies.get(widget_id)
        if p.result == "archived":
            wrong_copy += copy is None or copy.name != p.published_name
        else:
            wrong_copy += copy is not None
    listed = org.req("GET", "/widgets/archived", params={"$limit": 1000})
    assert listed.status_code == 200, listed.text
    expected_listed = {w for w, p in plan.items() if p.result == "archived"}
    return {
        "jobs": len(jobs),
        "lost": sum(
            1 for a in accepted if a["id"] not in by_id or by_id[a["id"]].status != "success"
        ),
        "duplicated": sum(1 for n in per_widget.values() if n > 1),
        "running": sum(1 for j in jobs if j.status == "running"),
        "failures": sum(1 for j in jobs if j.status == "failure"),
        "wrong_result": sum(
            1 for j in jobs if j.widget_id in plan and j.result != plan[j.widget_id].result
        ),
        "wrong_copy": wrong_copy,
        "wrong_listing": len({a["id"] for a in listed.json()} ^ expected_listed),
        "widgets_left": widgets_left,
        # A file still served for an archived widget (it must no longer render on websites).
        "stale": sum(1 for w in plan if s3_keys(s3, org.container_key(w))),
        "assets_left": asset_rows + len(s3_keys(s3, f"assets/{org.api_key}/")),
    }


def plan_archives(org: OrgClient) -> dict[str, Planned]:
    """:data:`ARCHIVES` widgets: 4 in 5 deployed (published), 1 in 5 drafts; an asset on 1 in 5
    published widgets and on every other draft. The deploys are sent, not waited for."""
    plan: dict[str, Planned] = {}
    for i in range(ARCHIVES):
        w = org.widget(name=f"archive-{i}")
        has_asset = i % 5 == 2 or i % 10 == 4
        if has_asset:
            files = {"file": ("logo.png", PNG, "image/png")}
            r = org.req("POST", f"/widgets/{w['id']}/assets", files=files)
            assert r.status_code == 201, r.text
        draft = i % 5 == 4
        if not draft:
            org.deploy(w["id"])
        result, name = ("deleted", None) if draft else ("archived", w["name"])
        plan[w["id"]] = Planned(w, result, name, has_asset)
    return plan


@pytest.mark.parametrize("fault", FAULTS, ids=FAULT_IDS)
def test_archives_survive_repeated_worker_kills(fault: str, stack: Stack, guarantee: Any) -> None:
    t0 = time.monotonic()
    org = stack.org()
    try:
        plan = plan_archives(org)
        deployed = wait_all_final(org.id, 120, tick=_reconcile)
        assert {d.status for d in deployed} == {"success"}
        for i, p in enumerate(plan.values()):
            if p.result == "archived" and i % 4 == 1:  # archived as last published
                r = org.req("PATCH", f"/widgets/{p.widget['id']}", json={"name": "edited"})
                assert r.status_code == 200, r.text
        stack.proxy.slow(0.25)  # an archive makes a few S3 calls: work is in flight
        load = ArchiveLoad(org, list(plan), threads=2)
        runner = load.in_background(pace=load.threads * SPAN / ARCHIVES)
        chaos, start, end = inject(stack, fault, runner, lambda: archive_jobs(org.id))
        jobs = wait_archives_final(org.id, ARCHIVES, 150)
        wait_broker_drained(stack.broker, 60)
        stack.proxy.slow(0)
        counts = check_archives(org, plan, load.accepted, stack.s3)
        after = org_deployments(org.id)
        outcome = chaos.outcome()
        clean = chaos.stopped_cleanly() if fault == WORKER_SIGTERM else None
        chaos.wait_ready()
    finally:
        finish_leftovers(org.id)
        finish_archive_leftovers(org.id)
    statuses = load.statuses()

    assert statuses == {202: ARCHIVES}, statuses
    assert_faults_landed(fault, chaos, outcome, clean)
    assert counts["jobs"] == ARCHIVES, counts
    assert {k: v for k, v in counts.items() if k != "jobs" and v} == {}, counts
    # Deployments are never touched by archiving: they keep every configuration.
    assert sorted((d.id, d.status) for d in after) == sorted((d.id, d.status) for d in deployed)
    guarantee(
        f"{fault} x{len(chaos.kills)}, every {KILL_EVERY} s, during {ARCHIVES} archives",
        jobs=counts["jobs"],
        faults=len(chaos.kills),
        kills_in_flight=outcome["hits"],
        worker_restarts=chaos.replacements,
        **{k: v for k, v in outcome.items() if k != "hits"},
        attempts=sum(j.attempts for j in jobs),
        requeues=sum(j.requeues for j in jobs),
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        stale=counts["stale"],
        failures=counts["failures"],
        http_5xx=sum(n for s, n in statuses.items() if s >= 500),
        api_p99_s=round(load.p99_between(start, end), 3),
        seconds=round(time.monotonic() - t0, 1),
    )
