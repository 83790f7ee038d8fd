"""The publish path under faults, with real ``celery -A worker worker`` (prefork) subprocesses.

Each test starts its own worker process(es) on a Redis database of this module's own (the
session's in-process test worker, on database 0, must not take these jobs), with their S3
traffic going through a :class:`~tests.support.chaos_s3.ChaosS3Proxy` in front of the session's
moto server, and stops them by PID at the end. Deployment rows are committed the way the API
commits them and the messages are sent to that Redis database; widgets and their edits go
through the in-process API. The published file is read straight from moto (the ground truth).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
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
from worker.processes import BIN_DIR, ManagedProcess, wait_until

pytestmark = pytest.mark.e2e

# This module's own Redis database (test_e2e and test_archive_crash use 9; the session, 0).
BROKER_DB = 11
WORKER_START_TIMEOUT = 120.0  # generous: a loaded 2-core machine starts Celery slowly
REFUSAL_TIMEOUT = 60.0


def _without_identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "deployment_id"}


# -- broker, proxy, workers --------------------------------------------------------------------


class Broker:
    """A Redis database of its own, emptied before and after the test, and a producer on it."""

    def __init__(self, session_broker: str) -> None:
        self.url = session_broker.rsplit("/", 1)[0] + f"/{BROKER_DB}"
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


@pytest.fixture
def broker(services: dict[str, Any]) -> Iterator[Broker]:
    b = Broker(services["broker"])
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def proxy(services: dict[str, Any]) -> Iterator[ChaosS3Proxy]:
    p = ChaosS3Proxy(services["moto_url"], seed=20240611)
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
    }
    env.pop("WORKER_CONCURRENCY", None)

    def start(*args: str, wait_ready: bool = True) -> Worker:
        name = f"chaos-{uuid.uuid4().hex[:8]}@test"
        cmd = [str(BIN_DIR / "celery"), "-A", "worker", "worker", "--pool", "prefork"]
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


@pytest.fixture
def chaos_org(org: OrgClient) -> Iterator[OrgClient]:
    """The ``org`` fixture; its deployments still unfinished after the test end ``failure``, so
    that no later reconcile of the shared database re-sends them."""
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


# -- tests -------------------------------------------------------------------------------------


def test_concurrent_deploys_of_one_widget_never_move_the_file_backwards(
    database, chaos_org, services, broker, proxy, s3, tmp_path
):
    org = chaos_org
    rng = random.Random(7)
    with workers(tmp_path, broker, proxy) as start:
        procs = [start("--concurrency", "4", wait_ready=False) for _ in range(2)]
        w = org.widget([org.purpose()])  # while the workers start
        key = org.container_key(w["id"])
        reader = SequenceReader(services["moto_url"], key)
        ready(broker, *procs)
        # Faults only once both workers are up (their start-up probe is not under test here).
        proxy.chaos({"PUT", "HEAD"}, p=0.2, delay_ms=(0, 80), seed=11)
        reader.start()
        try:
            dep_ids: list[str] = []
            for i in range(30):
                if rng.random() < 0.7:  # some consecutive deploys share their content
                    name = f"chaos-{i}-{uuid.uuid4().hex[:4]}"
                    r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": name})
                    assert r.status_code == 200, r.text
                dep_ids += enqueue(broker, org, w["id"])
                time.sleep(rng.uniform(0.02, 0.12))  # freezes interleave with the edits
            deps = wait_final(dep_ids, 150, procs, proxy)
            faults = dict(proxy.injected)
        finally:
            proxy.calm()
            time.sleep(0.1)
            reader.stop()
        for p in procs:
            assert p.proc.alive(), p.log(6000)

    assert reader.error is None, repr(reader.error)
    # The faults landed while the deploys were in flight (chaos was on until all were final).
    assert sum(faults.values()) >= 1, f"no fault was injected: {proxy.requests}"
    failed = {d.deployment_id: d.error for d in deps.values() if d.status != "success"}
    assert failed == {}, f"faults are transient, nothing may fail: {failed}"
    assert reader.seen, "the reader never saw the file"
    assert reader.backwards() == [], f"the file moved backwards: {reader.seen}"

    newest = max(deps.values(), key=lambda d: d.sequence or 0)
    assert newest.sequence is not None and newest.config is not None
    assert sorted(d.sequence for d in deps.values()) == list(
        range(newest.sequence - 29, newest.sequence + 1)
    )
    body, meta, _ = live_file(s3, key)
    # The newest snapshot's content is what websites see.
    assert _without_identity(body) == _without_identity(newest.config)
    assert meta["content-sha256"] == newest.content_checksum
    # The file is the one its metadata names: that deployment's bytes and sequence. It is the
    # newest deployment itself unless the newest had the same content (then nothing is uploaded
    # again): either way a deployment of the newest content.
    writer = deps[meta["deployment-id"]]
    assert body == writer.config
    assert int(meta["sequence"]) == writer.sequence
    assert writer.content_checksum == newest.content_checksum
    assert (reader.seen[-1][1], reader.seen[-1][2]) == (writer.sequence, writer.deployment_id)
    # The record moved to the newest sequence and names the file (or one of equal content).
    widget = widget_row(w["id"])
    assert widget.live_seq == newest.sequence
    assert widget.live_deployment_id is not None
    recorded = deps[widget.live_deployment_id]
    assert widget.live_deployment_id == meta["deployment-id"] or (
        recorded.content_checksum == meta["content-sha256"]
    )
    # Every deployment names the deployment whose file was live when it finished (itself, the
    # one it coalesced into, or the writer of the file that overtook it).
    for d in deps.values():
        assert d.live_deployment_id in deps, d
        assert deps[d.live_deployment_id].status == "success", d

    # Sequences order the snapshots: a higher sequence never carries an older widget version,
    # else "the highest sequence wins" publishes an edit that was already superseded and
    # websites see the widget go back to an older version while the sequence moves forward.
    seen_versions = [(seq, deps[dep].widget_version) for _, seq, dep in reader.seen]
    went_back = [(a, b) for a, b in itertools.pairwise(seen_versions) if (b[1] or 0) < (a[1] or 0)]
    by_seq = sorted(deps.values(), key=lambda d: d.sequence or 0)
    inversions = [
        (a.sequence, a.widget_version, b.sequence, b.widget_version)
        for a, b in itertools.pairwise(by_seq)
        if (b.widget_version or 0) < (a.widget_version or 0)
    ]
    assert (inversions, went_back) == ([], []), (
        f"(sequence, version, next sequence, its version) out of order: {inversions}; "
        f"(sequence, version) pairs of the live file that went back: {went_back}; "
        f"the live file's (sequence, version) over time: {seen_versions}"
    )


def test_burst_of_one_widget_coalesces(sqlite_database, chaos_org, broker, proxy, s3, tmp_path):
    org = chaos_org
    with workers(tmp_path, broker, proxy) as start:
        worker = start(wait_ready=False)  # default concurrency: 4 per core, at least 4
        w = org.widget([org.purpose()], [org.preference()])
        key = org.container_key(w["id"])
        ready(broker, worker)
        children = len(worker.children())
        dep_ids = enqueue(broker, org, w["id"], count=100)
        deps = wait_final(dep_ids, 120, [worker], proxy)
    assert children >= 4, f"expected the default pool size, got {children} children"
    statuses = {d.status for d in deps.values()}
    assert statuses == {"success"}, [(d.status, d.error) for d in deps.values() if d.error]
    puts = proxy.count("PUT", key=key)
    by_status = {
        status: proxy.count("PUT", key=key, status=status) for status in (200, 412, 409, 500)
    }
    t0 = proxy.journal[0][0] if proxy.journal else 0
    writes = [
        (round(t - t0, 3), status, note)
        for t, method, path, status, note in proxy.journal
        if method == "PUT" and path.endswith(key)
    ]
    assert 1 <= puts <= 10, (
        f"{puts} PUTs of {key} for 100 deploys of one snapshot: {by_status}\n"
        + ("\n".join(map(str, writes)))
    )
    newest = max(deps.values(), key=lambda d: d.sequence or 0)
    assert newest.sequence == widget_row(w["id"]).live_seq
    assert newest.config is not None
    body, meta, _ = live_file(s3, key)
    assert _without_identity(body) == _without_identity(newest.config)
    assert body == deps[meta["deployment-id"]].config


def test_worker_refuses_a_store_that_ignores_conditional_writes(
    sqlite_database, services, broker, proxy, tmp_path
):
    """The same command against a store that drops ``If-None-Match`` (refused: exit 2, one
    ``error:`` line) and against one that honours it (stays up). Both start at once."""
    proxy.strip_conditional_headers = True
    honest = ChaosS3Proxy(services["moto_url"])
    try:
        with (
            workers(tmp_path, broker, proxy) as start_stripped,
            workers(tmp_path, broker, honest) as start_honest,
        ):
            refused = start_stripped("--concurrency", "1", wait_ready=False)
            accepted = start_honest("--concurrency", "1", wait_ready=False)
            t0 = time.monotonic()
            try:
                # ~10 s on an idle 2-core machine (Celery's start-up); room for a loaded one.
                code = refused.proc.proc.wait(timeout=REFUSAL_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not exit within {REFUSAL_TIMEOUT}s:\n{refused.log()}")
            took = time.monotonic() - t0
            output = refused.log()
            ready(broker, accepted)  # past its start-up probe: it answers a ping
            time.sleep(1)
            assert accepted.proc.alive(), accepted.log(6000)
            assert broker.ping(accepted.name), accepted.log(6000)
            accepted_log = accepted.log()
    finally:
        honest.close()
    assert code == 2, f"exit code {code} after {took:.1f}s:\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "conditional writes" in errors[0], errors
    assert "Traceback" not in output, output
    # The probe's conditional writes reached the store without their condition, and were taken.
    assert proxy.stripped >= 2 and proxy.count("PUT", status=200) >= 2
    assert proxy.count("PUT", status=412) == 0
    # The honest store refused the accepted worker's second probe write, as it must.
    assert honest.stripped == 0 and honest.count("PUT", status=412) >= 1
    assert "error:" not in accepted_log, accepted_log[-6000:]


def test_hard_time_limit_after_the_upload_ends_with_db_agreeing_with_s3(
    sqlite_database, chaos_org, broker, proxy, s3, tmp_path
):
    """The upload lands on S3, its response never comes back, the hard time limit kills the
    child; the requeued message's delivery finds its own file and records ``success``.

    The 4 s limit is the message's own (``time_limit``/``soft_time_limit`` of ``send_task``), not
    ``celery worker --time-limit 4``: the app's configured limits (45 s soft, 60 s hard) become
    the task's defaults, which Celery prefers to the worker's command-line limits; and the
    prefork pool arms the hard timer only when the soft one fires, so the soft limit must not be
    above the hard one. With both at 4 s the pool signals the soft limit and kills the child
    right after, before the child can finish the task (its upload's response is held)."""
    org = chaos_org
    with workers(tmp_path, broker, proxy) as start:
        worker = start("--concurrency", "1", wait_ready=False)
        w = org.widget([org.purpose()])
        key = org.container_key(w["id"])
        ready(broker, worker)
        (child,) = worker.children()
        proxy.hold_responses("PUT")
        try:
            (dep_id,) = enqueue(broker, org, w["id"], time_limit=4, soft_time_limit=4)
            assert proxy.wait_held(60), f"the deploy never uploaded:\n{worker.log(6000)}"
            wait_until(lambda: object_exists(s3, key), 10, "the held upload to land on moto")
            assert proxy.held == 1, "the upload's response must still be held"
            started = rows([dep_id])[dep_id]
            assert (started.status, started.attempts) == ("running", 1)
            assert started.started_at is not None
            wait_until(lambda: dead(child), 30, "the hard time limit to kill the child")
            killed_after = utcnow() - started.started_at
            assert proxy.held == 1, "the child must die while its upload's response is held"
        finally:
            proxy.release()
        deps = wait_final([dep_id], 60, [worker], proxy)
        log = worker.log()
    assert killed_after >= timedelta(seconds=3.5), killed_after
    assert re.search(r"Hard time limit \(4(\.0)?s\) exceeded", log), log[-6000:]
    dep = deps[dep_id]
    assert dep.status == "success", (dep.status, dep.error, log[-6000:])
    assert dep.attempts >= 2, (dep.attempts, log[-6000:])
    widget = widget_row(w["id"])
    body, meta, etag = live_file(s3, key)
    assert widget.live_deployment_id == dep_id
    assert meta["deployment-id"] == dep_id
    assert (widget.live_seq, widget.live_etag) == (dep.sequence, etag)
    assert body == dep.config
    # One write: the redelivery found the file (its If-None-Match PUT was refused) and kept it.
    assert proxy.count("PUT", key=key, status=200) == 1
    assert proxy.count("PUT", key=key, status=412) >= 1


def test_killed_child_mid_upload_loses_nothing(
    sqlite_database, chaos_org, broker, proxy, s3, tmp_path
):
    org = chaos_org
    with workers(tmp_path, broker, proxy) as start:
        worker = start("--concurrency", "2", wait_ready=False)
        purpose = org.purpose()
        widgets = [org.widget([purpose], name=f"killed-{i}") for i in range(10)]
        ready(broker, worker)
        before = worker.children()
        assert len(before) == 2
        proxy.hold_responses("PUT")
        try:
            dep_ids = [enqueue(broker, org, w["id"])[0] for w in widgets]
            # Both children are frozen after their upload landed: either one is mid-upload.
            assert proxy.wait_held(60, count=2), f"uploads not held:\n{worker.log(6000)}"
            assert proxy.held == 2
            victim = before[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: dead(victim), 10, "the pool child to die")
        finally:
            proxy.release()
        deps = wait_final(dep_ids, 90, [worker], proxy)
        log = worker.log()
    assert "WorkerLostError" in log or "SIGKILL" in log, log[-6000:]
    assert {d.status for d in deps.values()} == {"success"}, [
        (d.deployment_id, d.status, d.error) for d in deps.values()
    ]
    redelivered = [d for d in deps.values() if d.attempts >= 2]
    assert redelivered, "the killed child's deployment was not redelivered"
    for w, dep_id in zip(widgets, dep_ids, strict=True):
        dep = deps[dep_id]
        body, meta, etag = live_file(s3, org.container_key(w["id"]))
        assert body == dep.config and body["widget"]["name"] == w["name"]
        assert meta["deployment-id"] == dep_id and int(meta["sequence"]) == dep.sequence
        assert dep.live_deployment_id == dep_id
        widget = widget_row(w["id"])
        assert (widget.live_deployment_id, widget.live_etag) == (dep_id, etag)
        # Exactly one write per file: the redelivery adopted the upload that had landed.
        assert proxy.count("PUT", key=org.container_key(w["id"]), status=200) == 1, dep_id
