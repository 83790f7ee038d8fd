"""Delivery of task messages on the Redis broker: held messages are never redelivered while their
worker lives, and a lost broker connection never stops a worker for good.

Installed by :mod:`worker.celery` (``broker_transport`` and a consumer bootstep).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import bootsteps
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class RedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, failing like a lost connection once its transport is detached.

    On a lost connection Celery 5.7 ``collect()``s the broken connection, which detaches its
    transport (``transport.client = None``), and then closes it. Whatever the old channel still
    does afterwards (restoring its unacknowledged messages on close, acknowledging a task that
    finishes after the reconnect) opens a Redis client from ``transport.client``, and kombu
    raises ``AttributeError`` there, which neither Celery nor kombu expect: the worker logs
    "Unrecoverable error" and stops consuming for good. Seen here whenever Redis was killed
    under load (tests/reliability/test_redis_restart.py). Raising the transport's connection
    error instead lets Celery handle it as it does any lost connection: the ack is logged as
    impossible, and the messages come back (:class:`HoldDeliveredMessages` puts back what the
    worker held as soon as the broker answers, else the visibility timeout does).
    """

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection of this channel was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        return params


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`RedisChannel` (``broker_transport`` in
    worker.celery)."""

    Channel = RedisChannel


def _held_tags(consumer: Any) -> tuple[Any, list[str]]:
    """The Redis QoS of the worker's task consumer and the delivery tags it holds unacked."""
    task_consumer = getattr(consumer, "task_consumer", None)
    qos = getattr(getattr(task_consumer, "channel", None), "qos", None)
    if qos is None or not hasattr(qos, "unacked_index_key"):
        return None, []  # not the Redis transport
    dirty = set(getattr(qos, "_dirty", ()))
    return qos, [tag for tag in list(getattr(qos, "_delivered", {})) if tag not in dirty]


def refresh_interval(visibility_timeout: float) -> float:
    return max(0.5, min(30.0, visibility_timeout / 8))


class HoldDeliveredMessages(bootsteps.StartStopStep):  # type: ignore[misc]
    """Keeps the messages this worker holds from being redelivered by Redis while it is alive.

    kombu's Redis transport records each delivered message in the ``unacked_index`` sorted set,
    scored by its delivery time, and any worker puts back in the queue the messages whose score
    is older than the visibility timeout. A message a worker holds for longer is then delivered
    twice: a retry waiting for its countdown (an ETA message stays unacknowledged in the
    worker's memory), or a task waiting behind long ones. This step re-scores every message the
    worker holds every ``visibility_timeout / 8`` seconds (at most 30 s), so only messages whose
    holder stopped refreshing them (a worker killed outright, a host lost) come back, one
    visibility timeout after its last refresh. The visibility timeout is no longer a bound on
    countdowns, time limits or queue waits.

    After a lost broker connection Celery drops the requests it had reserved or scheduled and
    cancels the running ones (``worker_cancel_long_running_tasks_on_connection_loss``): their
    messages are put back in their queues as soon as the connection is back, instead of one
    visibility timeout later.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, **kwargs)
        self._tref: Any = None
        self._abandoned: set[str] = set()

    def start(self, consumer: Any) -> None:
        qos, _ = _held_tags(consumer)
        if qos is None:
            return
        self._restore_abandoned(qos)
        options = consumer.app.conf.broker_transport_options or {}
        interval = refresh_interval(float(options.get("visibility_timeout", 3600)))
        self._tref = consumer.timer.call_repeatedly(
            interval, self._refresh, (consumer,), priority=10
        )

    def stop(self, consumer: Any) -> None:
        """Stopped for a restart (lost connection): remember what was held on it."""
        self._cancel(consumer)
        if consumer.app.conf.worker_cancel_long_running_tasks_on_connection_loss:
            self._abandoned.update(_held_tags(consumer)[1])

    def shutdown(self, consumer: Any) -> None:
        # Warm shutdown: kombu puts the unacknowledged messages back itself when it closes.
        self._cancel(consumer)
        self._abandoned.clear()

    def _cancel(self, consumer: Any) -> None:
        if self._tref is not None:
            consumer.timer.cancel(self._tref)
            self._tref = None

    def _refresh(self, consumer: Any) -> None:
        qos, tags = _held_tags(consumer)
        if qos is None or not tags:
            return
        try:
            with qos.channel.conn_or_acquire() as client:
                now = time.time()
                # XX: only messages still unacknowledged (an ack removes them from the index).
                client.zadd(qos.unacked_index_key, dict.fromkeys(tags, now), xx=True)
        except (redis.RedisError, OSError) as exc:  # retried at the next tick
            log.warning("could not refresh %d held message(s): %r", len(tags), exc)

    def _restore_abandoned(self, qos: Any) -> None:
        if not self._abandoned:
            return
        tags, self._abandoned = self._abandoned, set()
        restored = 0
        for tag in tags:
            try:
                # A no-op for a tag that was acknowledged or already restored meanwhile.
                qos.restore_by_tag(tag)
                restored += 1
            except (redis.RedisError, OSError) as exc:  # the visibility timeout restores it
                log.warning("could not restore message %s: %r", tag, exc)
        log.info("put back %d message(s) held before the broker connection was lost", restored)
