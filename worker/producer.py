"""Sending jobs to the workers: the only place task messages are produced.

Called only after the row that describes the job is committed, so a worker never receives a
job it cannot find. If the broker is unreachable the row stays ``ready`` and the reconciler
(``widgets.reconcile``) sends it later; the caller is not failed for it.

**A send is bounded in time**, because the API sends from its request threads: a broker that
accepts connections and never answers (a hung Redis, a half-open connection after a failover)
must not hang an HTTP request. Sends go through a producer pool of this module's own, whose
connections have short socket timeouts (:data:`SEND_SOCKET_TIMEOUT`); a send makes at most
``1 + max_retries`` attempts. Worst case, against a broker that never answers::

    SEND_ACQUIRE_TIMEOUT + (1 + max_retries) * (SEND_SOCKET_TIMEOUT + interval) = 4 s (< 5 s)

After a failed send the broker is presumed down for :data:`BROKER_DOWN_COOLDOWN` seconds: the
sends of that window return ``False`` at once instead of each waiting for the timeouts (the
reconciler sends those jobs once the broker answers again).

:func:`jobs_in_broker` reads which jobs have a message in the broker (waiting in a queue, or
delivered to a worker and not yet acknowledged): deploys, archives and bulk fan-outs; the
reconciler re-sends the unfinished jobs that have none.

Every ``send_*`` returns whether the message was handed to the broker; the reconciler counts a
re-send only when it was.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.connection import Connection
from kombu.exceptions import ChannelError, LimitExceeded, OperationalError
from kombu.pools import ProducerPool

from worker import constants as c
from worker.celery import app
from worker.settings import get_settings

log = logging.getLogger(__name__)

# Each broker round trip of a send (connect, then each command) waits at most this long.
SEND_SOCKET_TIMEOUT = 1.5
# One retry: a pooled connection the broker closed (restart, failover) is simply reconnected.
SEND_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.25,
    "interval_max": 0.25,
}
# Producers (one broker connection each) shared by a process's threads; a thread waits at most
# SEND_ACQUIRE_TIMEOUT for one.
SEND_POOL_LIMIT = 32
SEND_ACQUIRE_TIMEOUT = 1.0
SEND_BOUND_SECONDS = SEND_ACQUIRE_TIMEOUT + (1 + SEND_RETRY_POLICY["max_retries"]) * (
    SEND_SOCKET_TIMEOUT + SEND_RETRY_POLICY["interval_max"]
)
BROKER_DOWN_COOLDOWN = 5.0


class _Sender:
    """This process's producer pool for one broker URL (rebuilt after fork or a URL change)."""

    def __init__(self, url: str) -> None:
        self.url, self.pid = url, os.getpid()
        self.connection: Connection = app.connection_for_write(
            url,
            connect_timeout=SEND_SOCKET_TIMEOUT,
            transport_options={
                "socket_timeout": SEND_SOCKET_TIMEOUT,
                "socket_connect_timeout": SEND_SOCKET_TIMEOUT,
            },
        )
        self.pool = ProducerPool(  # type: ignore[no-untyped-call]
            self.connection.Pool(limit=SEND_POOL_LIMIT),
            limit=SEND_POOL_LIMIT,
            Producer=app.amqp.Producer,
        )

    def close(self) -> None:
        try:
            self.pool.force_close_all()  # type: ignore[no-untyped-call]
            self.pool.connections.force_close_all()
        except Exception:
            log.debug("closing the producer pool failed", exc_info=True)


_lock = threading.Lock()
_sender: _Sender | None = None
_down_until = 0.0  # time.monotonic() before which the broker is presumed down


def _current_sender() -> _Sender:
    global _sender
    url = str(get_settings().celery_broker_url)
    with _lock:
        if _sender is None or _sender.pid != os.getpid() or _sender.url != url:
            if _sender is not None and _sender.pid == os.getpid():
                _sender.close()
            _sender = _Sender(url)
        return _sender


def reset() -> None:
    """Forget the pool and the presumed outage (tests that switch brokers)."""
    global _sender, _down_until
    with _lock:
        if _sender is not None and _sender.pid == os.getpid():
            _sender.close()
        _sender, _down_until = None, 0.0


def broker_presumed_down() -> bool:
    return time.monotonic() < _down_until


