"""Archiving a widget (DESIGN "The jobs" → archive), resumable after a crash at any line.

The decision (``deleted`` for a draft, ``archived`` otherwise) is taken once, under the widget
lock, and stored on the job before anything is destroyed; a redelivered job finishes the same
plan even when the widget row is already gone. Steps, each idempotent:

1. claim: mark the widget archived (if a producer bypassed the API), record the plan, count the
   attempt. Deploys check ``archived_at`` under the same lock, so none publishes after this.
2. assets: for each asset, delete the S3 object, then its row. A crash between the two leaves a
   row whose object is gone (deleted again on resume), never an S3 object nobody knows about.
3. the published container file is removed, so the widget stops rendering on websites (before
   the row goes: if this fails, the archived widget is still there for a retried job).
4. the widget: draft → delete the row; otherwise copy it into ``archived_widgets`` and delete
   it, in one transaction. Deployments are never touched: they keep every configuration.
5. later, once no write sent before the claim can still reach S3, the container key is deleted
   once more (:func:`worker.services.late_writes.sweep_archived`): a deploy's ``If-None-Match``
   request held up in the network would otherwise find the key free and bring the file back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlmodel import Session, col, select

from worker.db import unit_of_work
from worker.ids import require_safe_id
from worker.models import (
    CREATED_BY_PRODUCER,
    ArchivedWidget,
    ArchiveJob,
    Deployment,
    Organization,
    Widget,
    WidgetAsset,
    utcnow,
)
from worker.s3 import S3Store
from worker.services import job_state
from worker.services.deploy import MAX_ATTEMPTS, InvalidJobError
from worker.services.locking import lock_widget
from worker.storage_keys import asset_prefix, container_key, preview_key

RESULT_DELETED = "deleted"
RESULT_ARCHIVED = "archived"
ASSET_BATCH = 100


@dataclass(frozen=True)
class ArchiveOutcome:
    archive_job_id: str
    widget_id: str
    status: str
    result: str | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_outcome(job: ArchiveJob) -> ArchiveOutcome:
    return ArchiveOutcome(job.id, job.widget_id, job.status, job.result, job.error)


def mark_archived(
    session: Session,
    widget: Widget,
    created_by: str = CREATED_BY_PRODUCER,
    reason: str | None = None,
) -> ArchiveJob:
    """Hide the widget at once and create its archive job (the API's side of DELETE)."""
    widget.archived_at = utcnow()
    session.add(widget)
    job = ArchiveJob(
        organization_id=widget.organization_id,
        widget_id=widget.id,
        enqueued_at=utcnow(),
        created_by=created_by,
        reason=reason,
    )
    session.add(job)
    return job


def latest_job(session: Session, organization_id: str, widget_id: str) -> ArchiveJob | None:
    stmt = (
        select(ArchiveJob)
        .where(ArchiveJob.organization_id == organization_id, ArchiveJob.widget_id == widget_id)
        .order_by(col(ArchiveJob.created_at).desc(), col(ArchiveJob.id).desc())
    )
    return session.exec(stmt).first()


def _job_for_producer(
    session: Session, widget: Widget | None, organization_id: str, widget_id: str
) -> ArchiveJob:
    """A message without ``archive_job_id`` (a producer that bypassed the API)."""
    existing = latest_job(session, organization_id, widget_id)
    if existing is not None and (not job_state.is_final(existing) or widget is None):
        return existing  # in flight, or done already: a re-run reports the same result
    if widget is None:
        raise InvalidJobError(f"widget {widget_id} not found")
    if widget.is_archived:
        job = ArchiveJob(organization_id=organization_id, widget_id=widget_id)
        session.add(job)
        return job
    return mark_archived(session, widget)


def _claim(organization_id: str, widget_id: str, job_id: str | None) -> ArchiveJob:
    with unit_of_work("archive.claim") as session:
        return claim_in(session, organization_id, widget_id, job_id)


def claim_in(
    session: Session, organization_id: str, widget_id: str, job_id: str | None
) -> ArchiveJob:
    """Step 1 in ``session`` (the caller commits)."""
    if session.get(Organization, organization_id) is None:
        raise InvalidJobError(f"unknown organization {organization_id}")
    widget = lock_widget(session, organization_id, widget_id)
    job = session.get(ArchiveJob, job_id) if job_id else None
    if job_id and job is None:
        raise InvalidJobError(f"unknown archive job {job_id}")
    if job is None:
        job = _job_for_producer(session, widget, organization_id, widget_id)
    if job.organization_id != organization_id or job.widget_id != widget_id:
        raise InvalidJobError(f"archive job {job.id} is for another organization or widget")
    if job_state.is_final(job):
        return job
    if job.result is None:
        if widget is None:
            job_state.finish(job, "failure", "widget not found")
            return job
        if not widget.is_archived:
            widget.archived_at = utcnow()
        # The plan is fixed now, before anything is destroyed.
        draft = widget.publication_status == "draft"
        job.result = RESULT_DELETED if draft else RESULT_ARCHIVED
    gave_up = job_state.give_up_reason(job, MAX_ATTEMPTS)
    if gave_up is not None:
        job_state.finish(job, "failure", gave_up)
    else:
        job_state.start(job)
    session.add(job)
    return job


def _delete_assets(organization_id: str, widget_id: str, store: Callable[[], S3Store]) -> None:
    while True:
        with unit_of_work("archive.list_assets") as session:
            assets = session.exec(
                select(WidgetAsset)
                .where(
                    WidgetAsset.organization_id == organization_id,
                    WidgetAsset.widget_id == widget_id,
                )
                .limit(ASSET_BATCH)
            ).all()
        if not assets:
            return
        for asset in assets:
            store().delete(asset.s3_key)  # object first: a row may outlive it, not the reverse
            with unit_of_work("archive.delete_asset_row") as session:
                row = session.get(WidgetAsset, asset.id)
                if row is not None:
                    session.delete(row)


def _remove_widget(job_id: str) -> None:
    with unit_of_work("archive.remove_widget") as session:
        remove_in(session, job_id)


def remove_in(session: Session, job_id: str) -> None:
    """Step 4 in ``session``: the row goes (a copy kept unless the plan is ``deleted``)."""
    job = session.get(ArchiveJob, job_id)
    assert job is not None
    widget = lock_widget(session, job.organization_id, job.widget_id)
    if widget is None:
        return  # done by an earlier delivery
    if job.result == RESULT_ARCHIVED and session.get(ArchivedWidget, widget.id) is None:
        session.add(_archived_copy(session, widget))
    session.delete(widget)


def finish_in(session: Session, job_id: str) -> ArchiveOutcome:
    """The job's ``success`` in ``session``, unless another delivery already ended it."""
    final = session.get(ArchiveJob, job_id)
    assert final is not None
    if not job_state.is_final(final):
        job_state.finish(final, "success")
        session.add(final)
    return job_outcome(final)


def _archived_copy(session: Session, widget: Widget) -> ArchivedWidget:
    """The widget as last published: edits made since the last deployment are lost."""
    live = (
        session.exec(
            select(Deployment).where(
                Deployment.organization_id == widget.organization_id,
                Deployment.deployment_id == widget.live_deployment_id,
            )
        ).first()
        if widget.live_deployment_id
        else None
    )
    published: dict[str, Any] = (live.config or {}).get("widget", {}) if live else {}
    return ArchivedWidget(
        id=widget.id,
        organization_id=widget.organization_id,
        name=published.get("name", widget.name),
        format=published.get("format", widget.format),
        template_id=published.get("template_id", widget.template_id),
        last_domain_used=widget.last_domain_used,
        widget_created_at=widget.created_at,
    )


def run_archive(
    organization_id: str,
    widget_id: str,
    archive_job_id: str | None,
    store: Callable[[], S3Store],
) -> ArchiveOutcome:
    """Run one delivery of an archive job; any number of deliveries give the same end state."""
    require_safe_id(organization_id, "organization_id")
    require_safe_id(widget_id, "widget_id")
    if archive_job_id is not None:
        require_safe_id(archive_job_id, "archive_job_id")
    return finish_claimed(_claim(organization_id, widget_id, archive_job_id), store)


def finish_claimed(job: ArchiveJob, store: Callable[[], S3Store]) -> ArchiveOutcome:
    """Steps 2 to 4 of a claimed job (nothing, if the claim found it final)."""
    if job_state.is_final(job):
        return job_outcome(job)
    with unit_of_work("archive.read_keys") as session:
        org = session.get(Organization, job.organization_id)
        assert org is not None
        api_key = org.api_key
        widget = session.get(Widget, job.widget_id)
        # Gone: an earlier delivery took everything down before removing the row.
        has_preview = widget is not None and widget.preview_seq is not None
    take_down_objects(job, api_key, store, has_preview=has_preview)
    _remove_widget(job.id)
    with unit_of_work("archive.finish") as session:
        return finish_in(session, job.id)


def take_down_objects(
    job: ArchiveJob,
    api_key: str,
    store: Callable[[], S3Store],
    *,
    has_assets: bool = True,
    has_preview: bool = True,
) -> None:
    """Steps 2 and 3: the widget's assets, anything else under its prefix, its preview file and
    its container file. ``has_assets`` False: the caller saw no asset row after the claim (none
    can be added since: an upload checks ``archived_at``), so the rows are not looked for again.
    ``has_preview`` False: the caller saw, after the claim, that no preview snapshot of the
    widget was ever frozen (none can be since: a freeze checks ``archived_at``)."""
    organization_id, widget_id = job.organization_id, job.widget_id
    if has_assets:
        _delete_assets(organization_id, widget_id, store)
    # The container file goes before the row: a failure here leaves the widget (archived,
    # invisible) in place, so a new DELETE can retry the whole job. Deleting it for drafts too
    # covers a first deploy killed between its upload and its commit.
    # Objects whose row is gone or never committed (an upload racing this archive, or one whose
    # API process died mid-way): nothing under the widget's prefix may outlive it.
    for orphan in store().list_keys(asset_prefix(api_key, widget_id)):
        store().delete(orphan)
    if has_preview:
        store().delete(preview_key(api_key, widget_id))
    store().delete(container_key(api_key, widget_id))


def note_retry(archive_job_id: str, error: str) -> None:
    with unit_of_work("archive.note_retry") as session:
        # Locked: the retry may already be running (or done) in another process.
        job_state.note_retry(session.get(ArchiveJob, archive_job_id, with_for_update=True), error)


def record_failure(
    organization_id: str, widget_id: str, archive_job_id: str | None, error: str
) -> None:
    with unit_of_work() as session:
        if archive_job_id is None:
            job = latest_job(session, organization_id, widget_id)
        else:
            job = session.get(ArchiveJob, archive_job_id, with_for_update=True)
        job_state.record_failure(job, organization_id, widget_id, error)
