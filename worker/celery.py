"""The Celery application: ``celery -A worker worker|beat|flower``.

Configuration is computed from :func:`worker.settings.get_settings` when Celery first needs it
(``add_defaults`` with a callable), not at import time.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import redis
from celery import Celery, bootsteps, signals
from celery.schedules import crontab
from kombu.entity import Queue

from worker import constants as c
from worker.settings import ConfigurationError, Settings, get_settings

log = logging.getLogger(__name__)


def default_concurrency() -> int:
    """Pool children when WORKER_CONCURRENCY is unset: uploads wait on S3, not on the CPU."""
    return max(4, 4 * (os.cpu_count() or 1))


# Broker sockets (workers, beat, the API's health checks and the reconciler's scans): no call
# waits forever on a broker that accepts connections and never answers. The API's sends use
# tighter bounds of their own (worker.producer).
BROKER_SOCKET_TIMEOUT = 5.0
BROKER_CONNECT_TIMEOUT = 3.0
# redis-py pings a connection idle for this long before using it; kombu also drops a BRPOP
# connection whose reply is overdue by this long (a half-open socket after a failover).
BROKER_HEALTH_CHECK_INTERVAL = 10
# Redelivery of messages whose holder died (see HoldDeliveredMessages): kombu looks for them
# every UNACKED_RESTORE_INTERVAL seconds.
UNACKED_RESTORE_INTERVAL = 10
# A cleanup message not started within half a day is dropped (the next day's run replaces it).
CLEANUP_EXPIRES_SECONDS = 12 * 3600


def broker_transport_options() -> dict[str, Any]:
    return {
        "visibility_timeout": c.VISIBILITY_TIMEOUT,
        "socket_timeout": BROKER_SOCKET_TIMEOUT,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "health_check_interval": BROKER_HEALTH_CHECK_INTERVAL,
        "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    transport_options = broker_transport_options()
    return {
        "broker_url": str(settings.celery_broker_url),
        "result_backend": settings.celery_result_backend,
        "task_ignore_result": settings.celery_result_backend is None,
        # The visibility timeout is read from each of these, depending on the code path.
        "broker_transport_options": transport_options,
        "result_backend_transport_options": transport_options,
        "broker_connection_timeout": BROKER_CONNECT_TIMEOUT,
        "broker_connection_retry_on_startup": True,
        # The Redis result backend (when one is configured) has its own socket settings.
        "redis_socket_timeout": BROKER_SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        "redis_socket_keepalive": True,
        "redis_backend_health_check_interval": BROKER_HEALTH_CHECK_INTERVAL,
        # JSON only: no pickle, so no code execution from a forged message.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once: acknowledge after the task ran; a lost worker means redelivery.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency or default_concurrency(),
        # A lost broker connection cannot ack late tasks anyway; cancel and let them redeliver
        # (HoldDeliveredMessages puts their messages back as soon as the broker answers again).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # A task killed by the hard time limit is requeued, not failed: its upload may have
        # gone through, and the redelivery finds out (worker.tasks.base).
        "task_acks_on_timeout": False,
        "task_time_limit": c.TASK_TIME_LIMIT,
        "task_soft_time_limit": c.TASK_SOFT_TIME_LIMIT,
        "task_queues": [Queue(name, routing_key=name) for name in c.QUEUES],
        "task_default_queue": c.DEPLOY_QUEUE,
        "task_routes": c.TASK_ROUTES,
        "task_track_started": True,
        # Events for Flower.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": beat_schedule(settings),
        "beat_schedule_filename": settings.celery_beat_schedule_filename,
        "timezone": "UTC",
        "enable_utc": True,
    }


def beat_schedule(settings: Settings) -> dict[str, Any]:
    return {
        # A crontab, not an interval: an interval counts from beat's start, so every restart
        # would push the daily cleanup back by up to a day. With the schedule file on a volume,
        # a run missed while beat was down happens as soon as it is back.
        "cleanup-drafts": {
            "task": c.CLEANUP_TASK,
            "schedule": crontab(minute=0, hour=settings.cleanup_crontab_hour),
            "options": {"expires": CLEANUP_EXPIRES_SECONDS},
        },
        "reconcile": {
            "task": c.RECONCILE_TASK,
            "schedule": timedelta(seconds=settings.reconcile_schedule_seconds),
            "options": {"expires": settings.reconcile_schedule_seconds},
        },
    }


def _check_flower(settings: Settings) -> None:
    """Flower shows every task's arguments: outside development it must not run unprotected."""
    if "flower" in sys.argv[1:] and not settings.is_development and not settings.flower_basic_auth:
        raise ConfigurationError("FLOWER_BASIC_AUTH must be set to run Flower in production")


def _load_config() -> dict[str, Any]:
    try:
        settings = get_settings()
        _check_flower(settings)
        config = celery_config(settings)
    except ConfigurationError as exc:
        # One clear line instead of a traceback from deep inside Celery's start-up.
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if _command(sys.argv[1:]) == "beat":
        # Before beat prints anything: a second beat exits with one line (see _single_beat).
        _hold_beat_lock()
    return config


# Options of the ``celery`` command that take a value (so the value is not the subcommand).
_VALUE_OPTIONS = {"-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config"}
_VALUE_OPTIONS |= {"--workdir"}


