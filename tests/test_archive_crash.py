"""A worker killed in the middle of an archive: the redelivered job finishes it (DESIGN, archive:
"a crash between any two steps is finished by the redelivered job").

A real ``celery worker`` (``WORKER_POOL=prefork``, ``--concurrency 1``) subprocess runs the
archive with its S3 traffic going through a proxy that holds DELETE requests. While the pool
child is frozen inside the job, it is SIGKILLed; ``task_acks_late`` +
``task_reject_on_worker_lost`` put the message back and a new child must finish the job. The
end state is compared with a clean run of a twin widget.

The subprocess has its own SQLite file and its own Redis database, so the session's in-process
worker cannot take its messages. The jobs are therefore committed the way DELETE /widgets/{id}
commits them (``mark_archived``) and sent by a producer bound to that Redis database, rather
than through the in-process API, whose producer is bound to the session's broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection
from sqlmodel import select

from api_stub.schemas.common import iso_utc
from tests.conftest import BUCKET, PROJECT_ROOT, migrate, reset_process_state
from tests.support.api import OrgClient, make_org_client
from tests.support.stall import StallingS3Proxy
from worker.celery import app
from worker.constants import ARCHIVE_QUEUE, ARCHIVE_TASK
from worker.db import unit_of_work
from worker.models import ArchivedWidget, ArchiveJob, Deployment, Widget, WidgetAsset, utcnow
from worker.processes import BIN_DIR, ManagedProcess, wait_until
from worker.s3 import get_store
from worker.services.archive import mark_archived
from worker.services.deploy import run_deployment
from worker.services.locking import lock_widget

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture(scope="module")
def crash_worker(
    services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("archive-crash")
    db_url = f"sqlite:///{logs / 'crash.db'}"
    migrate(db_url)
    broker = services["broker"].rsplit("/", 1)[0] + "/9"
    proxy = StallingS3Proxy(services["moto_url"])
    # The project's app and queues, on a connection to this worker's Redis database (the
    # CELERY_BROKER_URL variable would win over any broker_url given to a second app).
    conn = Connection(broker)
    queue = app.amqp.queues[ARCHIVE_QUEUE](conn.default_channel)
    queue.declare()
    queue.purge()
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "CELERY_BROKER_URL": broker,
        "S3_ENDPOINT_URL": proxy.url,
        "S3_READ_TIMEOUT": "120",  # a held request must not time out before the kill
        "WORKER_POOL": "prefork",  # the pool child is what is frozen and killed
    }
    cmd = [str(BIN_DIR / "celery"), "-A", "worker", "worker"]
    cmd += ["--concurrency", "1", "-Q", "archives", "--loglevel", "INFO"]
    cmd += ["-n", f"crash-{uuid.uuid4().hex[:8]}@%h", "--without-gossip", "--without-mingle"]
    worker = ManagedProcess("crash-worker", cmd, env, logs, PROJECT_ROOT)
    try:
        yield {"db_url": db_url, "proxy": proxy, "broker": conn, "worker": worker}
    finally:
        proxy.release()
        worker.stop()
        proxy.close()
        conn.close()


@pytest.fixture
def crash_org(crash_worker: dict[str, Any], api: Any) -> Iterator[OrgClient]:
    """An organization in the subprocess's database; the in-process code uses it too."""
    saved = os.environ["DATABASE_URL"]
    os.environ["DATABASE_URL"] = crash_worker["db_url"]
    reset_process_state()
    try:
        yield make_org_client(api)
    finally:
        crash_worker["proxy"].release()
        os.environ["DATABASE_URL"] = saved
        reset_process_state()


