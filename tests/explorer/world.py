"""What the explorer's actors act on, the actors themselves, and the invariants checked after each
schedule: a fresh organization and widget per schedule in the real database, the real S3 (moto)
behind a store whose calls are steps, and the jobs as the Celery tasks run them.

The actors call the same service functions as the tasks and the API routes do; where a route's
transaction is a few lines around a service call (a PATCH, a DELETE), the actor repeats those
lines in one named transaction.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlmodel import select

from tests.explorer.scheduler import GO, HOLD, LOSE_ANSWER, Run
from worker.db import unit_of_work
from worker.ids import new_id
from worker.models import (
    ArchiveJob,
    Deployment,
    Organization,
    Purpose,
    Widget,
    utcnow,
)
from worker.s3 import PreconditionFailed, S3Store, StoredObject, TransientS3Error
from worker.services import archive_chunk, deploy_chunk, late_writes
from worker.services import deploy as deploy_service
from worker.services.archive import mark_archived, run_archive
from worker.services.catalog_impact import mark_embedding_widgets
from worker.services.chunking import one_by_one
from worker.services.live_state import PREVIEW, PRODUCTION, Channel
from worker.services.locking import lock_widget
from worker.services.snapshot import build_snapshot, content_checksum
from worker.storage_keys import container_key, preview_key


class SteppedStore:
    """The real store, each call a step of the calling actor; writes may be held or lose their
    answer when the schedule says so."""

    def __init__(self, store: S3Store, run: Run) -> None:
        self._store = store
        self._run = run

    def head(self, key: str) -> StoredObject | None:
        self._run.checkpoint("s3.head")
        return self._store.head(key)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        self._run.checkpoint("s3.delete")
        self._store.delete(key, if_match=if_match)

    def list_keys(self, prefix: str) -> list[str]:
        self._run.checkpoint("s3.list")
        return self._store.list_keys(prefix)

    def put_json(
        self,
        key: str,
        body: bytes,
        *,
        metadata: dict[str, str],
        if_match: str | None = None,
        if_none_match: bool = False,
        cache_control: str | None = None,
    ) -> str:
        action = self._run.checkpoint("s3.put")

        def send() -> str:
            return self._store.put_json(
                key,
                body,
                metadata=metadata,
                if_match=if_match,
                if_none_match=if_none_match,
                cache_control=cache_control,
            )

        if action == HOLD:
            actor = self._run.current()
            assert actor is not None

            def land() -> None:
                self._run.checkpoint("s3.land")
                # A failed condition when it arrives: nothing written.
                with contextlib.suppress(PreconditionFailed):
                    send()

            self._run.spawn(f"{actor.name.split('#')[0]}-held-put", land)
            raise TransientS3Error(f"S3 put {key} failed: no answer (held up in the network)")
        etag = send()
        if action == LOSE_ANSWER:
            raise TransientS3Error(f"S3 put {key} failed: connection lost after the request")
        assert action == GO
        return etag


@dataclass
class World:
    """One schedule's organization, catalog and widget."""

    org_id: str
    api_key: str
    widget_id: str
    purposes: dict[str, str]  # name → id
    key: str
    preview_key: str
    deployments: list[str] = field(default_factory=list)
    held: bool = False

    # -- setup (outside the schedule) ------------------------------------------------------

    @classmethod
    def create(
        cls, *, selected: tuple[str, ...] = ("p",), catalog: tuple[str, ...] = ("p", "q")
    ) -> World:
        org_id, api_key, widget_id = new_id(), "k" + new_id()[:20], new_id()
        with unit_of_work() as s:
            s.add(Organization(id=org_id, name="explorer", api_key=api_key))
            s.flush()
            purposes = {}
            for name in catalog:
                p = Purpose(organization_id=org_id, description={"en": f"{name} v1"})
                s.add(p)
                purposes[name] = p.id
            s.add(
                Widget(
                    id=widget_id,
                    organization_id=org_id,
                    name="w",
                    selected_purposes_ids=[purposes[n] for n in selected],
                    components={"text": "A"},
                )
            )
        return cls(
            org_id,
            api_key,
            widget_id,
            purposes,
            container_key(api_key, widget_id),
            preview_key(api_key, widget_id),
        )

    def queue(self, target: str = "production") -> str:
        """A deployment row as the API commits it."""
        dep = Deployment(
            organization_id=self.org_id,
            widget_id=self.widget_id,
            target=target,
            enqueued_at=utcnow(),
        )
        with unit_of_work("api.create_deployment") as s:
            s.add(dep)
        self.deployments.append(dep.deployment_id)
        return dep.deployment_id

    def publish_now(self, store: S3Store) -> str:
        """Setup: a deploy run to the end outside any schedule."""
        dep_id = self.queue()
        out = deploy_service.run_deployment(self.org_id, self.widget_id, dep_id, lambda: store)
        assert out.status == "success", out
        return dep_id

    # -- the actors' programs --------------------------------------------------------------

    def deploy_job(
        self, dep_id: str, store: Callable[[], Any], runs: int = 3
    ) -> Callable[[], None]:
        """``widgets.deploy`` as the task runs it: retried on transient errors (each retry noted),
        then recorded as failed (checked on S3) when out of runs."""

        def program() -> None:
            for _ in range(runs):
                try:
                    deploy_service.run_deployment(self.org_id, self.widget_id, dep_id, store)
                    return
                except TransientS3Error as exc:
                    deploy_service.note_retry(self.org_id, dep_id, str(exc))
            deploy_service.record_failure(
                self.org_id, self.widget_id, dep_id, "out of retries", store
            )

        return program

    def chunk_job(self, dep_id: str, store: Callable[[], Any], run: Run) -> Callable[[], None]:
        """``widgets.deploy_chunk`` naming this widget's deployment (a bulk redeploy's chunk):
        frozen in the chunk's transaction, published in the chunk; a deployment handed back is
        sent as a single ``widgets.deploy``, run here as an actor of its own. The chunk's jobs
        run one by one in the actor's thread (the explorer schedules actors, not a pool's
        threads); they are of different widgets and never contend."""

        def hand_back(organization_id: str, widget_id: str, deployment_id: str) -> None:
            run.spawn("handed-back", self.deploy_job(deployment_id, store))

        def program() -> None:
            items = [(self.widget_id, dep_id)]
            deploy_chunk.run_chunk(self.org_id, items, store, hand_back, map_fn=one_by_one)

        return program

    def give_up_job(self, dep_id: str, store: Callable[[], Any]) -> Callable[[], None]:
        """Another delivery of the same deployment that gives up at once (the attempts cap, the
        reconciler's give-up): :func:`deploy_service.record_failure`."""
        return lambda: deploy_service.record_failure(
            self.org_id, self.widget_id, dep_id, "gave up", store
        )

    def edit_widget(self, text: str) -> Callable[[], None]:
        """PATCH /widgets/{id} (components): the route's transaction."""

        def program() -> None:
            with unit_of_work("api.patch_widget") as s:
                widget = lock_widget(s, self.org_id, self.widget_id)
                if widget is None or widget.is_archived:
                    return  # the API answers 404
                widget.components = {"text": text}
                widget.touch_content()
                s.add(widget)

        return program

    def edit_then_deploy(self, text: str, store: Callable[[], Any]) -> Callable[[], None]:
        edit = self.edit_widget(text)

        def program() -> None:
            edit()
            dep_id = self.queue()
            self.deploy_job(dep_id, store)()

        return program

    def edit_purpose(self, name: str, text: str) -> Callable[[], None]:
        """PATCH /metadata/purposes/{id}: the route's transaction (edit and mark together)."""

        def program() -> None:
            with unit_of_work("api.patch_purpose") as s:
                purpose = s.get(Purpose, self.purposes[name])
                assert purpose is not None
                purpose.description = {"en": text}
                purpose.updated_at = utcnow()
                s.add(purpose)
                mark_embedding_widgets(s, self.org_id, purpose.id)

        return program

    def archive(self, store: Callable[[], Any]) -> tuple[Callable[[], None], Callable[[], None]]:
        """DELETE /widgets/{id} then ``widgets.archive``; returns (program, redelivery)."""

        def job(job_id: str) -> None:
            run_archive(self.org_id, self.widget_id, job_id, store)

        return self._marked_then(job, "api.delete_widget")

    def archive_in_chunk(
        self, store: Callable[[], Any], run: Run
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """The cleanup's way: the widget marked archived, then its job run in a
        ``widgets.archive_chunk`` (claimed in the chunk's transaction); returns (program,
        redelivery of the chunk). A job handed back runs as a single archive, an actor."""

        def hand_back(organization_id: str, widget_id: str, job_id: str) -> None:
            run.spawn("handed-back", lambda: run_archive(self.org_id, widget_id, job_id, store))

        def job(job_id: str) -> None:
            items = [(self.widget_id, job_id)]
            archive_chunk.run_chunk(self.org_id, items, store, hand_back, map_fn=one_by_one)

        return self._marked_then(job, "cleanup.mark_archived")

    def _marked_then(
        self, job: Callable[[str], None], step: str
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """(program, redelivery): the widget marked archived with its job in transaction
        ``step`` (the DELETE route's, or the cleanup's), then ``job`` run on it."""
        job_ids: list[str] = []

        def delivery() -> None:
            if job_ids:  # else the marking transaction died: nothing was queued
                job(job_ids[0])

        def program() -> None:
            with unit_of_work(step) as s:
                widget = lock_widget(s, self.org_id, self.widget_id)
                assert widget is not None
                created = mark_archived(s, widget)
                s.flush()
                job_ids.append(created.id)
            delivery()

        return program, delivery

    # -- the invariants --------------------------------------------------------------------

    def after_horizon(self, store: S3Store) -> None:
        """Every held request has landed: beat's late-write check runs (its horizon passed)."""
        # Rows left unchecked by earlier schedules (checked only when one held a write) first.
        late_writes.check_late_writes(
            utcnow() + timedelta(days=1), 0, lambda: store, max_batches=10_000
        )

    def violations(self, s3: Any, bucket: str) -> list[str]:
        """Everything docs/guarantees.md promises about this widget's end state."""
        problems: list[str] = []
        with unit_of_work() as s:
            widget = s.get(Widget, self.widget_id)
            deps = {
                d.deployment_id: d
                for d in s.exec(
                    select(Deployment).where(Deployment.widget_id == self.widget_id)
                ).all()
            }
            jobs = s.exec(select(ArchiveJob).where(ArchiveJob.widget_id == self.widget_id)).all()
            now_content = (
                content_checksum(build_snapshot(s, widget, "now"))
                if widget is not None and not widget.is_archived
                else None
            )
            status = widget.publication_status if widget is not None else None
        for d in deps.values():
            if d.status not in ("success", "failure"):
                problems.append(f"deployment {d.deployment_id} ended {d.status}")
        for j in jobs:
            if j.status not in ("success", "failure"):
                problems.append(f"archive job ended {j.status}")
        archived = widget is None or widget.is_archived or bool(jobs)
        for channel, key in ((PRODUCTION, self.key), (PREVIEW, self.preview_key)):
            file_body, file_meta = _read(s3, bucket, key)
            named = file_meta.get("deployment-id") if file_body is not None else None
            if archived:
                if file_body is not None:
                    problems.append(
                        f"the archived widget's {channel.target} file is live (deployment {named})"
                    )
                continue
            assert widget is not None
            problems += [
                f"{channel.target}: {p}"
                for p in _file_problems(channel, widget, deps, file_body, named)
            ]
            if not channel.is_production:
                continue
            if widget.live_seq is None and status != "draft":
                problems.append(f"never published, yet reads {status}")
            if status == "published" and (
                file_body is None or content_checksum(file_body) != now_content
            ):
                problems.append("reads published, but the live file is not what a deploy would")
        return problems


def _file_problems(
    channel: Channel,
    widget: Widget,
    deps: dict[str, Deployment],
    file_body: dict[str, Any] | None,
    named: str | None,
) -> list[str]:
    """One file of a live widget: the newest recorded snapshot of its own channel, named by its
    record, never a failed deployment's nor another channel's."""
    problems: list[str] = []
    mine = {k: d for k, d in deps.items() if d.target == channel.target}
    if named is not None and named not in mine:
        problems.append(f"the file is {named}'s, not a deployment of this target")
    if named is not None and named in mine and mine[named].status == "failure":
        problems.append(f"failed deployment {named}'s bytes are live")
    problems += [
        f"{d.deployment_id} names {d.live_deployment_id} live, a deployment of another target"
        for d in mine.values()
        if d.live_deployment_id is not None and d.live_deployment_id not in mine
    ]
    live_seq = channel.live_seq(widget)
    if live_seq is None:
        if file_body is not None:
            problems.append(f"nothing recorded live, but {named}'s file is")
        return problems
    if file_body is None:
        return [*problems, f"seq {live_seq} recorded live, but there is no file"]
    recorded_id = getattr(widget, channel.deployment_id)
    if named != recorded_id or file_body.get("deployment_id") != named:
        problems.append(f"the record names {recorded_id} but the file is {named}'s")
    recorded = next((d for d in mine.values() if d.sequence == live_seq), None)
    if recorded is None or recorded.content_checksum != content_checksum(file_body):
        problems.append(f"the file is not the recorded snapshot (seq {live_seq})")
    newest = max(
        (
            d.sequence
            for d in mine.values()
            if d.status == "success" and d.live_deployment_id == d.deployment_id and d.sequence
        ),
        default=None,
    )
    if newest is not None and newest > live_seq:
        problems.append(f"seq {newest} was published but seq {live_seq} is recorded")
    return problems


def _read(s3: Any, bucket: str, key: str) -> tuple[dict[str, Any] | None, dict[str, str]]:
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except s3.exceptions.NoSuchKey:
        return None, {}
    return json.loads(obj["Body"].read()), obj["Metadata"]


def deployment_status(dep_id: str) -> str:
    with unit_of_work() as s:
        return str(
            s.exec(select(Deployment.status).where(Deployment.deployment_id == dep_id)).one()
        )
