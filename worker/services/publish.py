"""Publishing a frozen snapshot: the newest sequence wins, enforced by S3 conditional writes.

No database lock or transaction is held during any S3 call. Each round reads the widget's live
state (one short read), decides, and acts:

* the widget is archived or gone → the container file is taken down, the deployment fails;
* this deployment's own bytes are live (an earlier delivery wrote them, then died or lost the
  answer) → they are recorded, whatever else happened since (checked first, so a newer record
  made while they were in flight is repaired rather than coalesced over);
* a newer snapshot of the widget is waiting or running → this one ends ``success`` naming it
  (bursts coalesce: only the newest of them uploads);
* a sequence at least as high is live → ``success`` (overtaken), nothing written;
* the same content is live (checked on S3 itself) and no other snapshot is frozen above the live
  record → the record moves to this sequence without a write (compare-and-set on the record
  read). If another one is (it may still have a write in flight conditioned on the live file's
  ETag), this deployment writes its own bytes instead: the ETag changes, so that write fails
  (**the same-content fence**);
* otherwise a conditional PUT: ``If-None-Match: *`` when no file exists, ``If-Match: <etag>``
  of the file the decision was made on. ``412``/``409`` means someone else wrote first: HEAD the
  file, re-read the record, decide again. A file is therefore never replaced by a lower
  sequence, whoever is slower, on however many hosts.

After a write the record moves forward (compare-and-set). If it cannot (a newer sequence was
recorded meanwhile, or the widget was archived), the write is undone: the recorded snapshot's
bytes are put back over it, conditionally on its ETag, or the file is taken down. A deployment
that ends ``failure`` looks at the file again after recording it, and a write that finds its
deployment already failed undoes itself: whichever looks last undoes, so a failed deployment's
bytes do not stay live. A write sent but never answered may still land later; once it no longer
can, :mod:`worker.services.late_writes` checks the file once more.

All of this holds per file: a preview deployment decides against the widget's preview record
and writes the preview object (``Cache-Control: no-store``); a production one, the container
file (:class:`worker.services.live_state.Channel`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

from sqlmodel import Session

from worker.db import read_session, unit_of_work
from worker.models import Deployment
from worker.s3 import PreconditionFailed, S3Error, S3Store, StoredObject, TransientS3Error
from worker.services import job_state, live_state
from worker.services.deploy_outcome import DeployOutcome, outcome
from worker.services.live_state import Live, WidgetState, find_deployment
from worker.services.snapshot import canonical_json, sha256_hex

log = logging.getLogger(__name__)

# Decision rounds before giving the S3 key a rest (a Celery retry): each lost round means another
# writer made progress, so this bound is only reached under extreme contention.
MAX_ROUNDS = 8

Store = Callable[[], S3Store]
Cas = Callable[[Session, Deployment], bool]

# A preview is looked at by its reviewer right after it is published: no cache may keep it.
PREVIEW_CACHE_CONTROL = "no-store"


def cache_control(dep: Deployment) -> str | None:
    """The file's ``Cache-Control``: ``no-store`` for a preview, the store's (S3_CACHE_CONTROL)
    for production."""
    return PREVIEW_CACHE_CONTROL if dep.target == live_state.PREVIEW.target else None


def object_metadata(dep: Deployment, checksum: str) -> dict[str, str]:
    """``x-amz-meta-*`` of a published file: whose it is, its order, its checksums."""
    assert dep.sequence is not None and dep.content_checksum is not None
    return {
        "deployment-id": dep.deployment_id,
        "sequence": str(dep.sequence),
        "sha256": checksum,
        "content-sha256": dep.content_checksum,
    }


def _as_live(obj: StoredObject | None) -> Live:
    if obj is None:
        return Live()
    meta = obj.metadata
    seq = meta.get("sequence", "0")
    return Live(
        seq=int(seq) if seq.isdigit() else 0,  # a file from before sequences: the lowest
        etag=obj.etag,
        content_checksum=meta.get("content-sha256"),
        deployment_id=meta.get("deployment-id"),
    )


def observe(store: Store, key: str) -> Live:
    return _as_live(store().head(key))


def _read_state(dep: Deployment) -> WidgetState:
    # A read-only session: on SQLite it reads a WAL snapshot instead of taking the write lock.
    with read_session("publish.read_state") as session:
        return live_state.read_state(session, dep)


class _CasLost(Exception):
    """The compare-and-set of :func:`_commit` lost: its transaction is rolled back."""


def _commit(
    dep: Deployment,
    cas: Cas | None,
    *,
    live: str | None,
    published: bool = False,
    checksum: str | None = None,
) -> DeployOutcome | None:
    """Transaction 2: the deployment's ``success`` and the compare-and-set (if any), together,
    in two statements. None if the compare-and-set lost (nothing is written: decide again)."""
    fields = {"live_deployment_id": live, **({"checksum": checksum} if checksum else {})}
    try:
        with unit_of_work("publish.record") as session:
            if not job_state.finish_unless_final(session, dep, "success", **fields):
                row = find_deployment(session, dep.organization_id, dep.deployment_id)
                assert row is not None
                return outcome(row)  # another delivery of this deployment finished it
            if cas is not None and not cas(session, dep):
                raise _CasLost
    except _CasLost:
        return None
    return DeployOutcome(dep.deployment_id, "success", published, live)


def _finish(dep: Deployment, live: str | None) -> DeployOutcome:
    """``success`` without a write of this deployment's (coalesced, overtaken)."""
    done = _commit(dep, None, live=live)
    assert done is not None
    return done


