"""Building blocks of the fault-injection suite (``tests/reliability/``).

* :class:`RedisServer`: a ``redis-server`` of the test's own (AOF on), killed and restarted on
  the same port and data directory;
* :func:`environment`: this process's settings pointed at the test's broker, database and S3
  (cached engine, S3 client, settings and producer pool forgotten on the way in and out);
* :class:`Workers`: ``celery -A worker worker`` subprocesses, ready once they answer a ping on
  the test's broker, stopped by PID;
* :class:`Load`: deploy requests through the in-process API from a few threads, with their
  latencies and statuses;
* :func:`check`: the suite's invariants after a fault, as counts.

Every process a test starts is stopped by PID by the context that started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kombu.connection import Connection
from kombu.pidbox import Mailbox
from sqlmodel import col, select

from worker.processes import BIN_DIR, ManagedProcess, free_port, port_open, wait_until

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
FINAL = ("success", "failure")


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# -- Redis -------------------------------------------------------------------------------------


class RedisServer:
    """``redis-server --appendonly yes`` on a free port; :meth:`kill` is ``kill -9``."""

    def __init__(self, workdir: Path, *, fsync: str = "everysec") -> None:
        self.dir = workdir / f"redis-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.fsync = fsync
        self.proc: ManagedProcess | None = None
        self.kills = 0
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        from worker.processes import redis_server_binary

        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        cmd += ["--appendonly", "yes", "--appendfsync", self.fsync, "--save", ""]
        cmd += ["--dir", str(self.dir), "--maxmemory-policy", "noeviction"]
        self.proc = ManagedProcess("redis", cmd, os.environ, self.dir, PROJECT_ROOT)
        wait_until(self._answers, 20, "redis-server")

    def _answers(self) -> bool:
        if not port_open(self.port):
            return False
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:  # still loading the AOF
            return False
        finally:
            client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.signal_group(signal.SIGKILL)
        self.proc.proc.wait(timeout=10)
        self.proc.stop()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


# -- this process's configuration --------------------------------------------------------------


def reset_state() -> None:
    from tests.conftest import reset_process_state
    from worker import producer

    reset_process_state()
    reset = getattr(producer, "reset", None)  # the producer's own pool (rebuilt per broker URL)
    if reset is not None:
        reset()


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for this process (API, reconciler, producer), then restore."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    reset_state()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_state()


def fresh_sqlite(tmp_path: Path) -> str:
    from tests.conftest import migrate

    url = f"sqlite:///{tmp_path / f'widgets-{uuid.uuid4().hex[:6]}.db'}"
    migrate(url)
    return url


# -- workers -----------------------------------------------------------------------------------


def ping(broker_url: str, name: str, timeout: float = 0.5) -> bool:
    from worker.celery import app

    with Connection(broker_url) as conn:
        mailbox = Mailbox(
            app.conf.control_exchange, type="fanout", accept=["json"], serializer="json"
        )(conn)
        replies = mailbox._broadcast("ping", reply=True, destination=[name], timeout=timeout)
    return any(reply.get(name) == {"ok": "pong"} for reply in replies or [])


@dataclass
class Worker:
    proc: ManagedProcess
    name: str
    pool: str = "threads"  # WORKER_POOL: the project's default, or "prefork"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, chars: int = 400_000) -> str:
        return self.proc.log_tail(chars)


class Workers:
    """``celery -A <app> worker`` subprocesses on one broker; all stopped by PID on exit."""

    def __init__(self, log_dir: Path, env: dict[str, str], app: str = "worker") -> None:
        self.log_dir, self.app = log_dir, app
        self.env = {**os.environ, **env}
        self.env.pop("WORKER_CONCURRENCY", None)
        self.env.pop("WORKER_POOL", None)
        self.started: list[Worker] = []

    def start(
        self, *args: str, concurrency: int = 2, wait: bool = True, pool: str | None = None
    ) -> Worker:
        """A worker running ``concurrency`` tasks at once on ``pool`` (``WORKER_POOL``; Celery's
        ``--pool prefork`` would not override a configured pool), by default the project's."""
        name = f"rel-{uuid.uuid4().hex[:8]}@test"
        cmd = [str(BIN_DIR / "celery"), "-A", self.app, "worker"]
        cmd += ["--concurrency", str(concurrency), "--loglevel", "INFO", "-n", name]
        cmd += ["--without-gossip", "--without-mingle", *args]
        env = {**self.env, **({"WORKER_POOL": pool} if pool else {})}
        proc = ManagedProcess(name.split("@")[0], cmd, env, self.log_dir, PROJECT_ROOT)
        worker = Worker(proc, name, pool or "threads")
        self.started.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: Worker, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ping(self.env["CELERY_BROKER_URL"], worker.name):
            assert worker.proc.alive(), f"worker exited at start-up:\n{worker.log(6000)}"
            assert time.monotonic() < deadline, f"worker not ready:\n{worker.log(6000)}"
            time.sleep(0.2)

    def stop(self) -> None:
        for worker in reversed(self.started):
            worker.proc.stop(timeout=20)
        self.started.clear()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- load through the API ----------------------------------------------------------------------


