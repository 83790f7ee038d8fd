"""What the database knows about a widget's live file, and its forward-only updates.

The widget row records the sequence, ETag and deployment of what is live (``live_seq``,
``live_etag``, ``live_deployment_id``), and the same for its preview file (``preview_live_*``):
each file is a :class:`Channel`, with its own record and its own order, so a preview never
overtakes, coalesces with or fences a production deploy (the sequences come from one counter,
which keeps them increasing in each). Two compare-and-set updates move a record, each a single
``UPDATE ... WHERE`` in a short transaction, never across an S3 call:

* :func:`record_put`: after a successful write of sequence *s*: only if nothing of a sequence
  ``>= s`` is recorded (forward only).
* :func:`record_same_content`: a deployment whose content is already live takes the live
  sequence without writing, but only if the record is still exactly the one it read; a publish
  that lands in between changes the record, and the caller decides again.

S3's conditional writes decide what the *file* is; these decide what the database says about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import literal_column, update
from sqlmodel import Session, col, or_, select

from worker.db import is_postgres
from worker.models import ArchiveJob, Deployment, Organization, Widget
from worker.services.catalog_impact import org_for_freeze, prune_refs

# Frozen above a deployment, yet not a newer snapshot it may coalesce into: failed, or waiting
# for its publish time (scheduled), or cancelled before it (it will never publish).
NEVER_NEWER = ("failure", "scheduled", "cancelled")

ARCHIVED_ERROR = "widget archived: deployments of an archived widget are not published"
NOT_FOUND_ERROR = "widget not found (deleted, or not a widget of this organization)"


@dataclass(frozen=True)
class Channel:
    """A file a widget's deployments publish to, and the widget columns that record it."""

    target: str  # ``deployments.target``
    seq: str
    etag: str
    deployment_id: str

    def column(self, name: str) -> Any:
        return getattr(Widget, getattr(self, name))

    def live(self, widget: Widget, content_checksum: str | None) -> Live:
        return Live(
            getattr(widget, self.seq),
            getattr(widget, self.etag),
            content_checksum,
            getattr(widget, self.deployment_id),
        )

    def live_seq(self, widget: Widget) -> int | None:
        seq: int | None = getattr(widget, self.seq)
        return seq

    @property
    def is_production(self) -> bool:
        return self.target == "production"


# The container file websites load; the widget's publication status follows it alone.
PRODUCTION = Channel("production", "live_seq", "live_etag", "live_deployment_id")
# The preview file: its own record, never the widget's status or its catalog refs.
PREVIEW = Channel("preview", "preview_live_seq", "preview_live_etag", "preview_live_deployment_id")


def channel_of(target: str) -> Channel:
    return PREVIEW if target == PREVIEW.target else PRODUCTION


@dataclass(frozen=True)
class Live:
    """What is (believed) live: from the database, or from a HEAD of the file itself."""

    seq: int | None = None
    etag: str | None = None
    content_checksum: str | None = None
    deployment_id: str | None = None

    @property
    def exists(self) -> bool:
        return self.etag is not None


@dataclass(frozen=True)
class WidgetState:
    """One read of everything a publish decision needs."""

    gone: str | None  # why nothing may be published any more (archived, deleted), else None
    live: Live
    newer_deployment_id: str | None  # a newer snapshot of the widget that has not failed


def gone_reason(
    session: Session, organization_id: str, widget_id: str, widget: Widget | None
) -> str | None:
    if widget is not None:
        return ARCHIVED_ERROR if widget.is_archived else None
    # Gone: archived (and already removed by its archive job), or never this org's widget.
    archived = session.exec(
        select(ArchiveJob.id).where(
            ArchiveJob.organization_id == organization_id, ArchiveJob.widget_id == widget_id
        )
    ).first()
    return ARCHIVED_ERROR if archived is not None else NOT_FOUND_ERROR


def find_deployment(
    session: Session, organization_id: str, deployment_id: str, lock: bool = False
) -> Deployment | None:
    """The deployment ``deployment_id`` of this organization: the key is unique per
    organization only, so it is never looked up without one."""
    stmt = select(Deployment).where(
        Deployment.organization_id == organization_id, Deployment.deployment_id == deployment_id
    )
    if lock and is_postgres(session):
        stmt = stmt.with_for_update()
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def deployment_at(session: Session, widget_id: str, sequence: int) -> Deployment | None:
    stmt = select(Deployment).where(
        Deployment.widget_id == widget_id, Deployment.sequence == sequence
    )
    return session.exec(stmt).first()