def _fail(dep: Deployment, error: str) -> DeployOutcome:
    done = _fail_if_unfrozen(dep, error, frozen_ok=True)
    assert isinstance(done, DeployOutcome)
    return done


def _fail_if_unfrozen(
    dep: Deployment, error: str, *, frozen_ok: bool = False
) -> DeployOutcome | Deployment:
    """``failure``; or, unless ``frozen_ok``, the row itself if another delivery froze it since
    ``dep`` was read (it may be writing: the caller checks S3 as for a frozen deployment)."""
    with unit_of_work("publish.fail") as session:
        row = find_deployment(session, dep.organization_id, dep.deployment_id, lock=True)
        assert row is not None
        if job_state.is_final(row):
            return outcome(row)
        if not frozen_ok and row.sequence is not None:
            return row
        job_state.finish(row, "failure", error)
        return outcome(row)


def _take_down(dep: Deployment, reason: str, store: Store) -> DeployOutcome:
    """The widget was archived (or removed): nothing of it may stay live, including a file an
    earlier delivery of this deployment may have written after the archive took it down."""
    assert dep.s3_key is not None
    store().delete(dep.s3_key)
    return _fail(dep, reason)


def restore_record(dep: Deployment, stray: Live, store: Store) -> None:
    """``stray`` (a file of ``dep``'s) is live but is not what the database records as live: put
    the recorded snapshot's bytes back over it, or take it down if nothing is recorded (or the
    widget is gone). Conditional on ``stray``'s ETag: if someone wrote since, they decide."""
    assert dep.s3_key is not None and stray.etag is not None
    with read_session("publish.read_record") as session:
        widget = live_state.load_widget(session, dep.organization_id, dep.widget_id)
        target = None
        live_seq = live_state.channel_of(dep.target).live_seq(widget) if widget else None
        if widget is not None and not widget.is_archived and live_seq is not None:
            target = live_state.deployment_at(session, dep.widget_id, live_seq)
    try:
        if target is None or target.config is None:
            store().delete(dep.s3_key, if_match=stray.etag)
            return
        if target.deployment_id == dep.deployment_id:
            return  # the record is this very file
        body = canonical_json(target.config)
        etag = store().put_json(
            dep.s3_key,
            body,
            metadata=object_metadata(target, sha256_hex(body)),
            if_match=stray.etag,
            cache_control=cache_control(target),
        )
    except PreconditionFailed:
        return  # a later writer replaced it; that writer decides from here
    with unit_of_work("publish.record_restored") as session:
        live_state.record_restored(session, target, etag)


def _record_published(dep: Deployment, etag: str, checksum: str, store: Store) -> DeployOutcome:
    """This deployment's bytes are live (ETag ``etag``): record them, or undo them."""
    mine = Live(dep.sequence, etag, dep.content_checksum, dep.deployment_id)

    def put_recorded(session: Session, row: Deployment) -> bool:
        return live_state.record_put(session, row, etag)

    done = _commit(dep, put_recorded, live=dep.deployment_id, published=True, checksum=checksum)
    if done is not None:
        if done.status == "failure":
            restore_record(dep, mine, store)  # failed meanwhile: its bytes must not stay live
        return done
    # Refused: the widget was archived, or a sequence at least as high was recorded meanwhile.
    state = _read_state(dep)
    if state.gone is not None:
        return _take_down(dep, state.gone, store)
    if (state.live.seq or 0) < (dep.sequence or 0):
        raise TransientS3Error("live record moved backwards; retrying")  # cannot happen
    restore_record(dep, mine, store)
    return _finish(dep, state.live.deployment_id)


def _record_same_content(session: Session, row: Deployment, *, seen: Live, file: Live) -> bool:
    return live_state.record_same_content(session, row, seen, file)


