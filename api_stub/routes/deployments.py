"""``/widgets/deployments``: enqueue a deploy, a preview, a rollback or a promotion (202), list
(plain array), get, diff."""

from __future__ import annotations

from typing import Annotated, Any

import jsonpatch
from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api_stub.actor import ActorDep
from api_stub.deps import OrgDep, SessionDep, check_body_org, get_owned
from api_stub.errors import ApiError, bad_request, not_found
from api_stub.query import ListQuery, apply_list_query, list_query
from api_stub.routes.widgets import get_live_widget
from api_stub.schemas.common import SAFE_ID_PATTERN
from api_stub.schemas.deployments import (
    DeploymentCreate,
    DeploymentPublic,
    JsonPatchOperation,
    PromotionCreate,
)
from worker import producer
from worker.ids import MAX_ID_LENGTH
from worker.models import SCHEDULED, Deployment, Organization, Widget, utcnow
from worker.services import schedule, webhook_outbox
from worker.services.deploy import freeze_scheduled

router = APIRouter(prefix="/widgets/deployments", tags=["deployments"])
# The path names a deployment by its ``id`` (what ``Location`` and ``GET /widgets/deployments``
# give), not by the ``deployment_id`` its producer picked.
DeploymentIdPath = Annotated[
    str, Path(description="The deployment's `id` (not its `deployment_id` idempotency key)")
]


def _get(session: Session, org: Organization, ident: str) -> Deployment:
    return get_owned(session, Deployment, org, ident, "deployment")


def _accepted(request: Request, response: Response, dep: Deployment) -> DeploymentPublic:
    url = request.url_for("get_deployment", deployment_id=dep.id)
    response.headers["Location"] = f"{url.path}?organization_id={dep.organization_id}"
    return DeploymentPublic.model_validate(dep)


def _by_deployment_id(session: Session, org: Organization, deployment_id: str) -> Deployment | None:
    """This organization's deployment with that key. ``deployment_id`` is unique per
    organization: another tenant's deployment of the same key is neither found nor revealed."""
    stmt = select(Deployment).where(
        Deployment.organization_id == org.id, Deployment.deployment_id == deployment_id
    )
    return session.exec(stmt).first()


def _repeat(
    request: Request, response: Response, org: Organization, body: DeploymentCreate, dep: Deployment
) -> DeploymentPublic:
    """A repeated request with the same idempotency key: the same deployment, no new job.
    The organization's own key reused for another widget or target is a conflict (409)."""
    if (
        dep.organization_id != org.id
        or dep.widget_id != body.widget_id
        or dep.target != body.target
    ):
        raise ApiError(409, f"deployment_id {body.deployment_id} is already used")
    return _accepted(request, response, dep)


def _check_rollback_source(session: Session, org: Organization, body: DeploymentCreate) -> None:
    """A rollback's source: this organization's (else 404), this widget's and successful
    (else 400). The worker checks again when it freezes the snapshot."""
    assert body.source_deployment_id is not None
    source = _by_deployment_id(session, org, body.source_deployment_id) or session.get(
        Deployment, body.source_deployment_id
    )
    if source is None or source.organization_id != org.id:
        raise not_found("deployment", body.source_deployment_id)
    if source.widget_id != body.widget_id:
        raise bad_request(
            "source_deployment_id is a deployment of another widget",
            {"source_deployment_id": "another widget's deployment"},
        )
    if source.status != "success" or source.config is None:
        raise bad_request(
            "source_deployment_id never succeeded: only a published snapshot can be rolled back to",
            {"source_deployment_id": f"status {source.status}"},
        )
    body.source_deployment_id = source.deployment_id  # either id may be given; store the key


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def create_deployment(
    body: DeploymentCreate,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    request: Request,
    response: Response,
) -> DeploymentPublic:
    """Accept a deploy (or, with ``source_deployment_id``, a rollback): the row is committed
    (``ready``), then the job is sent to the workers. ``target: "preview"`` publishes to the
    widget's preview object instead of the file websites load."""
    check_body_org(body.organization_id, org)
    return _enqueue(body, org, actor, session, request, response)


def _enqueue(
    body: DeploymentCreate,
    org: Organization,
    actor: str,
    session: Session,
    request: Request,
    response: Response,
) -> DeploymentPublic:
    if body.deployment_id is not None and (
        existing := _by_deployment_id(session, org, body.deployment_id)
    ):
        return _repeat(request, response, org, body, existing)
    # No lock: an archive that lands after this check is seen by the worker, which then fails
    # the deployment ("widget archived") and publishes nothing.
    widget = get_live_widget(session, org, body.widget_id)
    if body.source_deployment_id is not None:
        _check_rollback_source(session, org, body)
    if body.publish_at is not None:
        problem = schedule.schedule_problem(body.publish_at, utcnow())
        if problem is not None:
            raise bad_request(problem, {"publish_at": problem})
    dep = Deployment(
        organization_id=org.id,
        widget_id=widget.id,
        target=body.target,
        enqueued_at=utcnow(),
        source_deployment_id=body.source_deployment_id,
        created_by=actor,
        reason=body.reason,
    )
    if body.deployment_id is not None:
        dep.deployment_id = body.deployment_id
    session.add(dep)
    try:
        if body.publish_at is not None:
            _freeze_for_later(session, dep, body)
        session.commit()
    except IntegrityError:
        # The same deployment_id sent twice at once: the other request created it.
        session.rollback()
        assert body.deployment_id is not None
        existing = _by_deployment_id(session, org, body.deployment_id)
        if existing is None:
            raise
        return _repeat(request, response, org, body, existing)
    if body.publish_at is None:  # a scheduled one is sent by beat when due
        producer.send_deploy(org.id, widget.id, dep.deployment_id)
    return _accepted(request, response, dep)