def load_widget(session: Session, organization_id: str, widget_id: str) -> Widget | None:
    stmt = select(Widget).where(Widget.id == widget_id, Widget.organization_id == organization_id)
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def _live_content_checksum(channel: Channel) -> Any:
    """Column: the content checksum of the deployment the widget row records as live in
    ``channel``."""
    # Spelled out: SQLite's RETURNING is compiled with bare column names, which inside the
    # subquery would name the deployments table's own (it has a live_deployment_id too).
    widgets = Widget.__tablename__
    return (
        select(Deployment.content_checksum)
        .where(
            Deployment.organization_id == literal_column(f"{widgets}.organization_id"),
            Deployment.deployment_id == literal_column(f"{widgets}.{channel.deployment_id}"),
        )
        .scalar_subquery()
    )


@dataclass(frozen=True)
class Loaded:
    """The widget as one statement read it: with the content checksum of its live file and
    (when frozen for a deploy) its organization's ``api_key``."""

    widget: Widget
    live_checksum: str | None
    api_key: str = ""


def load_with_live(
    session: Session, organization_id: str, widget_id: str, channel: Channel = PRODUCTION
) -> Loaded | None:
    stmt = select(Widget, _live_content_checksum(channel)).where(
        Widget.id == widget_id, Widget.organization_id == organization_id
    )
    row = session.execute(stmt.execution_options(populate_existing=True)).first()
    return None if row is None else Loaded(row[0], row[1])


def take_sequence(
    session: Session, organization_id: str, widget_id: str, channel: Channel = PRODUCTION
) -> Loaded | None:
    """One statement for a first freeze: the widget's next publish sequence taken
    (``publish_seq``, by an ``UPDATE ... RETURNING`` that locks the widget row until commit),
    returning the widget, its live file's content checksum and its organization's ``api_key``.
    None: no such widget of this organization.

    The UPDATE's lock is what makes sequence order snapshot order: the snapshot read *after*
    it is at least as new as that of any smaller sequence (a PATCH or a catalog edit of the
    widget waits for the lock, or committed before it). On PostgreSQL the organization is
    share-locked by the same statement (:func:`catalog_impact.org_for_freeze`); SQLite's
    transactions hold the database write lock from BEGIN, and its RETURNING cannot name a
    joined table, so the ``api_key`` is a subquery there. A preview's sequence is also noted
    as ``preview_seq`` (the widget may now have a preview file: an archive takes it down).
    """
    next_seq = col(Widget.publish_seq) + 1
    stmt = update(Widget).values(
        publish_seq=next_seq, **({} if channel.is_production else {"preview_seq": next_seq})
    )
    if is_postgres(session):
        org = org_for_freeze(organization_id)
        stmt = stmt.where(col(Widget.id) == widget_id, col(Widget.organization_id) == org.c.id)
        api_key: Any = org.c.api_key
    else:
        stmt = stmt.where(
            col(Widget.id) == widget_id, col(Widget.organization_id) == organization_id
        )
        api_key = (
            select(Organization.api_key).where(Organization.id == organization_id).scalar_subquery()
        )
    returning = stmt.returning(Widget, _live_content_checksum(channel), api_key)
    row = session.execute(
        returning, execution_options={"synchronize_session": False, "populate_existing": True}
    ).first()
    return None if row is None else Loaded(row[0], row[1], row[2])


