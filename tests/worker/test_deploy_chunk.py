"""worker.services.deploy_chunk: a bulk redeploy's chunk, frozen in one transaction, published
concurrently, with whatever reaches no outcome handed back to single deploys. Against the real
databases and moto (through the fault proxy where a test needs a fault); the chunk runs in this
process. End to end through the worker: ``test_bulk_redeploy.py``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlmodel import select

from bench.statements import counting
from tests.conftest import BUCKET
from worker.db import get_engine, unit_of_work
from worker.ids import UnsafeIdentifierError
from worker.models import Deployment, utcnow
from worker.s3 import get_store
from worker.services import chunking, deploy_chunk
from worker.services.deploy import run_deployment
from worker.settings import get_settings


def queue(org_id: str, widget_id: str) -> str:
    dep = Deployment(organization_id=org_id, widget_id=widget_id, enqueued_at=utcnow())
    with unit_of_work() as s:
        s.add(dep)
    return dep.deployment_id


def chunk_of(org: Any, n: int) -> list[tuple[str, str]]:
    widgets = sorted(org.widget([org.purpose()])["id"] for _ in range(n))
    return [(w, queue(org.id, w)) for w in widgets]


def row(deployment_id: str) -> Deployment:
    with unit_of_work() as s:
        dep = s.exec(select(Deployment).where(Deployment.deployment_id == deployment_id)).one()
        return dep


def live_file(s3: Any, org: Any, widget_id: str) -> dict[str, Any]:
    obj = s3.get_object(Bucket=BUCKET, Key=org.container_key(widget_id))
    return dict(json.loads(obj["Body"].read()))


class HandedBack(list[str]):
    def __call__(self, organization_id: str, widget_id: str, deployment_id: str) -> None:
        self.append(deployment_id)


def test_a_chunk_is_frozen_in_one_transaction_and_publishes_every_widget(database, org, s3):
    items = chunk_of(org, 5)
    back = HandedBack()
    with counting(get_engine(), this_thread=True) as seen:
        report = deploy_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert back == [] and not report.whole_chunk_handed_back
    assert [o.status for o in report.outcomes] == ["success"] * 5, report
    # One freeze for the chunk, then each deployment's record: 6 transactions, not 10.
    assert seen.begins == 1 + len(items), seen.breakdown()
    for widget_id, deployment_id in items:
        assert live_file(s3, org, widget_id)["deployment_id"] == deployment_id
        dep = row(deployment_id)
        assert (dep.status, dep.attempts, dep.live_deployment_id) == (
            "success",
            1,
            deployment_id,
        )
    sequences = {row(d).sequence for _, d in items}
    assert sequences == {1}, sequences  # each widget's own first sequence


def test_the_publishes_of_a_chunk_run_on_the_process_threads(database, org, s3):
    items = chunk_of(org, chunking.CONCURRENCY + 3)
    back = HandedBack()
    report = deploy_chunk.run_chunk(org.id, items, get_store, back)  # the default: threads
    assert back == [] and sorted(o.deployment_id for o in report.outcomes) == sorted(
        d for _, d in items
    )
    assert {o.status for o in report.outcomes} == {"success"}
    for widget_id, deployment_id in items:
        assert live_file(s3, org, widget_id)["deployment_id"] == deployment_id


def test_an_upload_that_keeps_failing_is_handed_back_to_a_single_deploy(
    sqlite_database, org, s3, s3_faults
):
    items = chunk_of(org, 3)
    first_widget, first = items[0]
    # Every attempt botocore makes for the first upload (in order) fails: transient, not retried
    # inside the chunk.
    attempts = get_settings().s3_max_attempts
    s3_faults.fail_next("PUT", 503, times=attempts)
    back = HandedBack()
    report = deploy_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert s3_faults.count("PUT", 503) == attempts  # the fault landed, on the first upload
    assert back == [first]
    assert sorted(o.deployment_id for o in report.outcomes) == sorted(d for _, d in items[1:])
    assert (row(first).status, row(first).sequence) == ("running", 1)  # frozen, not finished
    # The single deploy it was handed to (its message) finishes it as a redelivery.
    done = run_deployment(org.id, first_widget, first, store=get_store)
    assert (done.status, done.published) == ("success", True), done
    assert row(first).attempts == 2
    assert live_file(s3, org, first_widget)["deployment_id"] == first


def test_a_permanent_upload_error_fails_that_deployment_at_once_as_a_single_deploy_would(
    sqlite_database, org, s3, s3_faults
):
    items = chunk_of(org, 3)
    first_widget, first = items[0]
    s3_faults.fail_next("PUT", 403)  # AccessDenied: no retry fixes it
    back = HandedBack()
    report = deploy_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert s3_faults.count("PUT", 403) == 1  # the fault landed, on the first upload
    assert back == []  # not handed back: a single deploy would fail it the same way
    statuses = {o.deployment_id: o.status for o in report.outcomes}
    assert statuses == {first: "failure", items[1][1]: "success", items[2][1]: "success"}
    assert "AccessDenied" in (row(first).error or "") or "403" in (row(first).error or "")
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object(Bucket=BUCKET, Key=org.container_key(first_widget))


def test_a_chunk_redelivered_after_its_freeze_publishes_each_widget_once(
    sqlite_database, org, s3, s3_faults
):
    items = chunk_of(org, 4)
    deploy_chunk._freeze_chunk(org.id, items)  # the first delivery died right after its commit
    s3_faults.clear()
    back = HandedBack()
    report = deploy_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert back == [] and {o.status for o in report.outcomes} == {"success"}
    assert s3_faults.count("PUT") == len(items)  # one upload each, none twice
    for widget_id, deployment_id in items:
        dep = row(deployment_id)
        assert (dep.attempts, dep.sequence) == (2, 1)  # the same snapshot, counted twice
        assert live_file(s3, org, widget_id)["deployment_id"] == deployment_id


def test_a_chunk_that_cannot_be_frozen_commits_nothing_and_is_handed_back_whole(database, org):
    items = chunk_of(org, 3)
    other_widget = org.widget()["id"]
    wrong = [*items[:2], (other_widget, items[2][1])]  # its deployment belongs to another widget
    back = HandedBack()
    report = deploy_chunk.run_chunk(org.id, wrong, get_store, back, map_fn=chunking.one_by_one)
    assert report.whole_chunk_handed_back and report.outcomes == []
    assert sorted(back) == sorted(d for _, d in items)
    for _, deployment_id in items:
        dep = row(deployment_id)  # not even the two valid ones were frozen
        assert (dep.status, dep.sequence, dep.attempts) == ("ready", None, 0)


@pytest.mark.parametrize(
    "items",
    [[("../etc", "d1")], [("w1", "d/1")], [("w1", "")]],
    ids=["path-widget", "slash-deployment", "empty"],
)
def test_a_chunk_naming_an_unsafe_id_is_refused_before_anything_runs(sqlite_database, org, items):
    back = HandedBack()
    with pytest.raises(UnsafeIdentifierError, match="must be 1-"):
        deploy_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert back == []
