"""Real ``celery -A worker worker`` (prefork) subprocesses on a Redis database of the test's own,
their S3 traffic going through a :class:`~tests.support.chaos_s3.ChaosS3Proxy` in front of the
session's moto server, and what they publish.

* :class:`Broker`: the test's Redis database (the session's in-process test worker, on database
  0, must not take these jobs), emptied before and after, with a producer on it;
* :func:`workers`: ``start(*celery_args)`` starts a worker on that database, all stopped by PID
  on the way out; :func:`ready` waits for them to answer a ping;
* :func:`enqueue`: deployment rows committed the way the API commits them, their messages sent
  to that database; :func:`wait_final` waits for the rows to be final;
* :func:`live_file` and :class:`SequenceReader`: the published file, read straight from moto
  (the ground truth).

Fixture bodies (``yield from``): :func:`own_broker`, :func:`chaos_proxy`, :func:`finishing_org`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from kombu import Connection
from kombu.pidbox import Mailbox
from sqlmodel import col, select

from tests.conftest import BUCKET, PROJECT_ROOT
from tests.support.api import OrgClient
from tests.support.chaos_s3 import ChaosS3Proxy
from worker.celery import app
from worker.constants import DEPLOY_QUEUE, DEPLOY_TASK
from worker.db import unit_of_work
from worker.models import FINAL_STATUSES, Deployment, Widget, utcnow
from worker.processes import BIN_DIR, ManagedProcess

WORKER_START_TIMEOUT = 120.0  # generous: a loaded 2-core machine starts Celery slowly


def without_identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "deployment_id"}


# -- broker, proxy, workers --------------------------------------------------------------------


class Broker:
    """A Redis database of its own, emptied before and after the test, and a producer on it."""

    def __init__(self, session_broker: str, db: int) -> None:
        self.url = session_broker.rsplit("/", 1)[0] + f"/{db}"
        self._redis = redis.Redis.from_url(self.url)
        self._redis.flushdb()
        self.conn = Connection(self.url)
        # The binding must exist before a message is sent, or Redis drops it.
        app.amqp.queues[DEPLOY_QUEUE](self.conn.default_channel).declare()

    def send_deploy(
        self, organization_id: str, widget_id: str, deployment_id: str, **options: Any
    ) -> None:
        kwargs = {
            "organization_id": organization_id,
            "widget_id": widget_id,
            "deployment_id": deployment_id,
        }
        app.send_task(
            DEPLOY_TASK, kwargs=kwargs, queue=DEPLOY_QUEUE, connection=self.conn, **options
        )

    def ping(self, name: str) -> bool:
        """``app.control.ping`` on this database (``app.control`` itself would publish through
        the app's producer pool, i.e. to the session's broker)."""
        mailbox = Mailbox(
            app.conf.control_exchange, type="fanout", accept=["json"], serializer="json"
        )(self.conn)
        replies = mailbox._broadcast("ping", reply=True, destination=[name], timeout=0.5)
        return any(reply.get(name) == {"ok": "pong"} for reply in replies or [])

    def close(self) -> None:
        self.conn.close()
        self._redis.flushdb()
        self._redis.close()


def own_broker(session_broker: str, db: int) -> Iterator[Broker]:
    """Body of a fixture: a :class:`Broker` on database ``db`` of the session's Redis."""
    b = Broker(session_broker, db)
    try:
        yield b
    finally:
        b.close()


def chaos_proxy(moto_url: str) -> Iterator[ChaosS3Proxy]:
    """Body of a fixture: a :class:`ChaosS3Proxy` in front of moto, closed after."""
    p = ChaosS3Proxy(moto_url, seed=20240611)
    try:
        yield p
    finally:
        p.close()


class Worker:
    def __init__(self, proc: ManagedProcess, name: str) -> None:
        self.proc, self.name = proc, name

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[int]:
        return pool_children(self.pid)

    def log(self, chars: int = 200_000) -> str:
        return self.proc.log_tail(chars)


StartWorker = Callable[..., Worker]


def ready(broker: Broker, *procs: Worker) -> None:
    """Wait until every worker answers a ping (they start in parallel)."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    for w in procs:
        while not broker.ping(w.name):
            assert w.proc.alive(), f"worker exited at start-up:\n{w.log(6000)}"
            assert time.monotonic() < deadline, f"worker not ready:\n{w.log(6000)}"


@contextlib.contextmanager
def workers(tmp_path: Path, broker: Broker, proxy: ChaosS3Proxy) -> Iterator[StartWorker]:
    """``start(*celery_args)`` starts a ``celery -A worker worker`` on ``broker`` whose S3 is
    ``proxy``; every process started is stopped by PID on the way out."""
    started: list[ManagedProcess] = []
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker.url,
        "S3_ENDPOINT_URL": proxy.url,
        "S3_READ_TIMEOUT": "60",  # a held response must not time out before the test moves on
        # Pool children are what these tests kill (--pool prefork would not override the
        # configured pool: worker.celery).
        "WORKER_POOL": "prefork",
    }
    env.pop("WORKER_CONCURRENCY", None)

    def start(*args: str, wait_ready: bool = True) -> Worker:
        name = f"chaos-{uuid.uuid4().hex[:8]}@test"
        cmd = [str(BIN_DIR / "celery"), "-A", "worker", "worker"]
        cmd += ["-Q", DEPLOY_QUEUE, "--loglevel", "INFO", "-n", name]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat", *args]
        proc = ManagedProcess(name.split("@")[0], cmd, env, tmp_path, PROJECT_ROOT)
        started.append(proc)
        worker = Worker(proc, name)
        if wait_ready:
            ready(broker, worker)
        return worker

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop()


def dead(pid: int) -> bool:
    """The process is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def pool_children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