@dataclass
class Call:
    started: float
    seconds: float
    status: int  # 0: the call raised
    deployment: dict[str, Any] | None = None
    error: str | None = None  # the body (or exception) of anything but a 202


class CallLog:
    """Timed API calls made from several threads, for a dataclass that declares ``org``,
    ``calls`` (in the order they finished) and ``_lock``."""

    org: Any  # tests.support.api.OrgClient
    calls: list[Call]
    _lock: threading.Lock

    def timed_call(self, method: str, path: str, **kwargs: Any) -> Call:
        """One request; a 202's body is kept as the accepted job, anything else as the error."""
        t0 = time.monotonic()
        try:
            r = self.org.req(method, path, **kwargs)
            call = Call(t0, time.monotonic() - t0, r.status_code)
            if r.status_code == 202:
                call.deployment = r.json()
            else:
                call.error = r.text[:500]
        except Exception as exc:  # counted as a failed call
            call = Call(t0, time.monotonic() - t0, 0, error=repr(exc)[:500])
        with self._lock:
            self.calls.append(call)
        return call

    @property
    def accepted(self) -> list[dict[str, Any]]:
        with self._lock:
            return [c.deployment for c in self.calls if c.deployment is not None]

    def errors(self) -> list[tuple[int, str]]:
        with self._lock:
            return [(c.status, c.error or "") for c in self.calls if c.status != 202]

    def statuses(self) -> Counter[int]:
        with self._lock:
            return Counter(c.status for c in self.calls)

    def p99_between(self, start: float, end: float) -> float:
        with self._lock:
            return p99([c.seconds for c in self.calls if start <= c.started <= end])


@dataclass
class Load(CallLog):
    """Deploy requests from ``threads`` threads; ``calls`` in the order they finished."""

    org: Any  # tests.support.api.OrgClient
    widgets: list[dict[str, Any]]
    threads: int = 6
    calls: list[Call] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def deploy_once(self, i: int) -> Call:
        widget = self.widgets[i % len(self.widgets)]
        return self.timed_call("POST", "/widgets/deployments", json={"widget_id": widget["id"]})

    def run(
        self, count: int, pace: float = 0.0, wait_turn: Callable[[int], None] | None = None
    ) -> None:
        """``count`` requests, started at most every ``pace`` seconds per thread; request ``i``
        first waits for ``wait_turn(i)`` (e.g. a fault harness holding the tail)."""

        def one(i: int) -> None:
            if wait_turn is not None:
                wait_turn(i)
            self.deploy_once(i)
            if pace:
                time.sleep(pace)

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(one, range(count)))

    def in_background(
        self, count: int, pace: float = 0.0, wait_turn: Callable[[int], None] | None = None
    ) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(count, pace, wait_turn), daemon=True)
        thread.start()
        return thread


# -- waiting and the invariants ----------------------------------------------------------------