def _note_outcome(ok: bool) -> None:
    global _down_until
    with _lock:
        _down_until = 0.0 if ok else time.monotonic() + BROKER_DOWN_COOLDOWN


def _send(task: str, kwargs: dict[str, Any]) -> bool:
    if broker_presumed_down():
        log.warning("broker presumed down; not enqueuing %s %s (the reconciler will)", task, kwargs)
        return False
    sender = _current_sender()
    try:
        acquire = sender.pool.acquire
        with acquire(block=True, timeout=SEND_ACQUIRE_TIMEOUT) as producer:  # type: ignore[no-untyped-call]
            app.send_task(
                task,
                kwargs=kwargs,
                queue=c.TASK_ROUTES[task]["queue"],
                producer=producer,
                retry=True,
                retry_policy=SEND_RETRY_POLICY,
            )
    except (OperationalError, LimitExceeded, *sender.connection.connection_errors) as exc:
        log.warning("could not enqueue %s %s (the reconciler will): %s", task, kwargs, exc)
        _note_outcome(False)
        return False
    _note_outcome(True)
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


def send_deploy_chunk(organization_id: str, items: list[tuple[str, str]]) -> bool:
    """One message for several deployments (``[widget_id, deployment_id]`` each)."""
    return _send(
        c.DEPLOY_CHUNK_TASK,
        {"organization_id": organization_id, "items": [[w, d] for w, d in items]},
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


def send_archive_chunk(organization_id: str, items: list[tuple[str, str]]) -> bool:
    """One message for several archive jobs (``[widget_id, archive_job_id]`` each)."""
    return _send(
        c.ARCHIVE_CHUNK_TASK,
        {"organization_id": organization_id, "items": [[w, j] for w, j in items]},
    )


def send_webhook_deliveries(endpoint_id: str, webhook_ids: list[str]) -> bool:
    """One attempt of each of these deliveries of one endpoint."""
    return _send(c.DELIVER_WEBHOOKS_TASK, {"endpoint_id": endpoint_id, "webhook_ids": webhook_ids})


def send_bulk(organization_id: str, bulk_id: str) -> bool:
    return _send(c.BULK_DEPLOY_TASK, {"organization_id": organization_id, "bulk_id": bulk_id})


def queue_sizes(queues: tuple[str, ...] = (c.DEPLOY_QUEUE, c.ARCHIVE_QUEUE)) -> dict[str, int]:
    """Messages waiting in each queue (not counting ones a worker has reserved)."""
    sizes: dict[str, int] = {}
    with app.connection_for_write(str(get_settings().celery_broker_url)) as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                sizes[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except ChannelError:  # Redis drops an empty list: the queue is simply empty
                sizes[queue] = 0
    return sizes


# -- which jobs have a message in the broker ---------------------------------------------------

# kombu's Redis transport: a queue is a list per priority step (the base name for priority 0,
# ``name + SEP + step`` for the others); a delivered message stays in the ``unacked`` hash until
# it is acknowledged (``task_acks_late``: after the task ran, or, for a retry countdown, after
# the countdown and the run).
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
_UNACKED_KEY = "unacked"
SCAN_CHUNK = 1000
# A scan reads at most this many messages (about 10,000 a second: 1.3 kB each, decoded here);
# past it the view is incomplete and the reconciler re-sends no ready job on its account (a
# backlog that long is a capacity problem first).
MAX_SCAN = 100_000


@dataclass
class BrokerJobs:
    """Jobs that have at least one message in the broker (in a queue or unacknowledged)."""

    # (organization_id, deployment_id): a deployment_id is unique per organization only.
    deployments: set[tuple[str, str]] = field(default_factory=set)
    archives: set[str] = field(default_factory=set)  # archive_job_id
    archive_widgets: set[str] = field(default_factory=set)  # widget_id of archive messages
    bulks: set[str] = field(default_factory=set)  # bulk_id of widgets.bulk_deploy messages
    scanned: int = 0
    complete: bool = True

    def has_deployment(self, organization_id: str, deployment_id: str) -> bool:
        return (organization_id, deployment_id) in self.deployments

    def has_archive(self, job_id: str, widget_id: str) -> bool:
        # A producer may send an archive without its job id: the worker then finds the job by
        # its widget, so a message for the widget counts.
        return job_id in self.archives or widget_id in self.archive_widgets

    def has_bulk(self, bulk_id: str) -> bool:
        return bulk_id in self.bulks


def _task_kwargs(envelope: Any) -> tuple[str, dict[str, Any]] | None:
    """(task name, kwargs) of a kombu message envelope; None if it is not a JSON task."""
    try:
        if "json" not in str(envelope.get("content-type", "")):
            return None
        headers = envelope.get("headers") or {}
        body: Any = envelope.get("body")
        if (envelope.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return None
    if isinstance(payload, list) and len(payload) >= 2 and isinstance(payload[1], dict):
        return str(headers.get("task", "")), payload[1]  # protocol 2: [args, kwargs, embed]
    if isinstance(payload, dict) and isinstance(payload.get("kwargs"), dict):
        return str(payload.get("task", "")), payload["kwargs"]  # protocol 1
    return None


def _chunk_items(items: Any) -> list[tuple[str, str]]:
    """The ``[widget_id, job_id]`` pairs of a chunk message's ``items`` (malformed ones left)."""
    if not isinstance(items, list):
        return []
    return [
        (item[0], item[1])
        for item in items
        if isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], str)
    ]


def _note(jobs: BrokerJobs, envelope: Any) -> None:
    parsed = _task_kwargs(envelope)
    if parsed is None:
        return
    task, kwargs = parsed
    if task == c.DEPLOY_TASK:
        org_id, dep_id = kwargs.get("organization_id"), kwargs.get("deployment_id")
        if isinstance(org_id, str) and isinstance(dep_id, str):
            jobs.deployments.add((org_id, dep_id))
    elif task in (c.DEPLOY_CHUNK_TASK, c.ARCHIVE_CHUNK_TASK):
        org_id = kwargs.get("organization_id")
        for item in _chunk_items(kwargs.get("items")):
            if task == c.ARCHIVE_CHUNK_TASK:
                jobs.archives.add(item[1])
                jobs.archive_widgets.add(item[0])
            elif isinstance(org_id, str):
                jobs.deployments.add((org_id, item[1]))
    elif task == c.ARCHIVE_TASK:
        if isinstance(kwargs.get("archive_job_id"), str):
            jobs.archives.add(kwargs["archive_job_id"])
        if isinstance(kwargs.get("widget_id"), str):
            jobs.archive_widgets.add(kwargs["widget_id"])
    elif task == c.BULK_DEPLOY_TASK and isinstance(kwargs.get("bulk_id"), str):
        jobs.bulks.add(kwargs["bulk_id"])


def _loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _queue_keys(queues: Iterable[str]) -> list[str]:
    return [
        q if step == 0 else f"{q}{_PRIORITY_SEP}{step}" for q in queues for step in _PRIORITY_STEPS
    ]


def jobs_in_broker(queues: Iterable[str] = c.QUEUES) -> BrokerJobs:
    """Scan the broker for deploy (single and chunk), archive and bulk messages: the queues'
    lists first, then the messages delivered and not yet acknowledged. Lists are read from their
    head (where new messages are pushed) in chunks; workers pop from the tail, so a message is
    never skipped by a concurrent pop, and one that moves from a list to the unacknowledged set
    during the scan is seen in one or the other. Raises ``redis.RedisError`` if the broker
    cannot be read."""
    jobs = BrokerJobs()
    client = redis.Redis.from_url(
        str(get_settings().celery_broker_url),
        socket_timeout=5,
        socket_connect_timeout=3,
    )
    try:
        for key in _queue_keys(queues):
            start = 0
            while jobs.complete:
                chunk = client.lrange(key, start, start + SCAN_CHUNK - 1)
                for raw in chunk:
                    _note(jobs, _loads(raw))
                jobs.scanned += len(chunk)
                start += len(chunk)
                if len(chunk) < SCAN_CHUNK:
                    break
                jobs.complete = jobs.scanned < MAX_SCAN
        for _, value in client.hscan_iter(_UNACKED_KEY, count=SCAN_CHUNK):
            jobs.scanned += 1
            entry = _loads(value)  # [message, exchange, routing key]
            if isinstance(entry, list) and entry:
                _note(jobs, entry[0])
    finally:
        client.close()
    return jobs
