"""``/widgets/deployments/bulk``: redeploy many widgets (202 + a job with progress)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from sqlmodel import Session, col, select

from api_stub.actor import ActorDep
from api_stub.deps import OrgDep, SessionDep, check_body_org, get_owned
from api_stub.errors import bad_request
from api_stub.schemas.deployments import BulkCreate, BulkPublic
from worker import producer
from worker.models import BulkJob, Organization, Widget
from worker.services import bulk
from worker.services.catalog_impact import mark_embedding_widgets

router = APIRouter(prefix="/widgets/deployments/bulk", tags=["deployments"])


def _check_widgets(session: Session, org: Organization, widget_ids: list[str]) -> None:
    """Every listed widget must be this organization's and not archived (else 400, naming
    them); another tenant's widget looks exactly like a missing one."""
    wanted = set(widget_ids)
    found = set(
        session.exec(
            select(Widget.id).where(
                Widget.organization_id == org.id,
                col(Widget.id).in_(wanted),
                col(Widget.archived_at).is_(None),
            )
        ).all()
    )
    missing = sorted(wanted - found)
    if missing:
        raise bad_request(
            f"{len(missing)} widget(s) not found: {', '.join(missing[:20])}",
            {"widget_ids": "unknown or archived widgets"},
        )


def start_bulk(
    session: Session, org: Organization, selector: dict[str, object], actor: str, reason: str | None
) -> BulkJob:
    """Create the job and commit; the caller sends it after the commit (see :func:`send`)."""
    job = bulk.create(session, org.id, selector, actor, reason)
    session.commit()
    return job


RedeployQuery = Annotated[
    bool,
    Query(description="also start a bulk redeploy of the widgets this edit affects"),
]


def after_catalog_edit(
    session: Session,
    org: Organization,
    item: dict[str, str],
    redeploy: bool,
    actor: str,
    response: Response,
) -> tuple[int, BulkJob | None]:
    """In the edit's own transaction: mark the widgets whose live snapshot embeds the item
    (``item`` is ``{"purpose_id": id}`` or ``{"preference_id": id}``), optionally create their
    bulk redeploy, commit; then send it. Returns (widgets affected, the bulk job)."""
    (item_id,) = item.values()
    affected = mark_embedding_widgets(session, org.id, item_id)
    job = None
    if redeploy:
        job = bulk.create(session, org.id, dict(item), actor, "catalog edit")
    session.commit()
    if job is not None:
        producer.send_bulk(org.id, job.id)
    response.headers["X-Affected-Widgets"] = str(affected)
    return affected, job


def accepted(request: Request, response: Response, session: Session, job: BulkJob) -> BulkPublic:
    url = request.url_for("get_bulk", bulk_id=job.id)
    response.headers["Location"] = f"{url.path}?organization_id={job.organization_id}"
    return BulkPublic.model_validate(bulk.progress(session, job), from_attributes=True)


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def create_bulk(
    body: BulkCreate,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    request: Request,
    response: Response,
) -> BulkPublic:
    """Create one deployment per selected widget, in the background (``widgets.bulk_deploy``):
    the answer is immediate, whatever the number of widgets."""
    check_body_org(body.organization_id, org)
    if body.widget_ids is not None:
        _check_widgets(session, org, body.widget_ids)
    job = start_bulk(session, org, body.selector(), actor, body.reason)
    producer.send_bulk(org.id, job.id)
    return accepted(request, response, session, job)


@router.get("/{bulk_id}", name="get_bulk")
def get_bulk(bulk_id: str, org: OrgDep, session: SessionDep) -> BulkPublic:
    job = get_owned(session, BulkJob, org, bulk_id, "bulk job")
    return BulkPublic.model_validate(bulk.progress(session, job), from_attributes=True)