def pool_children(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def keys(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def make_widget(org: OrgClient, state: str) -> dict[str, Any]:
    w = org.widget([org.purpose()], [org.preference()], domain="crash.example.com")
    for i in range(2):
        files = {"file": (f"a{i}.png", PNG + bytes([i]), "image/png")}
        assert org.req("POST", f"/widgets/{w['id']}/assets", files=files).status_code == 201
    if state == "published":
        with unit_of_work() as s:
            dep = Deployment(organization_id=org.id, widget_id=w["id"], enqueued_at=utcnow())
            s.add(dep)
        out = run_deployment(org.id, w["id"], dep.deployment_id, store=get_store)
        assert out.status == "success"
    return w


def start_archive(crash_worker: dict[str, Any], org: OrgClient, widget_id: str) -> str:
    with unit_of_work() as s:  # what DELETE /widgets/{id} commits before it enqueues
        widget = lock_widget(s, org.id, widget_id)
        assert widget is not None
        job_id = mark_archived(s, widget).id
    kwargs = {"organization_id": org.id, "widget_id": widget_id, "archive_job_id": job_id}
    app.send_task(
        ARCHIVE_TASK, kwargs=kwargs, queue=ARCHIVE_QUEUE, connection=crash_worker["broker"]
    )
    return job_id


def job_row(job_id: str) -> ArchiveJob:
    with unit_of_work() as s:
        job = s.get(ArchiveJob, job_id)
        assert job is not None
        return job


def wait_final(crash_worker: dict[str, Any], job_id: str, timeout: float = 90) -> ArchiveJob:
    worker: ManagedProcess = crash_worker["worker"]

    def final() -> bool:
        assert worker.alive(), worker.log_tail()
        return job_row(job_id).status in ("success", "failure")

    try:
        wait_until(final, timeout, f"archive job {job_id}")
    except TimeoutError:
        pytest.fail(f"job {job_row(job_id)} not final; worker log:\n{worker.log_tail()}")
    return job_row(job_id)


def end_state(s3: Any, org: OrgClient, w: dict[str, Any], job_id: str) -> dict[str, Any]:
    """What a finished archive leaves, without ids and timestamps (comparable across widgets)."""
    job, widget_id = job_row(job_id), w["id"]
    with unit_of_work() as s:
        archived = s.get(ArchivedWidget, widget_id)
        assets = s.exec(select(WidgetAsset).where(WidgetAsset.widget_id == widget_id)).all()
        deps = s.exec(select(Deployment).where(Deployment.widget_id == widget_id)).all()
        return {
            "job": (job.status, job.result, job.error),
            "widget": s.get(Widget, widget_id) is not None,
            "archived": archived
            and (
                archived.name == w["name"],
                iso_utc(archived.widget_created_at) == w["created_at"],
                (archived.format, archived.template_id, archived.last_domain_used),
            ),
            "asset rows": len(assets),
            "asset objects": keys(s3, f"assets/{org.api_key}/{widget_id}/"),
            "container": keys(s3, org.container_key(widget_id)),
            "deployments": [(d.status, d.config is not None) for d in deps],
        }


@pytest.mark.parametrize(
    ("state", "held_delete"),
    [
        pytest.param("published", 0, id="published-killed-deleting-first-asset"),
        pytest.param("published", 2, id="published-killed-removing-container"),
        pytest.param("draft", 1, id="draft-killed-between-assets"),
    ],
)
def test_killed_pool_child_mid_archive_is_finished_by_redelivery(
    crash_worker, crash_org, s3, state, held_delete
):
    org, proxy, worker = crash_org, crash_worker["proxy"], crash_worker["worker"]
    clean_widget, crashed = make_widget(org, state), make_widget(org, state)

    clean_job = start_archive(crash_worker, org, clean_widget["id"])
    assert wait_final(crash_worker, clean_job).status == "success"
    clean = end_state(s3, org, clean_widget, clean_job)
    assert clean["job"] == ("success", "deleted" if state == "draft" else "archived", None)

    proxy.stall("DELETE", skip=held_delete)
    job_id = start_archive(crash_worker, org, crashed["id"])
    assert proxy.wait_held(60), f"archive never reached S3; worker log:\n{worker.log_tail()}"
    job = job_row(job_id)
    assert (job.status, job.attempts) == ("running", 1)
    with unit_of_work() as s:
        widget_present = s.get(Widget, crashed["id"]) is not None
        asset_rows = len(
            s.exec(select(WidgetAsset).where(WidgetAsset.widget_id == crashed["id"])).all()
        )
    # Where the child is frozen: assets go first, then the container file, and only then the
    # widget row, so the (archived, invisible) widget is still there at every S3 step.
    assert asset_rows == max(0, 2 - held_delete)
    assert widget_present

    (child,) = pool_children(worker.pid)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: pool_children(worker.pid) not in ([], [child]), 30, "a new pool child")
    proxy.release()

    job = wait_final(crash_worker, job_id)
    assert end_state(s3, org, crashed, job_id) == clean, worker.log_tail()
    assert job.attempts == 2, f"expected one redelivery; worker log:\n{worker.log_tail()}"
    assert "WorkerLostError" in worker.log_tail(20_000) or "SIGKILL" in worker.log_tail(20_000)
