"""``/widgets/deployments``: enqueue a deploy (202), list (plain array), get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api_stub.deps import OrgDep, SessionDep, check_body_org, get_owned
from api_stub.errors import ApiError
from api_stub.query import ListQuery, apply_list_query, list_query
from api_stub.routes.widgets import get_live_widget
from api_stub.schemas.deployments import DeploymentCreate, DeploymentPublic
from worker import producer
from worker.models import Deployment, Organization, utcnow

router = APIRouter(prefix="/widgets/deployments", tags=["deployments"])


def _get(session: Session, org: Organization, ident: str) -> Deployment:
    return get_owned(session, Deployment, org, ident, "deployment")


def _accepted(request: Request, response: Response, dep: Deployment) -> DeploymentPublic:
    url = request.url_for("get_deployment", deployment_id=dep.id)
    response.headers["Location"] = f"{url.path}?organization_id={dep.organization_id}"
    return DeploymentPublic.model_validate(dep)


def _by_deployment_id(session: Session, deployment_id: str) -> Deployment | None:
    return session.exec(select(Deployment).where(Deployment.deployment_id == deployment_id)).first()


def _repeat(
    request: Request, response: Response, org: Organization, body: DeploymentCreate, dep: Deployment
) -> DeploymentPublic:
    """A repeated request with the same idempotency key: the same deployment, no new job."""
    if dep.organization_id != org.id or dep.widget_id != body.widget_id:
        raise ApiError(409, f"deployment_id {body.deployment_id} is already used")
    return _accepted(request, response, dep)


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def create_deployment(
    body: DeploymentCreate,
    org: OrgDep,
    session: SessionDep,
    request: Request,
    response: Response,
) -> DeploymentPublic:
    """Accept a deploy: the row is committed (``ready``), then the job is sent to the workers."""
    check_body_org(body.organization_id, org)
    if body.deployment_id is not None and (
        existing := _by_deployment_id(session, body.deployment_id)
    ):
        return _repeat(request, response, org, body, existing)
    # No lock: an archive that lands after this check is seen by the worker, which then fails
    # the deployment ("widget archived") and publishes nothing.
    widget = get_live_widget(session, org, body.widget_id)
    dep = Deployment(organization_id=org.id, widget_id=widget.id, enqueued_at=utcnow())
    if body.deployment_id is not None:
        dep.deployment_id = body.deployment_id
    session.add(dep)
    try:
        session.commit()
    except IntegrityError:
        # The same deployment_id sent twice at once: the other request created it.
        session.rollback()
        assert body.deployment_id is not None
        existing = _by_deployment_id(session, body.deployment_id)
        if existing is None:
            raise
        return _repeat(request, response, org, body, existing)
    producer.send_deploy(org.id, widget.id, dep.deployment_id)
    return _accepted(request, response, dep)


@router.get("")
def list_deployments(
    org: OrgDep, session: SessionDep, query: Annotated[ListQuery, Depends(list_query("widget_id"))]
) -> list[DeploymentPublic]:
    stmt = select(Deployment).where(Deployment.organization_id == org.id)
    rows = session.exec(apply_list_query(stmt, Deployment, query)).all()
    return [DeploymentPublic.model_validate(d) for d in rows]


@router.get("/{deployment_id}", name="get_deployment")
def get_deployment(deployment_id: str, org: OrgDep, session: SessionDep) -> DeploymentPublic:
    return DeploymentPublic.model_validate(_get(session, org, deployment_id))
