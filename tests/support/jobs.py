"""Helpers for tests that create job rows directly: polling, and an organization whose
unfinished jobs are failed at teardown so no later reconcile picks them up."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sqlmodel import col, select

from worker.db import unit_of_work
from worker.models import FINAL_STATUSES, ArchiveJob, Deployment, Organization, utcnow


def poll(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call ``check`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def scratch_org(prefix: str) -> Iterator[str]:
    """Body of a fixture: a new organization's id; its unfinished jobs end ``failure`` after."""
    org = Organization(name=f"{prefix}-{uuid.uuid4().hex[:8]}")
    with unit_of_work() as s:
        s.add(org)
    yield org.id
    with unit_of_work() as s:
        for model in (Deployment, ArchiveJob):
            stmt = select(model).where(
                model.organization_id == org.id, col(model.status).not_in(FINAL_STATUSES)
            )
            for job in s.exec(stmt).all():
                job.status, job.finished_at = "failure", utcnow()
                s.add(job)
