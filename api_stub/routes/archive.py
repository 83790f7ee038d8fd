"""Archiving: ``DELETE /widgets/{id}`` (202 + job), the job resource, ``/widgets/archived``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from sqlmodel import select

from api_stub.actor import ActorDep
from api_stub.deps import OrgDep, SessionDep, get_owned, require_safe_path_id
from api_stub.errors import not_found
from api_stub.query import ListQuery, apply_list_query, list_query
from api_stub.schemas.archive import ArchivedWidgetPublic, ArchiveJobPublic
from worker import producer
from worker.models import ArchivedWidget, ArchiveJob
from worker.services.archive import latest_job, mark_archived
from worker.services.locking import lock_widget

router = APIRouter(prefix="/widgets", tags=["archive"])


def _accepted(request: Request, response: Response, job: ArchiveJob) -> ArchiveJobPublic:
    url = request.url_for("get_archive_job", job_id=job.id)
    response.headers["Location"] = f"{url.path}?organization_id={job.organization_id}"
    return ArchiveJobPublic.model_validate(job)


def _needs_new_job(job: ArchiveJob | None, widget_exists: bool) -> bool:
    # No job yet, or the last one failed while the widget is still there: try again.
    return job is None or (job.status == "failure" and widget_exists)


@router.get("/archived")
def list_archived_widgets(
    org: OrgDep, session: SessionDep, query: Annotated[ListQuery, Depends(list_query("widget_id"))]
) -> list[ArchivedWidgetPublic]:
    stmt = select(ArchivedWidget).where(ArchivedWidget.organization_id == org.id)
    rows = session.exec(apply_list_query(stmt, ArchivedWidget, query, {"widget_id": "id"})).all()
    return [ArchivedWidgetPublic.model_validate(a) for a in rows]


@router.get("/archived/{widget_id}")
def get_archived_widget(widget_id: str, org: OrgDep, session: SessionDep) -> ArchivedWidgetPublic:
    row = get_owned(session, ArchivedWidget, org, widget_id, "archived widget")
    return ArchivedWidgetPublic.model_validate(row)


@router.get("/archive-jobs/{job_id}", name="get_archive_job")
def get_archive_job(job_id: str, org: OrgDep, session: SessionDep) -> ArchiveJobPublic:
    return ArchiveJobPublic.model_validate(
        get_owned(session, ArchiveJob, org, job_id, "archive job")
    )


@router.delete("/{widget_id}", status_code=status.HTTP_202_ACCEPTED)
def archive_widget(
    widget_id: str,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    request: Request,
    response: Response,
) -> ArchiveJobPublic:
    """Hide the widget now and archive it in the background; repeating it is harmless."""
    require_safe_path_id(widget_id, "widget_id")
    widget = lock_widget(session, org.id, widget_id)  # waits for a deploy that is publishing
    job = latest_job(session, org.id, widget_id)
    if widget is None and job is None:
        raise not_found("widget", widget_id)
    if not _needs_new_job(job, widget is not None):
        assert job is not None
        session.rollback()
        return _accepted(request, response, job)
    assert widget is not None
    job = mark_archived(session, widget, created_by=actor)
    session.commit()
    producer.send_archive(org.id, widget_id, job.id)
    return _accepted(request, response, job)
