"""``/preferences`` with their values: create, list, get, patch, delete."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Response, status
from sqlmodel import Session, col, select

from api_stub.actor import ActorDep
from api_stub.deps import OrgDep, SessionDep, check_body_org, get_owned
from api_stub.errors import bad_request
from api_stub.query import ListQuery, fetch_page, list_query
from api_stub.routes.bulk import RedeployQuery, after_catalog_edit
from api_stub.schemas.catalog import (
    PreferenceCreate,
    PreferencePublic,
    PreferenceUpdate,
    PreferenceValueCreate,
    PreferenceValueIn,
    PreferenceValuePublic,
)
from api_stub.schemas.catalog_edits import PreferenceEdited
from api_stub.schemas.common import Page
from worker.models import Organization, Preference, PreferenceValue, utcnow

router = APIRouter(prefix="/preferences", tags=["preferences"])


def _values(session: Session, preference_ids: Sequence[str]) -> dict[str, list[PreferenceValue]]:
    rows = session.exec(
        select(PreferenceValue)
        .where(col(PreferenceValue.preference_id).in_(list(preference_ids)))
        .order_by(col(PreferenceValue.order), col(PreferenceValue.id))
    ).all()
    grouped: dict[str, list[PreferenceValue]] = {}
    for v in rows:
        grouped.setdefault(v.preference_id, []).append(v)
    return grouped


def _public(pref: Preference, values: Sequence[PreferenceValue]) -> PreferencePublic:
    return PreferencePublic(
        id=pref.id,
        organization_id=pref.organization_id,
        name=pref.name,
        description=pref.description,
        type=pref.type,
        metadata=pref.metadata_,
        values=[PreferenceValuePublic.model_validate(v) for v in values],
        created_at=pref.created_at,
        updated_at=pref.updated_at,
    )


def _get(session: Session, org: Organization, preference_id: str) -> Preference:
    return get_owned(session, Preference, org, preference_id, "preference")


def _replace_values(
    session: Session, pref: Preference, wanted: Sequence[PreferenceValueCreate]
) -> list[PreferenceValue]:
    """Make the preference's values exactly ``wanted``: keep those named by id, add, remove."""
    existing = {v.id: v for v in _values(session, [pref.id]).get(pref.id, [])}
    kept: list[PreferenceValue] = []
    for position, item in enumerate(wanted):
        order = item.order if item.order is not None else position
        if isinstance(item, PreferenceValueIn) and item.id is not None:
            value = existing.pop(item.id, None)
            if value is None:
                raise bad_request(
                    f"value {item.id} is not a value of this preference",
                    {f"values.{position}.id": "unknown value"},
                )
            value.name, value.metadata_, value.order = item.name, item.metadata, order
            value.updated_at = utcnow()
        else:
            value = PreferenceValue(
                preference_id=pref.id, name=item.name, metadata_=item.metadata, order=order
            )
        session.add(value)
        kept.append(value)
    for gone in existing.values():
        session.delete(gone)
    return sorted(kept, key=lambda v: (v.order, v.id))


@router.post("", status_code=status.HTTP_201_CREATED)
def create_preference(body: PreferenceCreate, org: OrgDep, session: SessionDep) -> PreferencePublic:
    check_body_org(body.organization_id, org)
    pref = Preference(
        organization_id=org.id,
        name=body.name,
        description=body.description,
        type=body.type,
        metadata_=body.metadata,
    )
    session.add(pref)
    values = _replace_values(session, pref, body.values)
    session.commit()
    return _public(pref, values)


@router.get("")
def list_preferences(
    org: OrgDep, session: SessionDep, query: Annotated[ListQuery, Depends(list_query())]
) -> Page[PreferencePublic]:
    stmt = select(Preference).where(Preference.organization_id == org.id)

    def convert(rows: Sequence[Preference]) -> list[PreferencePublic]:
        values = _values(session, [p.id for p in rows])
        return [_public(p, values.get(p.id, [])) for p in rows]

    return fetch_page(session, stmt, Preference, query, convert)


@router.get("/{preference_id}")
def get_preference(preference_id: str, org: OrgDep, session: SessionDep) -> PreferencePublic:
    pref = _get(session, org, preference_id)
    return _public(pref, _values(session, [pref.id]).get(pref.id, []))


@router.patch("/{preference_id}")
def update_preference(
    preference_id: str,
    body: PreferenceUpdate,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    response: Response,
    redeploy: RedeployQuery = False,
) -> PreferenceEdited:
    """Widgets whose live snapshot embeds the preference (or its values) get unpublished
    changes (same transaction); ``?redeploy=true`` also republishes them."""
    pref = _get(session, org, preference_id)
    for field in ("name", "description", "type"):
        if (value := getattr(body, field)) is not None:
            setattr(pref, field, value)
    if body.metadata is not None:
        pref.metadata_ = body.metadata
    pref.updated_at = utcnow()
    session.add(pref)
    if body.values is not None:
        values = _replace_values(session, pref, body.values)
    else:
        values = _values(session, [pref.id]).get(pref.id, [])
    session.flush()
    public = _public(pref, values)
    affected, job = after_catalog_edit(
        session, org, {"preference_id": pref.id}, redeploy, actor, response
    )
    return PreferenceEdited(
        **public.model_dump(), affected_widgets=affected, redeploy_bulk_id=job.id if job else None
    )


@router.delete("/{preference_id}")
def delete_preference(
    preference_id: str,
    org: OrgDep,
    actor: ActorDep,
    session: SessionDep,
    response: Response,
    redeploy: RedeployQuery = False,
) -> PreferenceEdited:
    pref = _get(session, org, preference_id)
    values = _values(session, [pref.id]).get(pref.id, [])
    removed = _public(pref, values)
    session.delete(pref)  # its values go with it (ON DELETE CASCADE)
    affected, job = after_catalog_edit(
        session, org, {"preference_id": preference_id}, redeploy, actor, response
    )
    return PreferenceEdited(
        **removed.model_dump(), affected_widgets=affected, redeploy_bulk_id=job.id if job else None
    )
