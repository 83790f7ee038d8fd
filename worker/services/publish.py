"""Publishing a frozen snapshot: the newest sequence wins, enforced by S3 conditional writes.

No database lock or transaction is held during any S3 call. Each round reads the widget's live
state (one short read), decides, and acts:

* the widget is archived or gone → the container file is taken down, the deployment fails;
* a newer snapshot of the widget is waiting or running → this one ends ``success`` naming it
  (bursts coalesce: only the newest of them uploads);
* a sequence at least as high is live → ``success`` (overtaken), nothing written;
* the same content is live (checked on S3 itself) → the record moves to this sequence without a
  write (compare-and-set on the record read);
* otherwise a conditional PUT: ``If-None-Match: *`` when no file exists, ``If-Match: <etag>``
  of the file the decision was made on. ``412``/``409`` means someone else wrote first: HEAD the
  file, re-read the record, decide again. A file is therefore never replaced by a lower
  sequence, whoever is slower, on however many hosts.

After a write the record moves forward (compare-and-set). If it cannot (a newer sequence was
recorded as same-content while this write was in flight), the newer snapshot's bytes are put back
over this write, conditionally on its ETag.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from sqlmodel import Session

from worker.db import read_only_engine, unit_of_work
from worker.models import Deployment
from worker.s3 import PreconditionFailed, S3Error, S3Store, StoredObject, TransientS3Error
from worker.services import job_state, live_state
from worker.services.deploy_outcome import DeployOutcome, outcome
from worker.services.live_state import Live, WidgetState, find_deployment
from worker.services.snapshot import canonical_json, sha256_hex

# Decision rounds before giving the S3 key a rest (a Celery retry): each lost round means another
# writer made progress, so this bound is only reached under extreme contention.
MAX_ROUNDS = 8

Store = Callable[[], S3Store]
Cas = Callable[[Session, Deployment], bool]


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


def _observe(store: Store, key: str) -> Live:
    return _as_live(store().head(key))


def _read_state(dep: Deployment) -> WidgetState:
    # A read-only session: on SQLite it reads a WAL snapshot instead of taking the write lock.
    with Session(read_only_engine()) as session:
        return live_state.read_state(session, dep)


def _commit(
    dep: Deployment,
    cas: Cas | None,
    *,
    live: str | None,
    published: bool = False,
    checksum: str | None = None,
) -> DeployOutcome | None:
    """Transaction 2: the compare-and-set (if any) and the deployment's ``success``, together.
    None if the compare-and-set lost (decide again)."""
    with unit_of_work() as session:
        row = find_deployment(session, dep.organization_id, dep.deployment_id, lock=True)
        assert row is not None
        if job_state.is_final(row):
            return outcome(row)  # another delivery of this deployment finished it
        if cas is not None and not cas(session, row):
            return None
        if checksum is not None:
            row.checksum = checksum
        live_state.finish_success(row, live)
        return outcome(row, published)


def _fail(dep: Deployment, error: str) -> DeployOutcome:
    with unit_of_work() as session:
        row = find_deployment(session, dep.organization_id, dep.deployment_id, lock=True)
        assert row is not None
        if not job_state.is_final(row):
            job_state.finish(row, "failure", error)
        return outcome(row)


def _take_down(dep: Deployment, reason: str, store: Store) -> DeployOutcome:
    """The widget was archived (or removed): nothing of it may stay live, including a file an
    earlier delivery of this deployment may have written after the archive took it down."""
    assert dep.s3_key is not None
    store().delete(dep.s3_key)
    return _fail(dep, reason)


def _repair(dep: Deployment, state: WidgetState, written: Live, store: Store) -> None:
    """``written`` (this deployment's file) landed after a newer sequence was recorded as live
    by a same-content deployment: put the recorded snapshot's bytes back over it."""
    target_seq = state.live.seq
    assert target_seq is not None and dep.s3_key is not None
    with unit_of_work() as session:
        target = live_state.deployment_at(session, dep.widget_id, target_seq)
    if target is None or target.config is None or target.content_checksum == dep.content_checksum:
        return
    body = canonical_json(target.config)
    try:
        etag = store().put_json(
            dep.s3_key,
            body,
            metadata=object_metadata(target, sha256_hex(body)),
            if_match=written.etag,
        )
    except PreconditionFailed:
        return  # a later writer replaced it; that writer decides from here
    with unit_of_work() as session:
        live_state.record_etag(session, dep.widget_id, target_seq, etag)


def _overtaken(dep: Deployment, state: WidgetState, store: Store) -> DeployOutcome:
    """A sequence at least as high as this one is recorded live."""
    assert dep.s3_key is not None
    if dep.attempts > 1:
        # An earlier delivery of this deployment may have written just before it died, over a
        # newer same-content record: check the file, put the newer bytes back if so.
        file = _observe(store, dep.s3_key)
        if file.deployment_id == dep.deployment_id and (file.seq or 0) < (state.live.seq or 0):
            _repair(dep, state, file, store)
    done = _commit(dep, None, live=state.live.deployment_id)
    assert done is not None
    return done


def _record_published(dep: Deployment, etag: str, checksum: str, store: Store) -> DeployOutcome:
    def put_recorded(session: Session, row: Deployment) -> bool:
        return live_state.record_put(session, row, etag)

    done = _commit(dep, put_recorded, live=dep.deployment_id, published=True, checksum=checksum)
    if done is not None:
        return done
    state = _read_state(dep)
    if state.gone is not None:
        return _take_down(dep, state.gone, store)
    if (state.live.seq or 0) < (dep.sequence or 0):
        raise TransientS3Error("live record moved backwards; retrying")  # cannot happen
    _repair(dep, state, Live(dep.sequence, etag, dep.content_checksum, dep.deployment_id), store)
    done = _commit(dep, None, live=state.live.deployment_id, published=True, checksum=checksum)
    assert done is not None
    return done


def _record_same_content(session: Session, row: Deployment, *, seen: Live, file: Live) -> bool:
    return live_state.record_same_content(session, row, seen, file)


def publish(dep: Deployment, state: WidgetState, store: Store) -> DeployOutcome:
    """Publish frozen deployment ``dep`` (``running``), given the state read when it was frozen."""
    assert dep.sequence is not None and dep.config is not None and dep.s3_key is not None
    body = canonical_json(dep.config)
    checksum = sha256_hex(body)
    observed: Live | None = None  # the file itself, when S3 was asked during this decision
    for _ in range(MAX_ROUNDS):
        if state.gone is not None:
            return _take_down(dep, state.gone, store)
        if state.newer_deployment_id is not None:
            done = _commit(dep, None, live=state.newer_deployment_id)  # coalesced into it
            assert done is not None
            return done
        if state.live.seq is not None and state.live.seq >= dep.sequence:
            return _overtaken(dep, state, store)
        live = observed or state.live
        if live.seq is not None and live.seq >= dep.sequence:
            # S3 is ahead of the record (its writer has not recorded it yet, or died first).
            if live.deployment_id == dep.deployment_id:
                return _record_published(dep, live.etag or "", checksum, store)
            done = _commit(dep, None, live=live.deployment_id)
            assert done is not None
            return done
        if live.exists and live.content_checksum == dep.content_checksum:
            if observed is None:
                # The record says the same content is live: confirm on S3 (a writer that died
                # between its upload and its record may have left other bytes there).
                observed = _observe(store, dep.s3_key)
                continue
            same_content = functools.partial(_record_same_content, seen=state.live, file=observed)
            done = _commit(dep, same_content, live=observed.deployment_id)
            if done is not None:
                return done
            observed = None
        else:
            try:
                etag = store().put_json(
                    dep.s3_key,
                    body,
                    metadata=object_metadata(dep, checksum),
                    if_match=live.etag,
                    if_none_match=not live.exists,
                )
            except PreconditionFailed:
                observed = _observe(store, dep.s3_key)  # someone wrote first: look, decide again
                state = _read_state(dep)
                continue
            return _record_published(dep, etag, checksum, store)
        state = _read_state(dep)
    raise TransientS3Error(f"publish of {dep.s3_key} did not settle in {MAX_ROUNDS} rounds")


def fail_checked(dep: Deployment, error: str, store: Store) -> DeployOutcome:
    """``failure`` for a deployment that may have written: unless S3 shows its bytes are live
    (``success``) or a newer sequence is (``success``, overtaken)."""
    if dep.sequence is None or dep.s3_key is None:
        return _fail(dep, error)
    try:
        file = _observe(store, dep.s3_key)
    except S3Error as exc:
        return _fail(dep, f"{error} (the live file could not be checked: {exc})")
    if file.deployment_id == dep.deployment_id and file.etag is not None:
        etag = file.etag

        def put_recorded(session: Session, row: Deployment) -> bool:
            live_state.record_put(session, row, etag)
            return True  # live either way: a newer record only means it was overtaken since

        done = _commit(dep, put_recorded, live=dep.deployment_id, published=True)
        assert done is not None
        return done
    if file.seq is not None and file.seq >= dep.sequence:
        done = _commit(dep, None, live=file.deployment_id)
        assert done is not None
        return done
    return _fail(dep, error)
