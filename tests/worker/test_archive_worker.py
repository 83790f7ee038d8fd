"""widgets.archive on a real worker, real S3 (moto) and a real database: the end state by status,
re-runs, S3 outages while deleting assets, the container file removed before the row (a failed
delete keeps the widget for a retry; a draft's leftover file goes too), and archives racing
deploys."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import signals
from sqlmodel import select

from api_stub.schemas.common import iso_utc
from tests.conftest import BUCKET
from tests.support.api import OrgClient
from tests.support.stall import StallingS3Proxy
from worker.celery import app
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import ArchivedWidget, ArchiveJob, Deployment, Widget, WidgetAsset, utcnow
from worker.s3 import S3Store, get_store
from worker.services.archive import mark_archived, run_archive
from worker.services.deploy import run_deployment
from worker.services.locking import lock_widget
from worker.settings import get_settings

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


def keys(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def wait_job(org: OrgClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = org.req("GET", f"/widgets/archive-jobs/{job_id}").json()
        if job["status"] in ("success", "failure") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def rows(widget_id: str) -> dict[str, Any]:
    """Everything the database holds about one widget id, as plain values."""
    with unit_of_work() as s:
        w = s.get(Widget, widget_id)
        archived = s.get(ArchivedWidget, widget_id)
        return {
            "widget": w.model_dump() if w else None,
            "assets": [
                a.model_dump()
                for a in s.exec(select(WidgetAsset).where(WidgetAsset.widget_id == widget_id))
            ],
            "archived": archived.model_dump() if archived else None,
            "jobs": [
                j.model_dump()
                for j in s.exec(select(ArchiveJob).where(ArchiveJob.widget_id == widget_id)).all()
            ],
            "deployments": [
                d.model_dump()
                for d in s.exec(select(Deployment).where(Deployment.widget_id == widget_id)).all()
            ],
        }


def widget_with_assets(org: OrgClient, state: str, n_assets: int = 2) -> dict[str, Any]:
    w = org.widget([org.purpose()], [org.preference()], domain="www.example.com")
    for i in range(n_assets):
        files = {"file": (f"a{i}.png", PNG + bytes([i]), "image/png")}
        assert org.req("POST", f"/widgets/{w['id']}/assets", files=files).status_code == 201
    if state != "draft":
        assert org.wait_deployment(org.deploy(w["id"])["id"])["status"] == "success"
    if state == "unpublished_changes":
        r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": "edited"})
        assert r.json()["publication_status"] == "unpublished_changes"
    return org.req("GET", f"/widgets/{w['id']}").json()


@pytest.mark.parametrize("state", ["draft", "published", "unpublished_changes"])
def test_archive_end_state_by_status(sqlite_database, org, celery_worker, s3, state):
    w = widget_with_assets(org, state)
    deployed = rows(w["id"])["deployments"]
    assert len(rows(w["id"])["assets"]) == 2

    r = org.req("DELETE", f"/widgets/{w['id']}")
    assert r.status_code == 202, r.text
    job = wait_job(org, r.json()["id"])
    assert (job["status"], job["error"]) == ("success", None), job
    assert job["result"] == ("deleted" if state == "draft" else "archived")

    again = org.req("DELETE", f"/widgets/{w['id']}")  # idempotent once done, too
    assert (again.status_code, again.json()["id"]) == (202, job["id"])
    after = rows(w["id"])
    assert after["widget"] is None and after["assets"] == []
    assert keys(s3, f"assets/{org.api_key}/") == []
    assert keys(s3, f"configs/{org.api_key}/") == []
    assert after["deployments"] == deployed  # never touched by archiving
    if state == "draft":
        assert after["archived"] is None and deployed == []
        return
    a = after["archived"]
    # The archived copy is the widget as last published: unpublished edits (the rename) are lost.
    published_name = deployed[-1]["config"]["widget"]["name"]
    assert published_name != "edited"
    assert (a["organization_id"], a["name"], a["format"]) == (org.id, published_name, w["format"])
    assert (a["template_id"], a["last_domain_used"]) == (w["template_id"], "www.example.com")
    assert iso_utc(a["widget_created_at"]) == w["created_at"]
    # docs/semantics.md: the latest deployment of an archived widget holds its configuration.
    listed = org.req("GET", "/widgets/deployments", params={"widget_id": w["id"]}).json()
    assert [d["id"] for d in listed] == [d["id"] for d in deployed]
    latest = listed[-1]
    assert latest["status"] == "success" and latest["config"] == deployed[-1]["config"]
    assert latest["config"]["widget_id"] == w["id"]
    # Published: the live content; unpublished changes: the content before the edit.
    assert (latest["config"]["widget"]["name"] == w["name"]) is (state == "published")


def run_task(kwargs: dict[str, Any], timeout: float = 60) -> Any:
    """Send ``widgets.archive`` like any producer would and wait until the worker has run it."""
    done: dict[str, Any] = {}
    finished = threading.Event()
    msg_id = new_id()

    def on_postrun(task_id: str, retval: Any = None, state: str = "", **_: Any) -> None:
        if task_id == msg_id:
            done.update(retval=retval, state=state)
            finished.set()

    signals.task_postrun.connect(on_postrun, weak=False)
    try:
        app.send_task("widgets.archive", kwargs=kwargs, queue="archives", task_id=msg_id)
        assert finished.wait(timeout), "the worker did not run the re-sent message"
    finally:
        signals.task_postrun.disconnect(on_postrun)
    return done


@pytest.mark.parametrize("state", ["draft", "published"])
@pytest.mark.parametrize("with_job_id", [True, False])
def test_rerun_after_success_changes_nothing(
    sqlite_database, org, celery_worker, s3, state, with_job_id
):
    w = widget_with_assets(org, state, n_assets=1)
    r = org.req("DELETE", f"/widgets/{w['id']}")
    job = wait_job(org, r.json()["id"])
    assert job["status"] == "success", job
    before, objects = rows(w["id"]), keys(s3, f"configs/{org.api_key}/")

    kwargs = {"organization_id": org.id, "widget_id": w["id"]}
    if with_job_id:
        kwargs["archive_job_id"] = job["id"]
    done = run_task(kwargs)
    assert done["state"] == "SUCCESS"
    assert done["retval"]["archive_job_id"] == job["id"]
    assert (done["retval"]["status"], done["retval"]["result"]) == ("success", job["result"])
    assert rows(w["id"]) == before
    assert keys(s3, f"configs/{org.api_key}/") == objects
    assert keys(s3, f"assets/{org.api_key}/") == []
    assert wait_job(org, job["id"]) == job


def test_s3_outage_while_deleting_draft_assets_retries_without_orphans(
    sqlite_database, org, celery_worker, s3, s3_faults
):
    w = widget_with_assets(org, "draft", n_assets=2)
    asset_keys = [a["s3_key"] for a in rows(w["id"])["assets"]]
    violations: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Database first, then the bucket: objects and rows only ever disappear, so an object
        # still listed after its row (or the widget) was seen gone was orphaned at that moment.
        while not stop.is_set():
            with unit_of_work() as s:
                widget_gone = s.get(Widget, w["id"]) is None
                known = set(s.exec(select(WidgetAsset.s3_key)).all())
            left = keys(s3, f"assets/{org.api_key}/{w['id']}/")
            for key in left:
                if widget_gone or key not in known:
                    violations.append(f"{key} on S3 with widget_gone={widget_gone}")
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    s3_faults.fail_next("DELETE", 503, times=5)  # > 3 botocore attempts: a Celery retry
    watcher.start()
    try:
        r = org.req("DELETE", f"/widgets/{w['id']}")
        job = wait_job(org, r.json()["id"], timeout=90)
    finally:
        stop.set()
        watcher.join(10)
    assert (job["status"], job["result"]) == ("success", "deleted"), job
    assert job["attempts"] >= 2  # the first delivery gave up on S3 and was retried
    assert s3_faults.count("DELETE", 503) == 5
    assert violations == []
    after = rows(w["id"])
    assert after["widget"] is None and after["assets"] == []
    assert [k for k in asset_keys if keys(s3, k)] == []


def published(org: OrgClient, **body: Any) -> dict[str, Any]:
    w = org.widget(**body)
    dep = org.wait_deployment(org.deploy(w["id"])["id"])
    assert dep["status"] == "success", dep
    return w


def test_archive_keeps_the_widget_when_the_container_delete_fails(
    sqlite_database, org, celery_worker, s3, s3_faults
):
    w = published(org)
    key = org.container_key(w["id"])
    assert keys(s3, key)
    s3_faults.fail_next("DELETE", 403)  # no assets: the first DELETE is the container file
    first = org.req("DELETE", f"/widgets/{w['id']}")
    assert first.status_code == 202, first.text
    job = wait_job(org, first.json()["id"])
    assert job["status"] == "failure", job
    assert s3_faults.count("DELETE", 403) == 1
    row = rows(w["id"])["widget"]
    assert row is not None and row["archived_at"] is not None  # still there for a retry
    assert org.req("GET", f"/widgets/{w['id']}").status_code == 404
    assert keys(s3, key)

    again = org.req("DELETE", f"/widgets/{w['id']}")
    assert again.status_code == 202, again.text
    assert again.json()["id"] != job["id"]
    retried = wait_job(org, again.json()["id"])
    assert (retried["status"], retried["result"]) == ("success", "archived"), retried
    assert not keys(s3, key)
    assert rows(w["id"])["widget"] is None
    assert org.req("GET", f"/widgets/archived/{w['id']}").status_code == 200


def test_archive_of_a_draft_removes_a_leftover_container_file(
    sqlite_database, org, celery_worker, s3
):
    w = org.widget()
    key = org.container_key(w["id"])
    # A first deploy killed between its upload and its commit: bytes on S3, the widget a draft.
    s3.put_object(Bucket=BUCKET, Key=key, Body=b'{"leftover": true}')
    job = wait_job(org, org.req("DELETE", f"/widgets/{w['id']}").json()["id"])
    assert (job["status"], job["result"]) == ("success", "deleted"), job
    assert not keys(s3, key)


# --- archive racing a deploy: the real service functions, in a controlled order -------------


def queue_deployment(org_id: str, widget_id: str) -> str:
    """What POST /widgets/deployments commits before enqueueing (the message is not sent)."""
    with unit_of_work() as s:
        dep = Deployment(organization_id=org_id, widget_id=widget_id, enqueued_at=utcnow())
        s.add(dep)
        return dep.deployment_id


def request_archive(org_id: str, widget_id: str) -> str:
    """What DELETE /widgets/{id} commits before enqueueing (the message is not sent)."""
    with unit_of_work() as s:
        widget = lock_widget(s, org_id, widget_id)
        assert widget is not None
        return mark_archived(s, widget).id


def deploy(org_id: str, widget_id: str, dep_id: str, store: Any = get_store) -> Any:
    return run_deployment(org_id, widget_id, dep_id, store=store)


def deployment(dep_id: str) -> Deployment:
    with unit_of_work() as s:
        dep = s.exec(select(Deployment).where(Deployment.deployment_id == dep_id)).one()
        return dep


def edited_published_widget(org: OrgClient) -> dict[str, Any]:
    w = org.widget([org.purpose()], [org.preference()])
    assert deploy(org.id, w["id"], queue_deployment(org.id, w["id"])).status == "success"
    assert org.req("PATCH", f"/widgets/{w['id']}", json={"name": "v2"}).status_code == 200
    return w


def assert_archived_without_container(org: OrgClient, s3: Any, widget_id: str) -> None:
    state = rows(widget_id)
    assert state["widget"] is None and state["archived"] is not None
    assert [j["status"] for j in state["jobs"]] == ["success"]
    assert keys(s3, org.container_key(widget_id)) == []


def test_deploy_finished_before_archive(database, org, s3):
    w = edited_published_widget(org)
    dep_id = queue_deployment(org.id, w["id"])
    assert deploy(org.id, w["id"], dep_id).published
    assert keys(s3, org.container_key(w["id"])) == [org.container_key(w["id"])]
    job_id = request_archive(org.id, w["id"])
    assert run_archive(org.id, w["id"], job_id, store=get_store).result == "archived"
    assert_archived_without_container(org, s3, w["id"])
    dep = deployment(dep_id)
    assert dep.status == "success" and dep.config and dep.config["widget"]["name"] == "v2"


def test_deploy_queued_when_archived_fails_and_publishes_nothing(database, org, s3, s3_faults):
    w = edited_published_widget(org)
    dep_id = queue_deployment(org.id, w["id"])
    job_id = request_archive(org.id, w["id"])
    s3_faults.clear()
    out = deploy(org.id, w["id"], dep_id)
    assert out.status == "failure" and "archived" in (out.error or "")
    assert s3_faults.count("PUT") == 0
    run_archive(org.id, w["id"], job_id, store=get_store)
    assert_archived_without_container(org, s3, w["id"])
    assert deployment(dep_id).status == "failure"


def test_deploy_run_after_archive_completed_says_archived(sqlite_database, org, s3):
    w = edited_published_widget(org)
    dep_id = queue_deployment(org.id, w["id"])
    run_archive(org.id, w["id"], request_archive(org.id, w["id"]), store=get_store)
    out = deploy(org.id, w["id"], dep_id)
    assert keys(s3, org.container_key(w["id"])) == []
    assert out.status == "failure"
    assert "archived" in (out.error or ""), out.error


@pytest.fixture
def stalled_store(services: dict[str, Any]) -> Iterator[tuple[StallingS3Proxy, S3Store]]:
    """An S3 store whose requests go through a proxy that can hold them."""
    proxy = StallingS3Proxy(services["moto_url"])
    store = S3Store(get_settings().model_copy(update={"s3_endpoint_url": proxy.url}))
    try:
        yield proxy, store
    finally:
        proxy.release()
        store.close()
        proxy.close()


def test_archive_does_not_wait_for_a_stalled_upload_and_no_container_survives(
    database, org, s3, stalled_store
):
    proxy, store = stalled_store
    w = edited_published_widget(org)
    dep_id = queue_deployment(org.id, w["id"])
    results: dict[str, Any] = {}
    proxy.stall("PUT")
    deployer = threading.Thread(
        target=lambda: results.update(dep=deploy(org.id, w["id"], dep_id, lambda: store))
    )
    deployer.start()
    try:
        assert proxy.wait_held(30), "the deploy never reached its upload"
        # No lock is held across the upload: the whole archive runs while the PUT is held.
        job_id = request_archive(org.id, w["id"])
        arc = run_archive(org.id, w["id"], job_id, store=get_store)
        assert (arc.status, arc.result) == ("success", "archived")
        assert deployer.is_alive(), "the upload was not in flight during the archive"
    finally:
        proxy.release()
    deployer.join(60)
    # The held PUT was conditional on the file the archive removed: it cannot bring it back.
    assert results["dep"].status == "failure" and "archived" in (results["dep"].error or "")
    assert_archived_without_container(org, s3, w["id"])


def race(org_id: str, widget_id: str, dep_id: str) -> dict[str, Any]:
    """Start the deploy and the archive (request + run) of one widget at the same instant."""
    start, results = threading.Barrier(2), {}

    def do_deploy() -> None:
        start.wait()
        results["dep"] = deploy(org_id, widget_id, dep_id)

    def do_archive() -> None:
        start.wait()
        job_id = request_archive(org_id, widget_id)
        results["arc"] = run_archive(org_id, widget_id, job_id, store=get_store)

    threads = [threading.Thread(target=do_deploy), threading.Thread(target=do_archive)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_archive_and_deploy_concurrently_never_leave_a_container(database, org, s3):
    for _ in range(4):
        w = edited_published_widget(org)
        dep_id = queue_deployment(org.id, w["id"])
        results = race(org.id, w["id"], dep_id)
        assert (results["arc"].status, results["arc"].result) == ("success", "archived")
        assert_archived_without_container(org, s3, w["id"])
        dep = deployment(dep_id)
        assert dep.status in ("success", "failure")
        if dep.status == "failure":
            assert dep.error and "archived" in dep.error