def _command(args: list[str]) -> str | None:
    """The ``celery`` subcommand in ``args`` (``celery -A worker beat`` → ``beat``)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


app = Celery(
    "worker",
    include=[
        "worker.tasks.deploy",
        "worker.tasks.archive",
        "worker.tasks.bulk",
        "worker.tasks.maintenance",
    ],
)
app.add_defaults(_load_config)


@signals.worker_init.connect
def _refuse_store_without_conditional_writes(**_: Any) -> None:
    """Publish order is enforced by S3 conditional writes: a store that silently ignores
    ``If-None-Match`` would let an older snapshot replace a newer one. Checked once per worker,
    before any task runs; the worker refuses to start (one line, exit 2) on such a store."""
    from worker.s3 import S3Error, S3Store

    store = S3Store(get_settings())
    try:
        ok = store.supports_conditional_writes()
    except S3Error as exc:
        print(f"error: cannot check the S3 store's conditional writes: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        store.close()
    if not ok:
        print(
            "error: the S3 store ignores conditional writes (If-None-Match: *); "
            "publish order cannot be guaranteed, refusing to start",
            file=sys.stderr,
        )
        raise SystemExit(2)


@signals.worker_process_init.connect
def _init_process_resources(**_: Any) -> None:
    """After fork: this child's own DB engine and S3 client (never the parent's)."""
    from worker.db import get_engine
    from worker.s3 import get_store

    get_engine()
    get_store()


@signals.worker_process_shutdown.connect
def _close_process_resources(**_: Any) -> None:
    from worker.db import reset_engine
    from worker.s3 import close_store

    close_store()
    reset_engine()


# -- messages held by a worker are never redelivered while it is alive -------------------------


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


app.steps["consumer"].add(HoldDeliveredMessages)


# -- exactly one beat --------------------------------------------------------------------------

BEAT_LOCK_KEY = "widgets:beat:lock"
BEAT_LOCK_TTL = 60
BEAT_LOCK_REFRESH = 15
BEAT_LOCK_START_TIMEOUT = 10.0
# Extend the lock if it is still ours; take it again if it expired (e.g. during a broker
# outage) and nobody took it; 0 if another beat holds it.
_REFRESH_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 2
end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class BeatLock:
    """A lease on the broker (``SET key token NX EX ttl``) held by the one running beat and
    refreshed by a daemon thread; a beat killed outright frees it within ``ttl`` seconds."""

    def __init__(self, url: str, key: str = BEAT_LOCK_KEY, ttl: int = BEAT_LOCK_TTL) -> None:
        self.key, self.ttl = key, ttl
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=BROKER_SOCKET_TIMEOUT,
            socket_connect_timeout=BROKER_CONNECT_TIMEOUT,
            socket_keepalive=True,
        )
        self._stop = threading.Event()

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, ex=self.ttl))

    def holder(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def refresh(self) -> bool:
        """False if another beat holds the lock now."""
        return int(self.client.eval(_REFRESH_LOCK, 1, self.key, self.token, self.ttl)) != 0

    def release(self) -> None:
        self._stop.set()
        try:
            self.client.eval(_RELEASE_LOCK, 1, self.key, self.token)
        except (redis.RedisError, OSError):  # it expires by itself
            log.debug("could not release the beat lock", exc_info=True)

    def keep(self, on_lost: Any, interval: float = BEAT_LOCK_REFRESH) -> threading.Thread:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.refresh():
                        on_lost()
                        return
                except (redis.RedisError, OSError) as exc:  # a broker outage: try again
                    log.warning("could not refresh the beat lock: %r", exc)

        thread = threading.Thread(target=run, name="beat-lock", daemon=True)
        thread.start()
        return thread


def _stop_this_beat() -> None:
    log.error("another celery beat took the beat lock; stopping this one")
    os.kill(os.getpid(), signal.SIGTERM)


def _take_beat_lock() -> BeatLock:
    lock = BeatLock(str(get_settings().celery_broker_url))
    deadline = time.monotonic() + BEAT_LOCK_START_TIMEOUT
    while True:
        try:
            if lock.acquire():
                return lock
            holder = lock.holder()
        except (redis.RedisError, OSError) as exc:  # the broker may still be starting
            if time.monotonic() < deadline:
                time.sleep(1)
                continue
            print(f"error: celery beat cannot take its lock on the broker: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(
            f"error: another celery beat is running ({holder or 'unknown'} holds "
            f"{BEAT_LOCK_KEY} on the broker); only one may run, exiting",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)


_beat_lock: BeatLock | None = None
_beat_lock_keeper: int | None = None  # pid whose thread refreshes it (beat --detach forks)


def _hold_beat_lock() -> None:
    global _beat_lock, _beat_lock_keeper
    if _beat_lock is None:
        _beat_lock = _take_beat_lock()
        atexit.register(_beat_lock.release)
    if _beat_lock_keeper != os.getpid():
        _beat_lock.keep(on_lost=_stop_this_beat)
        _beat_lock_keeper = os.getpid()


@signals.beat_init.connect
def _single_beat(**_: Any) -> None:
    """Two beats would send every periodic task twice: the second one exits with one line.
    ``celery -A worker beat`` takes the lock when it loads its configuration, before its banner;
    this covers a beat started any other way."""
    _hold_beat_lock()
