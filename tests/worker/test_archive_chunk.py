"""worker.services.archive_chunk: the cleanup's archive jobs, claimed in one transaction, run
concurrently, with whatever reaches no outcome handed back to single archives. Against the real
databases and moto (through the fault proxy where a test needs a fault); the chunk runs in this
process. End to end through the worker: ``test_cleanup.py``."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import col, select

from bench.statements import counting
from worker.db import get_engine, unit_of_work
from worker.ids import UnsafeIdentifierError
from worker.models import ArchiveJob, Widget
from worker.s3 import get_store
from worker.services import archive, archive_chunk, chunking
from worker.services.locking import lock_widget
from worker.settings import get_settings


class HandedBack(list[str]):
    def __call__(self, organization_id: str, widget_id: str, job_id: str) -> None:
        self.append(job_id)


def archived_drafts(org: Any, n: int) -> list[tuple[str, str]]:
    """``n`` drafts marked archived with their jobs, as the cleanup's batch commits them."""
    items = []
    for _ in range(n):
        widget_id = org.widget()["id"]
        with unit_of_work() as s:
            widget = lock_widget(s, org.id, widget_id)
            assert widget is not None
            items.append((widget_id, archive.mark_archived(s, widget).id))
    return sorted(items)


def job(job_id: str) -> ArchiveJob:
    with unit_of_work() as s:
        found = s.get(ArchiveJob, job_id)
        assert found is not None
        return found


def widget_rows(widget_ids: list[str]) -> list[str]:
    with unit_of_work() as s:
        return list(s.exec(select(Widget.id).where(col(Widget.id).in_(widget_ids))).all())


def test_a_chunk_claims_its_jobs_in_one_transaction_and_archives_every_widget(database, org):
    (single_widget, single_job), *items = archived_drafts(org, 5)
    with counting(get_engine(), this_thread=True) as one:
        archive.run_archive(org.id, single_widget, single_job, get_store)
    back = HandedBack()
    with counting(get_engine(), this_thread=True) as seen:
        report = archive_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert back == [] and not report.whole_chunk_handed_back
    assert [(o.status, o.result) for o in report.outcomes] == [("success", "deleted")] * 4
    assert widget_rows([w for w, _ in items]) == []
    # A chunk's transactions do not grow with its jobs: the claims share one, the rows and
    # statuses another (a single archive needs several of its own).
    print(f"\nsingle archive: {one.begins} transactions; chunk of {len(items)}: {seen.begins}")
    assert one.begins >= 4, one.breakdown()
    assert seen.begins <= 3, seen.breakdown()


def test_an_archive_whose_s3_calls_keep_failing_is_handed_back_to_a_single_archive(
    sqlite_database, org, s3_faults
):
    items = archived_drafts(org, 3)
    first_widget, first = items[0]
    attempts = get_settings().s3_max_attempts
    s3_faults.fail_next("GET", 503, times=attempts)  # the first job's listing of its objects
    back = HandedBack()
    report = archive_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert s3_faults.count("GET", 503) == attempts  # the fault landed
    assert back == [first]
    assert sorted(o.archive_job_id for o in report.outcomes) == sorted(j for _, j in items[1:])
    assert (job(first).status, job(first).result) == ("running", "deleted")  # claimed, planned
    done = archive.run_archive(org.id, first_widget, first, get_store)  # the single message
    assert (done.status, done.result) == ("success", "deleted")
    assert job(first).attempts == 2 and widget_rows([first_widget]) == []


def test_a_chunk_that_cannot_be_claimed_commits_nothing_and_is_handed_back_whole(
    database, org, make_org
):
    items = archived_drafts(org, 2)
    theirs = archived_drafts(make_org(), 1)[0]  # another organization's job in this chunk
    back = HandedBack()
    report = archive_chunk.run_chunk(
        org.id, [*items, theirs], get_store, back, map_fn=chunking.one_by_one
    )
    assert report.whole_chunk_handed_back and report.outcomes == []
    assert sorted(back) == sorted([j for _, j in items] + [theirs[1]])
    for _, job_id in [*items, theirs]:
        assert (job(job_id).status, job(job_id).attempts) == ("ready", 0)
    assert len(widget_rows([w for w, _ in [*items, theirs]])) == 3  # nothing removed


@pytest.mark.parametrize("items", [[("../w", "j1")], [("w1", "j 1")]], ids=["widget", "job"])
def test_a_chunk_naming_an_unsafe_id_is_refused_before_anything_runs(sqlite_database, org, items):
    back = HandedBack()
    with pytest.raises(UnsafeIdentifierError, match="must be 1-"):
        archive_chunk.run_chunk(org.id, items, get_store, back, map_fn=chunking.one_by_one)
    assert back == []