def read_state(
    session: Session,
    dep: Deployment,
    loaded: tuple[Loaded | None, str | None] | None = None,
) -> WidgetState:
    """The widget's live state as frozen deployment ``dep`` must decide from. ``loaded``: the
    widget (with its live checksum) and its gone reason, when this transaction read them."""
    assert dep.sequence is not None
    organization_id, widget_id = dep.organization_id, dep.widget_id
    channel = channel_of(dep.target)
    if loaded is None:
        found = load_with_live(session, organization_id, widget_id, channel)
        widget = found.widget if found else None
        gone = gone_reason(session, organization_id, widget_id, widget)
    else:
        found, gone = loaded
        widget = found.widget if found else None
    if gone is not None or widget is None or found is None:
        return WidgetState(gone or NOT_FOUND_ERROR, Live(), None)
    content = found.live_checksum
    # Newer than ``dep`` in its channel: frozen with a higher sequence and not failed, or
    # requested after it and still waiting to be frozen (it will take a higher sequence).
    # Publishing ``dep`` first would only be overwritten: bursts coalesce into the newest request.
    newer = session.exec(
        select(Deployment.deployment_id)
        .where(
            Deployment.widget_id == widget_id,
            Deployment.target == dep.target,
            Deployment.deployment_id != dep.deployment_id,
            or_(
                (col(Deployment.sequence) > dep.sequence)
                & col(Deployment.status).not_in(NEVER_NEWER),
                col(Deployment.sequence).is_(None)
                & (col(Deployment.status) == "ready")
                & (col(Deployment.created_at) >= dep.created_at),
            ),
        )
        .order_by(col(Deployment.created_at).desc())
        .limit(1)
    ).first()
    return WidgetState(None, channel.live(widget, content), newer)


def record_put(session: Session, dep: Deployment, etag: str) -> bool:
    """Forward-only: this deployment's file is live at ``dep.sequence``. False if a sequence at
    least as high is already recorded, or the widget was archived meanwhile."""
    assert dep.sequence is not None
    channel = channel_of(dep.target)
    live_seq = channel.column("seq")
    result = session.connection().execute(
        update(Widget)
        .where(
            col(Widget.id) == dep.widget_id,
            col(Widget.archived_at).is_(None),
            live_seq.is_(None) | (live_seq < dep.sequence),
        )
        .values(_record_values(channel, dep, etag, dep.deployment_id))
    )
    return _recorded(session, channel, dep, result.rowcount)


def _record_values(
    channel: Channel, dep: Deployment, etag: str | None, deployment_id: str | None
) -> dict[str, Any]:
    """The record of ``channel`` now at ``dep``'s sequence, with the file ``etag`` of
    ``deployment_id``; a production record carries the widget's published version with it."""
    values: dict[str, Any] = {
        channel.seq: dep.sequence,
        channel.etag: etag,
        channel.deployment_id: deployment_id,
    }
    if channel.is_production:
        values["published_version"] = dep.widget_version
    return values


def _recorded(session: Session, channel: Channel, dep: Deployment, rowcount: int) -> bool:
    if not rowcount:
        return False
    if channel.is_production:  # only production snapshots have catalog refs
        assert dep.sequence is not None
        prune_refs(session, dep.widget_id, dep.sequence)
    return True


def record_same_content(session: Session, dep: Deployment, seen: Live, file: Live) -> bool:
    """Compare-and-set on exactly the record read (``seen``): the live file (``file``, equal in
    content to this deployment) now stands for this deployment's sequence."""
    assert dep.sequence is not None
    channel = channel_of(dep.target)
    seen_seq = channel.column("seq")
    matches = seen_seq.is_(None) if seen.seq is None else seen_seq == seen.seq
    result = session.connection().execute(
        update(Widget)
        .where(col(Widget.id) == dep.widget_id, col(Widget.archived_at).is_(None), matches)
        .values(_record_values(channel, dep, file.etag, file.deployment_id))
    )
    return _recorded(session, channel, dep, result.rowcount)


def record_restored(session: Session, target: Deployment, etag: str) -> None:
    """The recorded live sequence's snapshot (``target``) was written back over a stray file:
    its ETag, and the deployment whose bytes are live now."""
    channel = channel_of(target.target)
    session.connection().execute(
        update(Widget)
        .where(col(Widget.id) == target.widget_id, channel.column("seq") == target.sequence)
        .values({channel.etag: etag, channel.deployment_id: target.deployment_id})
    )


def others_frozen_above(session: Session, dep: Deployment, live_seq: int | None) -> bool:
    """Is another snapshot of the widget frozen above the live sequence? Each such one may still
    have a write in flight conditioned on the live file's ETag (:mod:`worker.services.publish`,
    the same-content fence)."""
    stmt = select(Deployment.id).where(
        Deployment.widget_id == dep.widget_id,
        Deployment.target == dep.target,
        Deployment.deployment_id != dep.deployment_id,
        col(Deployment.sequence) > (live_seq or 0),
    )
    return session.exec(stmt.limit(1)).first() is not None