def _freeze_for_later(session: Session, dep: Deployment, body: DeploymentCreate) -> None:
    """A scheduled deploy: its snapshot frozen in this transaction (what is reviewed now is
    what goes live at ``publish_at``)."""
    dep.status, dep.publish_at = SCHEDULED, body.publish_at
    session.flush()
    problem = freeze_scheduled(session, dep)
    if problem is not None:
        session.rollback()
        raise ApiError(409, f"the deployment cannot be scheduled: {problem}")
    webhook_outbox.record_event(
        session, dep.organization_id, "deployment.scheduled", webhook_outbox.deployment_data(dep)
    )


@router.post(
    "/{deployment_id}/promote",
    status_code=status.HTTP_202_ACCEPTED,
    responses={409: {"description": "The preview has not (or not successfully) published"}},
)
def promote_deployment(
    deployment_id: DeploymentIdPath,
    body: PromotionCreate,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    request: Request,
    response: Response,
) -> DeploymentPublic:
    """Promote a preview deployment: a new production deployment of its exact snapshot (with
    the new deployment's own ``deployment_id``), through the ordinary publish order. What the
    reviewer saw is what ships, even if the widget was edited since; the widget then reads
    ``unpublished_changes``."""
    check_body_org(body.organization_id, org)
    preview = _get(session, org, deployment_id)
    if preview.target != "preview":
        raise bad_request(
            "only a preview deployment can be promoted "
            "(republish a production snapshot with source_deployment_id)",
            {"deployment_id": f"target {preview.target}"},
        )
    if preview.status != "success" or preview.config is None:
        raise ApiError(
            409, f"preview {preview.id} has not been published (status {preview.status})"
        )
    create = DeploymentCreate(
        widget_id=preview.widget_id,
        deployment_id=body.deployment_id,
        source_deployment_id=preview.deployment_id,
        publish_at=body.publish_at,
        reason=body.reason,
    )
    return _enqueue(create, org, actor, session, request, response)


@router.post(
    "/{deployment_id}/cancel",
    responses={409: {"description": "The deployment is not scheduled (or already due)"}},
)
def cancel_deployment(
    deployment_id: DeploymentIdPath, org: OrgDep, session: SessionDep
) -> DeploymentPublic:
    """Cancel a scheduled deployment that has not started: it ends ``cancelled`` and never
    publishes. Cancelling it again returns it unchanged; once beat has sent it (it is due),
    it cannot be cancelled (409)."""
    dep = _get(session, org, deployment_id)
    if dep.status != "cancelled" and not schedule.cancel(session, dep):
        session.rollback()
        raise ApiError(
            409,
            f"deployment {dep.id} is {dep.status}: only a scheduled deployment that is not "
            "due yet can be cancelled",
        )
    session.commit()
    session.refresh(dep)
    return DeploymentPublic.model_validate(dep)


DEPLOYMENT_LIST_QUERY = list_query("widget_id", "created_by", "bulk_id", "target")


@router.get("")
def list_deployments(
    org: OrgDep,
    session: SessionDep,
    query: Annotated[ListQuery, Depends(DEPLOYMENT_LIST_QUERY)],
) -> list[DeploymentPublic]:
    stmt = select(Deployment).where(Deployment.organization_id == org.id)
    rows = session.exec(apply_list_query(stmt, Deployment, query)).all()
    return [DeploymentPublic.model_validate(d) for d in rows]


@router.get("/{deployment_id}", name="get_deployment")
def get_deployment(
    deployment_id: DeploymentIdPath, org: OrgDep, session: SessionDep
) -> DeploymentPublic:
    return DeploymentPublic.model_validate(_get(session, org, deployment_id))


def _snapshot(dep: Deployment) -> dict[str, Any]:
    if dep.config is None:
        raise bad_request(
            f"deployment {dep.id} has no snapshot yet (status {dep.status})",
            {"deployment_id": "no snapshot yet"},
        )
    # The deployment's own id differs between any two snapshots: not a change to review.
    return {k: v for k, v in dep.config.items() if k != "deployment_id"}


@router.get(
    "/{deployment_id}/diff",
    response_model=None,
    responses={200: {"model": list[JsonPatchOperation], "description": "RFC 6902 JSON Patch"}},
)
def diff_deployment(
    deployment_id: DeploymentIdPath,
    org: OrgDep,
    session: SessionDep,
    against: Annotated[
        str,
        Query(
            description="another deployment's `id`, or `live`",
            pattern=SAFE_ID_PATTERN,  # `live` is one too
            max_length=MAX_ID_LENGTH,
        ),
    ],
) -> JSONResponse:
    """The RFC 6902 JSON Patch that turns the ``against`` snapshot into this one: what
    publishing this snapshot (a rollback, a republish) would change on websites. ``against=live``
    compares with the widget's live deployment. ``deployment_id`` itself is left out."""
    dep = _get(session, org, deployment_id)
    if against == "live":
        widget = session.get(Widget, dep.widget_id)
        live_id = widget.live_deployment_id if widget and not widget.is_archived else None
        other = _by_deployment_id(session, org, live_id) if live_id else None
        if other is None:
            raise not_found("live deployment of widget", dep.widget_id)
    else:
        other = _get(session, org, against)
    patch = jsonpatch.make_patch(_snapshot(other), _snapshot(dep))
    return JSONResponse(patch.patch)