def _fence_needed(dep: Deployment, state: WidgetState) -> bool:
    """Must a same-content deploy write its own bytes (changing the ETag) rather than record the
    live file? Yes while a write conditioned on the live file's ETag may still land: another
    snapshot frozen above the live sequence, or an earlier attempt of this very deployment (its
    request may be held up in the network; recording the file without writing would leave the
    record naming another deployment's file when it lands)."""
    if dep.attempts > 1:
        return True
    with read_session("publish.check_fence") as session:
        return live_state.others_frozen_above(session, dep, state.live.seq)


def publish(dep: Deployment, state: WidgetState, store: Store) -> DeployOutcome:
    """Publish frozen deployment ``dep`` (``running``), given the state read when it was frozen."""
    assert dep.sequence is not None and dep.config is not None and dep.s3_key is not None
    body = canonical_json(dep.config)
    checksum = sha256_hex(body)
    observed: Live | None = None  # the file itself, when S3 was asked during this decision
    if dep.attempts > 1:
        # An earlier delivery may have written before it died, or its request may have landed
        # after it gave up: look at the file before deciding anything else.
        observed = observe(store, dep.s3_key)
    for _ in range(MAX_ROUNDS):
        if state.gone is not None:
            return _take_down(dep, state.gone, store)
        if observed is not None and observed.deployment_id == dep.deployment_id:
            assert observed.etag is not None
            return _record_published(dep, observed.etag, checksum, store)
        if state.newer_deployment_id is not None:
            return _finish(dep, state.newer_deployment_id)  # coalesced into it
        if state.live.seq is not None and state.live.seq >= dep.sequence:
            return _finish(dep, state.live.deployment_id)  # overtaken
        live = observed or state.live
        if live.seq is not None and live.seq >= dep.sequence:
            # S3 is ahead of the record (its writer has not recorded it yet, or died first).
            return _finish(dep, live.deployment_id)
        write = True
        if live.exists and live.content_checksum == dep.content_checksum:
            if observed is None:
                # The record says the same content is live: confirm on S3 (a writer that died
                # between its upload and its record may have left other bytes there).
                observed = observe(store, dep.s3_key)
                continue
            write = _fence_needed(dep, state)
            if not write:
                same_content = functools.partial(
                    _record_same_content, seen=state.live, file=observed
                )
                done = _commit(dep, same_content, live=observed.deployment_id)
                if done is not None:
                    return done
                observed = None
        if write:
            try:
                etag = store().put_json(
                    dep.s3_key,
                    body,
                    metadata=object_metadata(dep, checksum),
                    if_match=live.etag,
                    if_none_match=not live.exists,
                    cache_control=cache_control(dep),
                )
            except PreconditionFailed:
                observed = observe(store, dep.s3_key)  # someone wrote first: look, decide again
                state = _read_state(dep)
                continue
            return _record_published(dep, etag, checksum, store)
        state = _read_state(dep)
    raise TransientS3Error(f"publish of {dep.s3_key} did not settle in {MAX_ROUNDS} rounds")


def fail_checked(dep: Deployment, error: str, store: Store) -> DeployOutcome:
    """``failure`` for a deployment that may have written: unless it is gone (the file is taken
    down), its bytes are live (recorded: ``success``) or a newer sequence is (``success``,
    overtaken). A delivery still in flight may write after the look: the file is looked at again
    once the failure is recorded (see the module docstring)."""
    if dep.sequence is None or dep.s3_key is None:
        # Read before any delivery froze it; the failure is recorded only if that still holds.
        done = _fail_if_unfrozen(dep, error)
        if isinstance(done, DeployOutcome):
            return done
        dep = done
        assert dep.sequence is not None and dep.s3_key is not None
    state = _read_state(dep)
    if state.gone is not None:
        return _take_down(dep, state.gone, store)
    try:
        file = observe(store, dep.s3_key)
    except S3Error as exc:
        # Unchecked: late_writes checks it once no write of it can land any more.
        log.warning("deployment %s: the live file could not be checked: %s", dep.deployment_id, exc)
        return _fail(dep, f"{error} (the live file could not be checked)")
    if file.deployment_id == dep.deployment_id and file.etag is not None:
        checksum = sha256_hex(canonical_json(dep.config))
        return _record_published(dep, file.etag, checksum, store)
    if file.seq is not None and file.seq >= dep.sequence:
        return _finish(dep, file.deployment_id)
    done = _fail(dep, error)
    take_back(dep, store)
    return done


def take_back(dep: Deployment, store: Store) -> None:
    """``dep`` ended ``failure``, yet a delivery of it may have written since it was last looked
    at (a write whose answer was lost, a delivery that died after its upload): its bytes must not
    stay live. Best effort; what cannot be checked now, late_writes checks after the horizon."""
    assert dep.s3_key is not None
    with contextlib.suppress(S3Error):
        file = observe(store, dep.s3_key)
        if file.deployment_id == dep.deployment_id:
            restore_record(dep, file, store)