# -- rows --------------------------------------------------------------------------------------


def finishing_org(org: OrgClient) -> Iterator[OrgClient]:
    """Body of a fixture: the ``org`` fixture; its deployments still unfinished after the test
    end ``failure``, so that no later reconcile of the shared database re-sends them."""
    yield org
    with unit_of_work() as s:
        stmt = select(Deployment).where(
            Deployment.organization_id == org.id, col(Deployment.status).not_in(FINAL_STATUSES)
        )
        for dep in s.exec(stmt).all():
            dep.status, dep.finished_at = "failure", utcnow()


def enqueue(
    broker: Broker, org: OrgClient, widget_id: str, count: int = 1, **options: Any
) -> list[str]:
    """``count`` deployments committed as the API commits them, then their messages sent
    (``options``: of ``send_task``)."""
    deps = [
        Deployment(organization_id=org.id, widget_id=widget_id, enqueued_at=utcnow())
        for _ in range(count)
    ]
    with unit_of_work() as s:
        s.add_all(deps)
    for dep in deps:
        broker.send_deploy(org.id, widget_id, dep.deployment_id, **options)
    return [d.deployment_id for d in deps]


def rows(dep_ids: list[str]) -> dict[str, Deployment]:
    with unit_of_work() as s:
        found = s.exec(select(Deployment).where(col(Deployment.deployment_id).in_(dep_ids))).all()
        return {d.deployment_id: d for d in found}


def widget_row(widget_id: str) -> Widget:
    with unit_of_work() as s:
        w = s.get(Widget, widget_id)
        assert w is not None
        return w


def wait_final(
    dep_ids: list[str], timeout: float, procs: list[Worker], proxy: ChaosS3Proxy
) -> dict[str, Deployment]:
    deadline = time.monotonic() + timeout
    while True:
        deps = rows(dep_ids)
        pending = [d for d in deps.values() if d.status not in FINAL_STATUSES]
        if not pending and len(deps) == len(dep_ids):
            return deps
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {w.name} ---\n{w.log(6000)}" for w in procs)
            pytest.fail(
                f"{len(pending)} of {len(dep_ids)} deployments not final after {timeout:.0f}s: "
                f"{[(d.deployment_id, d.status, d.attempts, d.error) for d in pending][:10]}\n"
                f"proxy: {dict(proxy.injected)}\n{logs}"
            )
        for w in procs:
            assert w.proc.alive(), f"worker {w.name} died:\n{w.log(6000)}"
        time.sleep(0.2)


# -- the published file ------------------------------------------------------------------------


def live_file(s3: Any, key: str) -> tuple[dict[str, Any], dict[str, str], str]:
    obj = s3.get_object(Bucket=BUCKET, Key=key)
    return json.loads(obj["Body"].read()), obj["Metadata"], obj["ETag"]


def object_exists(s3: Any, key: str) -> bool:
    try:
        s3.head_object(Bucket=BUCKET, Key=key)
    except s3.exceptions.ClientError:
        return False
    return True


class SequenceReader(threading.Thread):
    """Polls the object's ``sequence`` metadata straight from moto every ~20 ms."""

    def __init__(self, moto_url: str, key: str) -> None:
        super().__init__(name="sequence-reader", daemon=True)
        self.key = key
        self.s3 = boto3.client(
            "s3",
            endpoint_url=moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.seen: list[tuple[float, int, str]] = []  # (monotonic time, sequence, deployment)
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    meta = self.s3.head_object(Bucket=BUCKET, Key=self.key)["Metadata"]
                except self.s3.exceptions.ClientError as exc:
                    if exc.response["Error"]["Code"] not in ("404", "NoSuchKey", "NotFound"):
                        raise
                else:
                    seq, dep = int(meta["sequence"]), meta["deployment-id"]
                    if not self.seen or self.seen[-1][1:] != (seq, dep):
                        self.seen.append((time.monotonic(), seq, dep))
                self._stop_event.wait(0.02)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def backwards(self) -> list[tuple[tuple[int, str], tuple[int, str]]]:
        return [
            ((a[1], a[2]), (b[1], b[2])) for a, b in itertools.pairwise(self.seen) if b[1] < a[1]
        ]
