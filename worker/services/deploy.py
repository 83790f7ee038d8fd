"""Deploying a widget: freeze its snapshot, publish it in sequence order, record the outcome.

Two short transactions per deploy, and no database lock or transaction across any S3 call:

1. *freeze* (:func:`_freeze`): find (or, for a producer that bypassed the API, create) the row,
   return early if it is final (for a frozen one that failed, after taking back any bytes of its
   an earlier attempt left live), give up past :data:`MAX_ATTEMPTS`, count this delivery; on the
   first delivery freeze the snapshot and take the widget's next **publish sequence**; mark it
   ``running``; read the widget's live state. A retry or redelivery publishes the same bytes
   with the same sequence.
2. *publish* (:mod:`worker.services.publish`): decide from the sequence and the live state,
   then either write the file with an S3 conditional write (``If-None-Match: *`` / ``If-Match``),
   or finish without writing (overtaken by a newer snapshot, or the same content is live).
   The outcome is recorded in the second transaction, a forward-only compare-and-set.

Every path either ends in ``success``/``failure`` or raises (the task layer retries, or records
the failure through :func:`record_failure`, which checks S3 first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from worker.db import unit_of_work
from worker.ids import require_safe_id
from worker.models import SCHEDULED, Deployment, Widget, utcnow
from worker.s3 import S3Store
from worker.services import job_state, live_state
from worker.services.catalog_impact import add_snapshot_refs, lock_for_freeze
from worker.services.deploy_outcome import DeployOutcome, outcome
from worker.services.live_state import find_deployment
from worker.services.publish import fail_checked, publish, take_back
from worker.services.snapshot import build_snapshot, content_checksum
from worker.storage_keys import target_key

# Attempts (first run + Celery retries + redeliveries after a lost worker) before giving up:
# a poison message ends ``failure`` instead of looping forever.
MAX_ATTEMPTS = 12

ARCHIVED_ERROR = live_state.ARCHIVED_ERROR


class InvalidJobError(ValueError):
    """The message itself is wrong (unsafe IDs, unknown organization, IDs that do not match)."""


def validate_job_ids(organization_id: object, widget_id: object, deployment_id: object) -> None:
    require_safe_id(organization_id, "organization_id")
    require_safe_id(widget_id, "widget_id")
    require_safe_id(deployment_id, "deployment_id")


def rollback_source_problem(source: Deployment | None, dep: Deployment) -> str | None:
    """Why ``source`` cannot be republished as ``dep`` (None: it can)."""
    if source is None or source.organization_id != dep.organization_id:
        return f"source deployment {dep.source_deployment_id} not found"
    if source.widget_id != dep.widget_id:
        return f"source deployment {source.deployment_id} is of another widget"
    if source.status != "success" or source.config is None:
        return f"source deployment {source.deployment_id} never succeeded"
    return None


@dataclass(frozen=True)
class _Frozen:
    dep: Deployment
    state: live_state.WidgetState | None = None  # None: out of attempts
    give_up: str | None = None
    take_back: bool = False  # already failed: only make sure none of its bytes are live


Frozen = DeployOutcome | _Frozen


def _freeze(organization_id: str, widget_id: str, deployment_id: str) -> Frozen:
    """Transaction 1 (:func:`freeze_in`, on its own)."""
    with unit_of_work("deploy.freeze") as session:
        return freeze_in(session, organization_id, widget_id, deployment_id)


def freeze_in(session: Session, organization_id: str, widget_id: str, deployment_id: str) -> Frozen:
    """Freeze one deployment in ``session`` (the caller commits). An outcome when the
    deployment is (now) final without publishing.

    A first delivery sends: the deployment (locked), the widget with its sequence taken
    (:func:`live_state.take_sequence`), the catalog items of the snapshot, its refs, the
    deployment's one UPDATE (a single flush: no autoflush in between) and the "newer waiting"
    check. Every other case (redelivery, give-up, unknown IDs) reads what it needs.
    """
    with session.no_autoflush:
        # Locked (on PostgreSQL; SQLite's write lock is taken at BEGIN): two deliveries of one
        # deployment must not both freeze it.
        # The key is this organization's: another tenant's deployment of the same id is not seen.
        dep = find_deployment(session, organization_id, deployment_id, lock=True)
        if dep is None:  # sent by a producer that did not go through the API
            if lock_for_freeze(session, organization_id) is None:
                raise InvalidJobError(f"unknown organization {organization_id}")
            dep = Deployment(
                deployment_id=deployment_id,
                organization_id=organization_id,
                widget_id=widget_id,
                enqueued_at=utcnow(),
            )
            session.add(dep)
        elif dep.widget_id != widget_id:
            raise InvalidJobError(f"deployment {deployment_id} belongs to another widget")
        if dep.status == SCHEDULED:
            # Not due yet (a producer's or a duplicate message): beat sends it when it is.
            return outcome(dep)
        if job_state.is_final(dep):
            if dep.status == "failure" and dep.sequence is not None:
                # Failed by another delivery (a give-up) while this one's earlier attempt may
                # have written: that attempt's bytes are looked for and taken back.
                return _Frozen(dep, take_back=True)
            return outcome(dep)
        gave_up = job_state.give_up_reason(dep, MAX_ATTEMPTS)
        if gave_up is not None:
            if dep.sequence is None:  # never frozen, so never written
                job_state.finish(dep, "failure", gave_up)
                return outcome(dep)
            return _Frozen(dep, give_up=gave_up)  # its bytes may be live: check S3 first
        job_state.count_attempt(dep)
        channel = live_state.channel_of(dep.target)
        if dep.config is None:
            # First delivery: the sequence first (it locks the widget row, and on PostgreSQL
            # share-locks the organization: see catalog_impact), then the snapshot.
            loaded = live_state.take_sequence(session, organization_id, widget_id, channel)
            if loaded is None and lock_for_freeze(session, organization_id) is None:
                raise InvalidJobError(f"unknown organization {organization_id}")
        else:
            loaded = live_state.load_with_live(session, organization_id, widget_id, channel)
        widget = loaded.widget if loaded else None
        gone = live_state.gone_reason(session, organization_id, widget_id, widget)
        if dep.config is None:
            problem = _freeze_into(session, dep, loaded, gone)
            if problem is not None:
                job_state.finish(dep, "failure", problem)
                return outcome(dep)
        job_state.mark_running(dep)
        session.flush()
        assert dep.sequence is not None
        state = live_state.read_state(session, dep, loaded=(loaded, gone))
        return _Frozen(dep, state)


def _freeze_into(
    session: Session, dep: Deployment, loaded: live_state.Loaded | None, gone: str | None
) -> str | None:
    """Freeze ``dep``'s snapshot with the sequence ``loaded`` took; why it cannot be, or None."""
    if gone is not None or loaded is None:
        return gone or live_state.NOT_FOUND_ERROR
    widget = loaded.widget
    problem = _freeze_snapshot(session, dep, widget)
    if problem is not None:
        return problem
    assert dep.config is not None
    dep.s3_key = target_key(dep.target, loaded.api_key, widget.id)
    dep.sequence = widget.publish_seq
    if dep.target == live_state.PRODUCTION.target:  # a catalog edit makes only production stale
        add_snapshot_refs(session, dep.organization_id, dep.widget_id, dep.sequence, dep.config)
    return None


