"""Which widgets a catalog item reaches, and marking them stale when it changes.

A purpose, or a preference with its values, is part of every snapshot that embeds it. The
``snapshot_catalog_refs`` table says which items each **frozen** snapshot of a widget embeds:
rows are written in the transaction that freezes the snapshot (:func:`add_snapshot_refs`) and
pruned below the live sequence when the widget's live record moves (:func:`prune_refs`). An
edit of the item bumps the content version of every widget with a ref to it, in the edit's own
transaction, so they read ``unpublished_changes`` (derived from the versions, never a stored
flag): a snapshot frozen before the edit carries the old version and, once recorded live, leaves
the widget ``unpublished_changes``.

**Where the edit and the deploy meet.** A freeze and a catalog edit each read what the other
writes (the freeze reads the item and writes refs; the edit writes the item and reads refs).
Under PostgreSQL's READ COMMITTED both could read before either commits (a write skew: the
freeze takes the old text, the edit finds no ref). Both therefore lock the organization's row
first: the freeze ``FOR SHARE`` (freezes do not wait for each other), the edit ``FOR UPDATE``
(:func:`lock_catalog`). Whichever locks second sees everything the first committed: the edit
finds the freeze's refs, or the freeze reads the edited item. On SQLite every write transaction
holds the database lock from its first statement, which orders them the same way.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, update
from sqlmodel import Session, col, select

from worker.db import is_postgres
from worker.models import Organization, SnapshotCatalogRef, Widget, utcnow


def embedded_items(config: dict[str, Any] | None) -> set[str]:
    """Catalog items a snapshot embeds: its purposes and preferences (values roll up)."""
    if not config:
        return set()
    items = {str(p["id"]) for p in config.get("purposes", []) if "id" in p}
    items |= {str(p["id"]) for p in config.get("preferences", []) if "id" in p}
    return items


def lock_for_freeze(session: Session, organization_id: str) -> Organization | None:
    """The organization, share-locked until the freeze commits (see the module docstring)."""
    stmt = select(Organization).where(Organization.id == organization_id)
    if is_postgres(session):
        stmt = stmt.with_for_update(read=True)
    return session.exec(stmt).first()


def org_for_freeze(organization_id: str) -> Any:
    """The organization's ``id`` and ``api_key`` as a CTE share-locked like
    :func:`lock_for_freeze`, for the freeze's one ``UPDATE widgets ... FROM`` (PostgreSQL:
    the join reads, so locks, the organization before the widget row is updated, the same
    order as a catalog edit's)."""
    return (
        select(Organization.id, Organization.api_key)
        .where(Organization.id == organization_id)
        .with_for_update(read=True)
        .cte("org")
    )


def lock_catalog(session: Session, organization_id: str) -> None:
    """A catalog edit is about to run: wait for freezes in flight, keep new ones out until it
    commits (see the module docstring). Call it before the edit reads the refs."""
    if is_postgres(session):
        session.exec(
            select(Organization.id).where(Organization.id == organization_id).with_for_update()
        ).first()


def add_snapshot_refs(
    session: Session, organization_id: str, widget_id: str, sequence: int, config: dict[str, Any]
) -> None:
    """The items snapshot ``sequence`` of the widget embeds (same transaction as the freeze)."""
    rows = [
        {
            "widget_id": widget_id,
            "sequence": sequence,
            "item_id": item,
            "organization_id": organization_id,
        }
        for item in sorted(embedded_items(config))
    ]
    if rows:
        session.connection().execute(insert(SnapshotCatalogRef), rows)


def prune_refs(session: Session, widget_id: str, live_seq: int) -> None:
    """Snapshots below the live sequence can never become live: drop their refs."""
    if live_seq <= 1:
        return  # sequences start at 1: nothing below the first
    session.connection().execute(
        delete(SnapshotCatalogRef).where(
            col(SnapshotCatalogRef.widget_id) == widget_id,
            col(SnapshotCatalogRef.sequence) < live_seq,
        )
    )


def embedding_widgets(organization_id: str, item_id: str) -> Any:
    """Subquery: ids of the organization's widgets whose live snapshot, or a snapshot frozen
    since that may still become live, embeds the item."""
    return select(SnapshotCatalogRef.widget_id).where(
        SnapshotCatalogRef.organization_id == organization_id,
        SnapshotCatalogRef.item_id == item_id,
    )


def mark_embedding_widgets(session: Session, organization_id: str, item_id: str) -> int:
    """The item changed (or is gone): every widget whose live or in-flight snapshot embeds it
    has unpublished changes now. Returns how many widgets that is. Same transaction as the edit:
    both commit or neither."""
    lock_catalog(session, organization_id)
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
