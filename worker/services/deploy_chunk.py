"""Deploying a chunk of widgets at once: the path of bulk redeploys.

A bulk redeploy (:mod:`worker.services.bulk`) sends its deployments in chunks of at most
:data:`worker.services.chunking.CHUNK` (one ``widgets.deploy_chunk`` message each) instead of
one message per widget. One delivery of a chunk:

1. **freezes** every deployment of the chunk in one transaction (``deploy.freeze_chunk``), in
   widget-id order, each exactly as a single deploy's freeze does (:func:`deploy.freeze_in`:
   the same row lock, the same sequence taken by the same ``UPDATE ... RETURNING``, the same
   snapshot and attempt count). One BEGIN/COMMIT and one pooled connection for the chunk instead
   of one per widget; sequence order is snapshot order for the same reason as for one widget;
2. **publishes** the frozen deployments concurrently (:mod:`worker.services.chunking`: threads of
   this process, sharing its S3 client and event loop), each through the single deploy's
   :func:`deploy.finish_frozen`: the same decision loop, conditional writes and record;
3. **hands back** every deployment that reached no outcome for a reason a single deploy
   retries (a transient S3 error, a lost database connection, a whole freeze that failed) as a
   single ``widgets.deploy`` message. From there it is an ordinary deploy: retries with backoff,
   the attempts cap, a failure recorded only after checking S3. A permanent error (S3's 403, say)
   fails the deployment at once, through the same :func:`deploy.record_failure` a single deploy's
   task uses. So a chunk needs no retry policy of its own.

Invariants (the same as for single deploys, because each deployment takes the same steps; only
the freeze's transaction is shared):

* **Per-widget order, coalescing and the same-content fence** are decided per deployment by
  :mod:`worker.services.publish`, from its sequence and the widget's live state.
* **Crash-safe at any line.** A freeze that fails commits nothing. A delivery that dies after the
  freeze is redelivered (``acks_late``): its deployments are then redeliveries (attempts > 1, the
  file looked at first), as a single deploy's would be. A hand-back whose send fails leaves the
  deployment ``running``/``ready`` for the reconciler (which reads chunk messages as holding
  their deployments: :func:`worker.producer.jobs_in_broker`).
* Deployments of different widgets only; a chunk never names a widget twice (the bulk job has
  one deployment per widget), so its publishes never contend with each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError

from worker.db import read_session, unit_of_work
from worker.ids import require_safe_id
from worker.s3 import S3Error, S3Store
from worker.services import deploy
from worker.services.chunking import (
    TRANSIENT_ERRORS,
    ChunkReport,
    HandBack,
    Item,
    MapFn,
    concurrently,
)
from worker.services.deploy_outcome import DeployOutcome, outcome
from worker.services.job_state import readable
from worker.services.live_state import find_deployment

log = logging.getLogger(__name__)


def _freeze_chunk(organization_id: str, items: Sequence[Item]) -> dict[str, deploy.Frozen]:
    """Transaction 1 of every deployment of the chunk, together (widget-id order: two chunks
    that share widgets lock them in the same order)."""
    frozen: dict[str, deploy.Frozen] = {}
    with unit_of_work("deploy.freeze_chunk") as session:
        for widget_id, deployment_id in sorted(items):
            frozen[deployment_id] = deploy.freeze_in(
                session, organization_id, widget_id, deployment_id
            )
    return frozen


def run_chunk(
    organization_id: str,
    items: Sequence[Item],
    store: Callable[[], S3Store],
    hand_back: HandBack,
    map_fn: MapFn = concurrently,
) -> ChunkReport[DeployOutcome]:
    """One delivery of a chunk; safe to run any number of times (see the module docstring)."""
    require_safe_id(organization_id, "organization_id")
    for widget_id, deployment_id in items:
        deploy.validate_job_ids(organization_id, widget_id, deployment_id)
    report: ChunkReport[DeployOutcome] = ChunkReport(
        organization_id, items, hand_back, "deployment"
    )
    try:
        frozen = _freeze_chunk(organization_id, items)
    except (SQLAlchemyError, deploy.InvalidJobError) as exc:
        # Nothing of the chunk is committed (a deadlock, a lost connection, one invalid job, a
        # producer-made row inserted twice).
        return report.hand_back_all(exc)

    def finish(item: Item) -> None:
        widget_id, deployment_id = item
        try:
            done = deploy.finish_frozen(frozen[deployment_id], store)
        except TRANSIENT_ERRORS as exc:
            report.hand_back(deployment_id, exc)
            return
        except (S3Error, SQLAlchemyError) as exc:
            # Failed as a single deploy's task fails it (S3 checked first).
            log.warning("deployment %s failed: %s", deployment_id, exc)
            deploy.record_failure(organization_id, widget_id, deployment_id, readable(exc), store)
            done = _outcome_of(organization_id, deployment_id)
        report.add(done)

    map_fn(finish, sorted(items))
    return report


def _outcome_of(organization_id: str, deployment_id: str) -> DeployOutcome:
    with read_session("deploy.read_outcome") as session:
        dep = find_deployment(session, organization_id, deployment_id)
        assert dep is not None
        return outcome(dep)
