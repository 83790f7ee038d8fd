"""``/widgets``: create, list, get, patch. Archived widgets are invisible here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, status
from sqlmodel import Session, col, select

from api_stub.deps import OrgDep, SessionDep, check_body_org, require_safe_path_id
from api_stub.errors import bad_request, not_found
from api_stub.query import ListQuery, fetch_page, list_query
from api_stub.schemas.common import Page
from api_stub.schemas.widgets import WidgetCreate, WidgetPublic, WidgetUpdate
from worker.models import Organization, Preference, Purpose, Widget
from worker.services.locking import lock_widget

router = APIRouter(prefix="/widgets", tags=["widgets"])


def get_live_widget(session: Session, org: Organization, widget_id: str) -> Widget:
    """The organization's widget, unless archived; anything else is a 404 (no existence leak)."""
    require_safe_path_id(widget_id, "widget_id")
    widget = session.get(Widget, widget_id)
    if widget is None or widget.organization_id != org.id or widget.is_archived:
        raise not_found("widget", widget_id)
    return widget


def _check_selected(
    session: Session,
    org: Organization,
    purposes: Sequence[str] | None,
    preferences: Sequence[str] | None,
) -> None:
    """Selected entities must exist in the same organization (tenants never mix)."""
    for field, model, ids in (
        ("selected_purposes_ids", Purpose, purposes),
        ("selected_preferences_ids", Preference, preferences),
    ):
        if not ids:
            continue
        found = set(
            session.exec(
                select(model.id).where(
                    col(model.id).in_(list(ids)),
                    model.organization_id == org.id,
                )
            ).all()
        )
        missing = [i for i in ids if i not in found]
        if missing:
            raise bad_request(
                f"{field}: unknown ids {', '.join(missing)}", {field: f"unknown ids: {missing}"}
            )


@router.post("", status_code=status.HTTP_201_CREATED)
def create_widget(body: WidgetCreate, org: OrgDep, session: SessionDep) -> WidgetPublic:
    check_body_org(body.organization_id, org)
    _check_selected(session, org, body.selected_purposes_ids, body.selected_preferences_ids)
    fields = body.model_dump(exclude={"organization_id"})
    fields["last_domain_used"] = fields["last_domain_used"] or body.domain
    widget = Widget(organization_id=org.id, **fields)
    session.add(widget)
    session.commit()
    return WidgetPublic.model_validate(widget)


@router.get("")
def list_widgets(
    org: OrgDep, session: SessionDep, query: Annotated[ListQuery, Depends(list_query())]
) -> Page[WidgetPublic]:
    stmt = select(Widget).where(Widget.organization_id == org.id, col(Widget.archived_at).is_(None))
    return fetch_page(
        session, stmt, Widget, query, lambda rows: [WidgetPublic.model_validate(w) for w in rows]
    )


@router.get("/{widget_id}")
def get_widget(widget_id: str, org: OrgDep, session: SessionDep) -> WidgetPublic:
    return WidgetPublic.model_validate(get_live_widget(session, org, widget_id))


@router.patch("/{widget_id}")
def update_widget(
    widget_id: str, body: WidgetUpdate, org: OrgDep, session: SessionDep
) -> WidgetPublic:
    """An edit bumps the content version: a published widget now has unpublished changes."""
    get_live_widget(session, org, widget_id)
    # Locked: two concurrent edits must both bump the version, and a deploy snapshotting the
    # widget sees either the old or the new content, never half of it.
    widget = lock_widget(session, org.id, widget_id)
    assert widget is not None
    changes = body.model_dump(exclude_unset=True)
    none_for_required = [k for k in ("name", "format", "template_id") if changes.get(k, 1) is None]
    if none_for_required:
        raise bad_request(
            f"{', '.join(none_for_required)} cannot be null",
            {k: "cannot be null" for k in none_for_required},
        )
    _check_selected(session, org, body.selected_purposes_ids, body.selected_preferences_ids)
    edited = {k: v for k, v in changes.items() if getattr(widget, k) != v}
    if edited:
        for key, value in edited.items():
            setattr(widget, key, value)
        if edited.get("domain") and "last_domain_used" not in changes:
            widget.last_domain_used = edited["domain"]
        widget.touch_content()
        session.add(widget)
        session.commit()
    return WidgetPublic.model_validate(widget)
