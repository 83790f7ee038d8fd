"""The bulk fan-out at production sizes: every slice (one ``widgets.bulk_deploy`` message) stays
well inside the task's soft time limit however many widgets the selector names.

``BULK_SCALE_WIDGETS`` widgets (default 2,000, seconds; ``BULK_SCALE_WIDGETS=100000`` is the
issue's case, a few minutes) are inserted straight into a database of this test's own, and the
chain of slices is run here with the real sizes (``BATCH``, ``SLICE_BATCHES``,
``SLICE_SECONDS``) and the real producer, sending every deploy message to a Redis database that
no worker reads (so the deploys themselves are not part of the measure; they are ordinary
single deploys). Slices run one after the other, as the chain of messages runs them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, insert
from sqlmodel import select

from tests.support.reliability import environment, fresh_sqlite
from worker import constants as c
from worker import producer
from worker.db import get_engine, unit_of_work
from worker.ids import new_id
from worker.models import BulkJob, Deployment, Organization, Widget, utcnow
from worker.services import bulk, chunking

WIDGETS = int(os.environ.get("BULK_SCALE_WIDGETS", "2000"))
SCALE_REDIS_DB = 13


@pytest.fixture
def isolated(services: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    """A database and a Redis database of this test's own (no worker reads the latter)."""
    url = services["broker"].rsplit("/", 1)[0] + f"/{SCALE_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        with environment(CELERY_BROKER_URL=url, DATABASE_URL=fresh_sqlite(tmp_path)):
            yield
    finally:
        client.flushdb()
        client.close()


def _insert_widgets(org_id: str, count: int) -> None:
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "organization_id": org_id,
            "name": f"w{i}",
            "format": "embeddable",
            "template_id": "sections",
            "headless": False,
            "enabled_languages": ["en"],
            "default_language": "en",
            "selected_purposes_ids": [],
            "selected_preferences_ids": [],
            "components": {},
            "version": 1,
            "publish_seq": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    with get_engine().begin() as conn:
        for start in range(0, count, 5000):
            conn.execute(insert(Widget), rows[start : start + 5000])


@pytest.mark.timeout(max(300, WIDGETS // 100))
def test_every_slice_of_a_large_fan_out_fits_well_inside_the_soft_time_limit(isolated):
    org = Organization(name="bulk-scale")
    with unit_of_work() as s:
        s.add(org)
    _insert_widgets(org.id, WIDGETS)
    with unit_of_work() as s:
        # An uncapped selector: every draft of the organization.
        bulk_id = bulk.create(s, org.id, {"publication_status": "draft"}, "bench", None).id

    batch_seconds: list[float] = []
    slices: list[tuple[bulk.Slice, float]] = []
    started = time.monotonic()
    while True:
        t0 = time.monotonic()
        done = bulk.fan_out(bulk_id, producer.send_deploy_chunk)
        slices.append((done, time.monotonic() - t0))
        if done.batches:
            batch_seconds.append(slices[-1][1] / done.batches)
        if done.done:
            break
        bulk.note_continuation(bulk_id)
    total = time.monotonic() - started

    with unit_of_work() as s:
        made = s.exec(select(func.count()).where(Deployment.bulk_id == bulk_id)).one()
        distinct = s.exec(
            select(func.count(func.distinct(Deployment.widget_id))).where(
                Deployment.bulk_id == bulk_id
            )
        ).one()
        job = s.get(BulkJob, bulk_id)
        assert job is not None
    assert made == distinct == WIDGETS
    assert job.fanned_out_at is not None
    # Every deployment sent for real, in chunk messages (not one message per widget).
    in_broker = producer.jobs_in_broker((c.DEPLOY_QUEUE,))
    assert len({d for o, d in in_broker.deployments if o == org.id}) == WIDGETS
    queued = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).llen(c.DEPLOY_QUEUE)
    batches = math.ceil(WIDGETS / bulk.BATCH)
    assert queued <= batches * math.ceil(bulk.BATCH / chunking.CHUNK), queued

    longest = max(seconds for _, seconds in slices)
    per_widget = total / WIDGETS
    print(  # the figures, for the record (pytest -s)
        f"\n{WIDGETS} widgets: {len(slices)} slices, {total:.1f} s, {per_widget * 1000:.2f} ms"
        f"/widget, longest slice {longest:.1f} s, longest batch {max(batch_seconds):.2f} s"
    )
    limit = c.TASK_SOFT_TIME_LIMIT
    for done, seconds in slices:
        assert done.sent <= bulk.BATCH * bulk.SLICE_BATCHES
        assert seconds < limit / 2, (seconds, done)
    # Whatever the size: a slice starts no batch after SLICE_SECONDS, so it lasts at most that
    # plus one batch. Measured here, that bound is well inside the soft time limit too.
    assert bulk.SLICE_SECONDS + max(batch_seconds) < limit / 2, max(batch_seconds)
