"""The bulk fan-out under the explorer: one bulk job over a few widgets, its slices run by two
deliveries at once (a redelivery and a reconciler's re-send), either of which may die at any step,
while one of the widgets is archived.

The fan-out's deploy messages are recorded, not run (the deploys themselves are the other
scenarios' subject). After each schedule: the job ended fanned out; every selected widget that
is not archived has exactly one deployment of the job; every deployment of the job was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete
from sqlmodel import col, select

from tests.explorer.scheduler import Run
from tests.explorer.world import World
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import ArchiveJob, BulkJob, Deployment, Widget
from worker.services import bulk
from worker.services.archive import mark_archived
from worker.services.locking import lock_widget

WIDGETS = 2


@dataclass
class BulkWorld:
    world: World
    widget_ids: list[str]
    bulk_id: str
    sent: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> BulkWorld:
        world = World.create()
        ids = [world.widget_id]
        with unit_of_work() as s:
            for _ in range(WIDGETS - 1):
                widget = Widget(
                    id=new_id(), organization_id=world.org_id, name="w", components={"t": "A"}
                )
                s.add(widget)
                ids.append(widget.id)
        with unit_of_work("api.create_bulk") as s:
            job = bulk.create(s, world.org_id, {"widget_ids": ids}, "explorer", None)
            s.flush()
            bulk_id = job.id
        return cls(world, sorted(ids), bulk_id)

    def slices(self) -> Callable[[], None]:
        """``widgets.bulk_deploy`` as the task runs it, one widget per slice so that every
        continuation is a step of the schedule; the next message is run by the same actor."""

        def send(organization_id: str, chunk: list[tuple[str, str]]) -> None:
            self.sent.extend(deployment_id for _, deployment_id in chunk)

        def program() -> None:
            while not bulk.fan_out(self.bulk_id, send, batch=1, max_batches=1).done:
                bulk.note_continuation(self.bulk_id)

        return program

    def archive_one(self) -> Callable[[], None]:
        """DELETE /widgets/{id} of the middle widget (its archive job is not run here)."""

        def program() -> None:
            with unit_of_work("api.delete_widget") as s:
                widget = lock_widget(s, self.world.org_id, self.widget_ids[1])
                assert widget is not None
                mark_archived(s, widget)

        return program

    def violations(self) -> list[str]:
        problems: list[str] = []
        with unit_of_work() as s:
            job = s.get(BulkJob, self.bulk_id)
            assert job is not None
            deps = s.exec(select(Deployment).where(col(Deployment.bulk_id) == self.bulk_id)).all()
            archived = {
                w.id
                for w in s.exec(select(Widget).where(col(Widget.id).in_(self.widget_ids))).all()
                if w.is_archived
            }
            fanned_out, error = job.fanned_out_at, job.error
        if fanned_out is None or error is not None:
            problems.append(f"bulk job not fanned out (error {error!r})")
        per_widget: dict[str, int] = {}
        for d in deps:
            per_widget[d.widget_id] = per_widget.get(d.widget_id, 0) + 1
        for widget_id in self.widget_ids:
            n = per_widget.get(widget_id, 0)
            if n > 1 or (n == 0 and widget_id not in archived):
                problems.append(f"widget {widget_id[:8]} has {n} deployments of the job")
        unsent = [d.deployment_id for d in deps if d.deployment_id not in self.sent]
        if unsent:
            problems.append(f"{len(unsent)} deployments of the job were never sent")
        return problems


def cleanup(world: BulkWorld) -> None:
    """The job's deployments and the archive job are never run here: left ``ready`` in the
    session's database they would be every later reconciler test's candidates."""
    with unit_of_work() as s:
        s.connection().execute(delete(Deployment).where(col(Deployment.bulk_id) == world.bulk_id))
        s.connection().execute(
            delete(ArchiveJob).where(col(ArchiveJob.widget_id).in_(world.widget_ids))
        )
        s.connection().execute(delete(BulkJob).where(col(BulkJob.id) == world.bulk_id))


def bulk_actors(world: BulkWorld, run: Run, store: Callable[[], Any]) -> None:
    run.spawn("bulk", world.slices(), redeliver=world.slices())
    run.spawn("bulk-resent", world.slices())
    run.spawn("archive", world.archive_one())
