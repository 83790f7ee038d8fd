"""Which published widgets a catalog item reaches, and marking them stale when it changes.

A purpose, or a preference with its values, is part of every snapshot that embeds it. The
``live_catalog_refs`` table says which widgets' **live** snapshots embed which items; it is
rewritten in the transaction that moves a widget's live record (:func:`replace_live_refs`).
An edit of the item then bumps those widgets' content version in its own transaction, so they
read ``unpublished_changes`` (derived from the versions, never a stored flag).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, update
from sqlmodel import Session, col, select

from worker.models import LiveCatalogRef, Widget, utcnow


def embedded_items(config: dict[str, Any] | None) -> set[str]:
    """Catalog items a snapshot embeds: its purposes and preferences (values roll up)."""
    if not config:
        return set()
    items = {str(p["id"]) for p in config.get("purposes", []) if "id" in p}
    items |= {str(p["id"]) for p in config.get("preferences", []) if "id" in p}
    return items


def replace_live_refs(
    session: Session, organization_id: str, widget_id: str, config: dict[str, Any] | None
) -> None:
    session.connection().execute(
        delete(LiveCatalogRef).where(col(LiveCatalogRef.widget_id) == widget_id)
    )
    rows = [
        {"widget_id": widget_id, "item_id": item, "organization_id": organization_id}
        for item in sorted(embedded_items(config))
    ]
    if rows:
        session.connection().execute(insert(LiveCatalogRef), rows)


def embedding_widgets(organization_id: str, item_id: str) -> Any:
    """Subquery: ids of the organization's widgets whose live snapshot embeds the item."""
    return select(LiveCatalogRef.widget_id).where(
        LiveCatalogRef.organization_id == organization_id, LiveCatalogRef.item_id == item_id
    )


def mark_embedding_widgets(session: Session, organization_id: str, item_id: str) -> int:
    """The item changed (or is gone): every widget whose live snapshot embeds it has
    unpublished changes now. Returns how many published widgets that is. Same transaction as
    the edit: both commit or neither."""
    result = session.connection().execute(
        update(Widget)
        .where(
            col(Widget.organization_id) == organization_id,
            col(Widget.id).in_(embedding_widgets(organization_id, item_id)),
            col(Widget.archived_at).is_(None),
        )
        .values(version=col(Widget.version) + 1, updated_at=utcnow())
    )
    return int(result.rowcount or 0)