def org_deployments(org_id: str) -> list[Any]:
    from worker.db import unit_of_work
    from worker.models import Deployment

    with unit_of_work() as s:
        return list(s.exec(select(Deployment).where(Deployment.organization_id == org_id)).all())


def wait_all_final(
    org_id: str,
    timeout: float,
    *,
    tick: Callable[[], None] | None = None,
    every: float = 2.0,
    diagnose: Callable[[], str] | None = None,
) -> list[Any]:
    """Poll until every deployment of the organization is final; ``tick`` (e.g. a reconcile
    run, as beat would) is called every ``every`` seconds meanwhile. On timeout the message
    holds the pending rows, the last error of ``tick`` and ``diagnose()`` (e.g. broker state,
    worker logs)."""
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + every
    tick_errors: list[str] = []
    while True:
        rows = org_deployments(org_id)
        if rows and all(r.status in FINAL for r in rows):
            return rows
        if time.monotonic() >= deadline:
            pending = [
                (r.deployment_id, r.status, r.error, r.requeues, str(r.enqueued_at))
                for r in rows
                if r.status not in FINAL
            ]
            extra = diagnose() if diagnose is not None else ""
            raise AssertionError(
                f"not final after {timeout}s ({len(pending)} pending): {pending[:10]}\n"
                f"tick errors: {len(tick_errors)}, last: {tick_errors[-1:]}\n{extra}"
            )
        if tick is not None and time.monotonic() >= next_tick:
            try:
                tick()
            except Exception as exc:  # a fault test's reconcile may meet the fault
                tick_errors.append(repr(exc))
            next_tick = time.monotonic() + every
        time.sleep(0.25)


@dataclass
class Counts:
    jobs: int
    final: int
    lost: int  # accepted but not final, or not found
    duplicated: int  # deployment_ids with more than one row
    stale: int  # widgets whose file is not their newest successful deployment's content
    running: int
    failures: int
    requeues: int  # re-sends by the reconciler
    attempts: int  # deliveries counted by the workers


def check(org_id: str, accepted: list[dict[str, Any]], s3: Any, bucket: str) -> Counts:
    """The suite's invariants, as counts (the test asserts the ones that must be zero)."""
    rows = org_deployments(org_id)
    by_key = Counter(r.deployment_id for r in rows)
    by_id = {r.id: r for r in rows}
    lost = sum(
        1 for d in accepted if by_id.get(d["id"]) is None or by_id[d["id"]].status not in FINAL
    )
    stale = 0
    widgets = {r.widget_id for r in rows}
    for widget_id in widgets:
        done = [
            r for r in rows if r.widget_id == widget_id and r.status == "success" and r.sequence
        ]
        if not done:
            continue
        newest = max(done, key=lambda r: r.sequence)
        try:
            meta = s3.head_object(Bucket=bucket, Key=newest.s3_key)["Metadata"]
        except Exception:
            stale += 1
            continue
        if meta.get("content-sha256") != newest.content_checksum:
            stale += 1
    return Counts(
        jobs=len(rows),
        final=sum(1 for r in rows if r.status in FINAL),
        lost=lost,
        duplicated=sum(1 for n in by_key.values() if n > 1),
        stale=stale,
        running=sum(1 for r in rows if r.status == "running"),
        failures=sum(1 for r in rows if r.status == "failure"),
        requeues=sum(r.requeues for r in rows),
        attempts=sum(r.attempts for r in rows),
    )


def finish_leftovers(org_id: str) -> None:
    """Unfinished jobs of the test's organization end ``failure`` (no later reconcile sends
    them), as ``tests.support.jobs.scratch_org`` does."""
    from worker.db import unit_of_work
    from worker.models import Deployment, utcnow

    with unit_of_work() as s:
        stmt = select(Deployment).where(
            Deployment.organization_id == org_id, col(Deployment.status).not_in(FINAL)
        )
        for dep in s.exec(stmt).all():
            dep.status, dep.finished_at = "failure", utcnow()
            s.add(dep)
