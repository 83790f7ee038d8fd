"""Scheduled deploys: frozen when requested, sent by beat when due, from the database.

A deployment with a ``publish_at`` is committed ``scheduled`` with its snapshot frozen and its
sequence taken in the request's transaction (:func:`worker.services.deploy.freeze_scheduled`):
what was reviewed is what goes live, and a deploy requested later is newer and wins, as always.

It is **not** a Celery ETA message: on Redis those sit unacknowledged until the visibility
timeout redelivers them, and vanish with the broker. Instead beat's tick
(``widgets.send_due_deployments``, every ``SCHEDULE_TICK_SECONDS``) moves the due ones to
``ready`` in one transaction (:func:`take_due`) and sends them after the commit. From there they
are ordinary deployments: a lost message (a broker flush, a tick killed between commit and
send) is re-sent by the reconciler, a killed worker's delivery is redelivered, so a due deploy is
late by at most one tick plus the reconciler's bound, and never lost or doubled.

:func:`take_due` and :func:`cancel` are each one conditional ``UPDATE ... WHERE status =
'scheduled'``: whichever commits first wins, and the other sees that it lost.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from worker.db import unit_of_work
from worker.models import SCHEDULED, Deployment, utcnow

# How far ahead a deploy may be scheduled.
MAX_SCHEDULE_AHEAD = timedelta(days=366)
# Due deployments sent by one tick (the next tick takes the rest).
DUE_BATCH = 500

Job = tuple[str, str, str]  # organization_id, widget_id, deployment_id


def schedule_problem(publish_at: datetime, now: datetime) -> str | None:
    """Why ``publish_at`` cannot be a deployment's publish time, or None."""
    if publish_at.tzinfo is None:
        return "publish_at needs a time zone offset (RFC 3339), e.g. 2027-01-01T09:00:00Z"
    if publish_at <= now:
        return "publish_at must be in the future"
    if publish_at > now + MAX_SCHEDULE_AHEAD:
        return f"publish_at must be within {MAX_SCHEDULE_AHEAD.days} days"
    return None


def take_due(now: datetime, limit: int = DUE_BATCH) -> list[Job]:
    """Move the deployments due at ``now`` from ``scheduled`` to ``ready`` (enqueued now, so
    the reconciler re-sends any whose message is lost), oldest due first; the caller sends them
    after this commit."""
    with unit_of_work("schedule.take_due") as session:
        due = session.exec(
            select(Deployment.id)
            .where(col(Deployment.status) == SCHEDULED, col(Deployment.publish_at) <= now)
            .order_by(col(Deployment.publish_at))
            .limit(limit)
        ).all()
        if not due:
            return []
        rows = session.execute(
            update(Deployment)
            .where(col(Deployment.id).in_(due), col(Deployment.status) == SCHEDULED)
            .values(status="ready", enqueued_at=now, updated_at=now)
            .returning(
                col(Deployment.organization_id),
                col(Deployment.widget_id),
                col(Deployment.deployment_id),
            ),
            execution_options={"synchronize_session": False},
        ).all()
        return [(org, widget, dep) for org, widget, dep in rows]


def cancel(session: Session, dep: Deployment) -> bool:
    """``cancelled``, if still ``scheduled`` (the tick has not taken it): False if it has."""
    now = utcnow()
    result = session.connection().execute(
        update(Deployment)
        .where(col(Deployment.id) == dep.id, col(Deployment.status) == SCHEDULED)
        .values(status="cancelled", finished_at=now, updated_at=now)
    )
    return bool(result.rowcount)
