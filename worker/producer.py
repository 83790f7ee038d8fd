"""Sending jobs to the workers: the only place task messages are produced.

Called only after the row that describes the job is committed, so a worker never receives a
job it cannot find. If the broker is unreachable the row stays ``ready`` and the reconciler
(``widgets.reconcile``) sends it later; the caller is not failed for it.
"""

from __future__ import annotations

import logging

from kombu.exceptions import ChannelError, OperationalError

from worker import constants as c
from worker.celery import app

log = logging.getLogger(__name__)

# Bounded: an HTTP request must not hang on a broker outage.
SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def _send(task: str, kwargs: dict[str, str]) -> bool:
    try:
        app.send_task(
            task,
            kwargs=kwargs,
            queue=c.TASK_ROUTES[task]["queue"],
            retry=True,
            retry_policy=SEND_RETRY_POLICY,
        )
    except OperationalError as exc:
        log.warning("could not enqueue %s %s (the reconciler will): %s", task, kwargs, exc)
        return False
    return True


def send_deploy(organization_id: str, widget_id: str, deployment_id: str) -> bool:
    return _send(
        c.DEPLOY_TASK,
        {
            "organization_id": organization_id,
            "widget_id": widget_id,
            "deployment_id": deployment_id,
        },
    )


def send_archive(organization_id: str, widget_id: str, archive_job_id: str) -> bool:
    return _send(
        c.ARCHIVE_TASK,
        {
            "organization_id": organization_id,
            "widget_id": widget_id,
            "archive_job_id": archive_job_id,
        },
    )


def send_bulk(organization_id: str, bulk_id: str) -> bool:
    return _send(c.BULK_DEPLOY_TASK, {"organization_id": organization_id, "bulk_id": bulk_id})


def queue_sizes(queues: tuple[str, ...] = (c.DEPLOY_QUEUE, c.ARCHIVE_QUEUE)) -> dict[str, int]:
    """Messages waiting in each queue (not counting ones a worker has reserved)."""
    sizes: dict[str, int] = {}
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                sizes[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:  # Redis drops an empty list: the queue is simply empty
                sizes[queue] = 0
    return sizes