def freeze_scheduled(session: Session, dep: Deployment) -> str | None:
    """Freeze a scheduled deployment when it is requested, in the caller's transaction (which
    added ``dep``): what was reviewed is what goes live at ``publish_at``. It takes its
    sequence now, so a deploy requested later is newer and wins (the ordinary rule). Why it
    cannot be frozen, or None."""
    channel = live_state.channel_of(dep.target)
    loaded = live_state.take_sequence(session, dep.organization_id, dep.widget_id, channel)
    widget = loaded.widget if loaded else None
    gone = live_state.gone_reason(session, dep.organization_id, dep.widget_id, widget)
    return _freeze_into(session, dep, loaded, gone)


def _freeze_snapshot(session: Session, dep: Deployment, widget: Widget) -> str | None:
    """``dep``'s snapshot, frozen: the widget's now, or for a rollback its source's (with this
    deployment's own id). Why it cannot be, or None."""
    if dep.source_deployment_id is None:
        dep.config = build_snapshot(session, widget, dep.deployment_id)
        dep.widget_version = widget.version
    else:
        source = find_deployment(session, dep.organization_id, dep.source_deployment_id)
        problem = rollback_source_problem(source, dep)
        if problem is not None or source is None or source.config is None:
            return problem
        dep.config = {**source.config, "deployment_id": dep.deployment_id}
        dep.widget_version = source.widget_version
    dep.content_checksum = content_checksum(dep.config)
    return None


def run_deployment(
    organization_id: str, widget_id: str, deployment_id: str, store: Callable[[], S3Store]
) -> DeployOutcome:
    """Run one delivery of a deploy job; safe to call any number of times for one deployment."""
    validate_job_ids(organization_id, widget_id, deployment_id)
    try:
        step = _freeze(organization_id, widget_id, deployment_id)
    except IntegrityError:
        # Two deliveries of a producer-created job raced to insert the row: the other one won.
        step = _freeze(organization_id, widget_id, deployment_id)
    return finish_frozen(step, store)


def finish_frozen(step: Frozen, store: Callable[[], S3Store]) -> DeployOutcome:
    """Everything after the freeze: publish, or take back, or fail after checking S3."""
    if isinstance(step, DeployOutcome):
        return step
    if step.take_back:
        take_back(step.dep, store)
        return outcome(step.dep)
    if step.state is None:
        return fail_checked(step.dep, step.give_up or "gave up", store)
    return publish(step.dep, step.state, store)


def note_retry(organization_id: str, deployment_id: str, error: str) -> None:
    with unit_of_work("deploy.note_retry") as session:
        # Locked: the retry may already be running (or done) in another process.
        dep = find_deployment(session, organization_id, deployment_id, lock=True)
        job_state.note_retry(dep, error)


def record_failure(
    organization_id: str,
    widget_id: str,
    deployment_id: str,
    error: str,
    store: Callable[[], S3Store],
) -> None:
    """Out of retries or failed permanently: ``failure``, unless S3 shows its bytes are live
    (then ``success``). The widget's publication status is left as it was."""
    with unit_of_work("deploy.read_for_failure") as session:
        dep = find_deployment(session, organization_id, deployment_id)
    if dep is None or job_state.is_final(dep):
        return
    if dep.widget_id != widget_id:
        return  # a message naming another widget's job must not fail it
    fail_checked(dep, error, store)
