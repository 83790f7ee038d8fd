"""Deploying a widget: freeze its snapshot, publish it on S3, record the outcome.

A deployment runs in three units of work, all holding the widget's row lock:

0. *count*: find (or, for a producer that bypassed the API, create) the deployment row, return
   early if it is already final, give up past :data:`MAX_ATTEMPTS`, and count this delivery,
   committed before any work: a message that crashes the process still reaches the cap.
1. *claim*: fail if the widget is gone or archived, freeze the snapshot once (a retry publishes
   the same bytes) and mark it ``running``. Committed before any S3 call.
2. *publish*: re-check under the lock, then either write the container file or, if a newer
   deployment is live or the live file already has this content, finish without writing. The
   lock is held across the upload so two deploys of one widget never interleave their writes
   and an archive cannot slip in between the upload and the commit.

Every path either ends in ``success``/``failure`` or raises (the task layer retries or records
the failure through :func:`record_failure`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from worker.db import is_postgres, unit_of_work
from worker.ids import require_safe_id
from worker.models import ArchiveJob, Deployment, Organization, Widget, utcnow
from worker.s3 import S3Store
from worker.services import job_state
from worker.services.locking import lock_widget
from worker.services.snapshot import (
    build_snapshot,
    canonical_json,
    container_key,
    content_checksum,
    sha256_hex,
)

# Attempts (first run + Celery retries + redeliveries after a lost worker) before giving up:
# a poison message ends ``failure`` instead of looping forever.
MAX_ATTEMPTS = 12


class InvalidJobError(ValueError):
    """The message itself is wrong (unsafe IDs, unknown organization, IDs that do not match)."""


@dataclass(frozen=True)
class DeployOutcome:
    deployment_id: str
    status: str
    published: bool
    live_deployment_id: str | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _outcome(dep: Deployment, published: bool = False) -> DeployOutcome:
    return DeployOutcome(
        dep.deployment_id, dep.status, published, dep.live_deployment_id, dep.error
    )


def _find(session: Session, deployment_id: str, lock: bool = False) -> Deployment | None:
    stmt = select(Deployment).where(Deployment.deployment_id == deployment_id)
    if lock and is_postgres(session):
        stmt = stmt.with_for_update()
    return session.exec(stmt.execution_options(populate_existing=True)).first()


ARCHIVED_ERROR = "widget archived: deployments of an archived widget are not published"


def _widget_gone_reason(
    session: Session, organization_id: str, widget_id: str, widget: Widget | None
) -> str | None:
    if widget is not None:
        return ARCHIVED_ERROR if widget.is_archived else None
    # Gone: archived (and already removed by its archive job), or never this org's widget.
    archived = session.exec(
        select(ArchiveJob.id).where(
            ArchiveJob.organization_id == organization_id, ArchiveJob.widget_id == widget_id
        )
    ).first()
    if archived is not None:
        return ARCHIVED_ERROR
    return "widget not found (deleted, or not a widget of this organization)"


def validate_job_ids(organization_id: object, widget_id: object, deployment_id: object) -> None:
    require_safe_id(organization_id, "organization_id")
    require_safe_id(widget_id, "widget_id")
    require_safe_id(deployment_id, "deployment_id")


def _count_delivery(
    organization_id: str, widget_id: str, deployment_id: str
) -> DeployOutcome | None:
    """Unit of work 0: count this delivery before any work, so a message that kills the process
    every time (redelivered by ``task_reject_on_worker_lost``) still reaches the cap."""
    with unit_of_work() as session:
        if session.get(Organization, organization_id) is None:
            raise InvalidJobError(f"unknown organization {organization_id}")
        lock_widget(session, organization_id, widget_id)  # serializes racing first deliveries
        dep = _find(session, deployment_id)
        if dep is None:  # sent by a producer that did not go through the API
            dep = Deployment(
                deployment_id=deployment_id,
                organization_id=organization_id,
                widget_id=widget_id,
                enqueued_at=utcnow(),
            )
            session.add(dep)
        elif dep.organization_id != organization_id or dep.widget_id != widget_id:
            raise InvalidJobError(
                f"deployment {deployment_id} belongs to another organization or widget"
            )
        if job_state.is_final(dep):
            return _outcome(dep)
        gave_up = job_state.give_up_reason(dep, MAX_ATTEMPTS)
        if gave_up is not None:
            job_state.finish(dep, "failure", gave_up)
            return _outcome(dep)
        job_state.count_attempt(dep)
        return None


def _claim(organization_id: str, widget_id: str, deployment_id: str) -> DeployOutcome | None:
    """Unit of work 1. Returns an outcome when the deployment is (now) final, else None."""
    with unit_of_work() as session:
        org = session.get(Organization, organization_id)
        assert org is not None
        widget = lock_widget(session, organization_id, widget_id)
        dep = _find(session, deployment_id)
        assert dep is not None
        if job_state.is_final(dep):
            return _outcome(dep)
        gone = _widget_gone_reason(session, organization_id, widget_id, widget)
        if gone is not None:
            job_state.finish(dep, "failure", gone)
            return _outcome(dep)
        assert widget is not None
        if dep.config is None:
            dep.config = build_snapshot(session, widget, deployment_id)
            dep.widget_version = widget.version
            dep.content_checksum = content_checksum(dep.config)
            dep.s3_key = container_key(org.api_key, widget.id)
        job_state.mark_running(dep)
        return None


def _publish(deployment_id: str, store: Callable[[], S3Store]) -> DeployOutcome:
    """Unit of work 2, widget locked across the upload."""
    with unit_of_work() as session:
        dep = _find(session, deployment_id)
        assert dep is not None
        if job_state.is_final(dep):
            return _outcome(dep)
        assert dep.config is not None and dep.widget_version is not None
        widget = lock_widget(session, dep.organization_id, dep.widget_id)
        gone = _widget_gone_reason(session, dep.organization_id, dep.widget_id, widget)
        if gone is not None:
            job_state.finish(dep, "failure", gone)
            return _outcome(dep)
        assert widget is not None
        live = _find(session, widget.live_deployment_id) if widget.live_deployment_id else None
        if widget.published_version is not None and widget.published_version > dep.widget_version:
            # Overtaken: a newer deployment is live. Writing would put an older snapshot back.
            dep.live_deployment_id = widget.live_deployment_id
            job_state.finish(dep, "success")
            return _outcome(dep)
        if (
            live is not None
            and live.content_checksum == dep.content_checksum
            # The file really is that one (a deploy killed between its upload and its commit
            # may have left other bytes there).
            and dep.s3_key is not None
            and store().stored_sha256(dep.s3_key) == live.checksum
        ):
            # Same content is already on S3: nothing to rewrite, but the widget is now up to date.
            widget.published_version = max(widget.published_version or 0, dep.widget_version)
            dep.live_deployment_id = live.deployment_id
            job_state.finish(dep, "success")
            return _outcome(dep)
        body = canonical_json(dep.config)
        dep.checksum = sha256_hex(body)
        assert dep.s3_key is not None
        store().put_json(
            dep.s3_key,
            body,
            metadata={"deployment-id": dep.deployment_id, "sha256": dep.checksum},
        )
        widget.published_version = dep.widget_version
        widget.live_deployment_id = dep.deployment_id
        dep.live_deployment_id = dep.deployment_id
        job_state.finish(dep, "success")
        return _outcome(dep, published=True)


def run_deployment(
    organization_id: str, widget_id: str, deployment_id: str, store: Callable[[], S3Store]
) -> DeployOutcome:
    """Run one delivery of a deploy job; safe to call any number of times for one deployment."""
    validate_job_ids(organization_id, widget_id, deployment_id)
    try:
        done = _count_delivery(organization_id, widget_id, deployment_id)
    except IntegrityError:
        # Two deliveries of a producer-created job raced to insert the row: the other one won.
        done = _count_delivery(organization_id, widget_id, deployment_id)
    done = done or _claim(organization_id, widget_id, deployment_id)
    return done if done is not None else _publish(deployment_id, store)


def note_retry(deployment_id: str, error: str) -> None:
    with unit_of_work() as session:
        # Locked: the retry may already be running (or done) in another process.
        job_state.note_retry(_find(session, deployment_id, lock=True), error)


def record_failure(organization_id: str, widget_id: str, deployment_id: str, error: str) -> None:
    """``failure``; the widget's publication status is left as it was."""
    with unit_of_work() as session:
        dep = _find(session, deployment_id, lock=True)
        job_state.record_failure(dep, organization_id, widget_id, error)
