"""Row locks that serialize work on one widget across worker processes and hosts."""

from __future__ import annotations

from sqlmodel import Session, select

from worker.db import is_postgres
from worker.models import Widget


def lock_widget(session: Session, organization_id: str, widget_id: str) -> Widget | None:
    """Load the widget of this organization, locked until the transaction ends.

    PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: every transaction already holds the database
    write lock from its first statement (``BEGIN IMMEDIATE``, see :mod:`worker.db`).
    A widget of another organization is ``None``, exactly like a missing one.
    """
    stmt = select(Widget).where(Widget.id == widget_id, Widget.organization_id == organization_id)
    if is_postgres(session):
        stmt = stmt.with_for_update()
    return session.exec(stmt.execution_options(populate_existing=True)).first()
