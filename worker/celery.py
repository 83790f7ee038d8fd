"""The Celery application: ``celery -A worker worker|beat|flower``.

Configuration is computed from :func:`worker.settings.get_settings` when Celery first needs it
(``add_defaults`` with a callable), not at import time.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from typing import Any

from celery import Celery, signals
from celery.schedules import crontab
from kombu.entity import Queue

from worker import constants as c
from worker.beat_lock import hold_beat_lock
from worker.delivery import HoldDeliveredMessages
from worker.settings import ConfigurationError, Settings, get_settings

log = logging.getLogger(__name__)


# The pool of ``celery -A worker worker`` (``WORKER_POOL``): see worker.pool.
POOLS = {"threads": "worker.pool:TimeLimitedThreadPool", "prefork": "prefork"}
THREADS_PER_WORKER = 32  # uploads in flight per process when WORKER_CONCURRENCY is unset


def default_concurrency(pool: str) -> int:
    """Tasks in flight when WORKER_CONCURRENCY is unset: uploads wait on S3, not on the CPU."""
    if pool == "threads":
        return THREADS_PER_WORKER
    return max(4, 4 * (os.cpu_count() or 1))


BROKER_SOCKET_TIMEOUT = c.BROKER_SOCKET_TIMEOUT
BROKER_CONNECT_TIMEOUT = c.BROKER_CONNECT_TIMEOUT
# redis-py pings a connection idle for this long before using it; kombu also drops a BRPOP
# connection whose reply is overdue by this long (a half-open socket after a failover).
BROKER_HEALTH_CHECK_INTERVAL = 10
# Redelivery of messages whose holder died (see worker.delivery): kombu looks for them every
# UNACKED_RESTORE_INTERVAL seconds.
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
        # kombu's Redis transport, surviving a teardown race on a lost connection
        # (worker.delivery.RedisChannel).
        "broker_transport": "worker.delivery:RedisTransport",
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
        "worker_pool": POOLS[settings.worker_pool],
        "worker_concurrency": settings.worker_concurrency
        or default_concurrency(settings.worker_pool),
        # A lost broker connection cannot ack late tasks anyway; cancel and let them redeliver
        # (worker.delivery puts their messages back as soon as the broker answers again).
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
        # Scheduled deploys: the due ones are found in the database and sent (never broker ETAs).
        "send-due-deployments": {
            "task": c.SEND_DUE_TASK,
            "schedule": timedelta(seconds=settings.schedule_tick_seconds),
            "options": {"expires": settings.schedule_tick_seconds},
        },
        # Webhook deliveries due (new events, retries whose wait is over, expired leases).
        "dispatch-webhooks": {
            "task": c.DISPATCH_WEBHOOKS_TASK,
            "schedule": timedelta(seconds=settings.webhook_tick_seconds),
            "options": {"expires": settings.webhook_tick_seconds},
        },
        # Same tick as the reconciler: what became due is checked within a minute of its horizon.
        "check-late-writes": {
            "task": c.LATE_WRITES_TASK,
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
        hold_beat_lock()
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
        "worker.tasks.late_writes",
        "worker.tasks.webhooks",
    ],
)
app.add_defaults(_load_config)
app.steps["consumer"].add(HoldDeliveredMessages)


@signals.beat_init.connect
def _single_beat(**_: Any) -> None:
    """Covers a beat started some other way than ``celery -A worker beat`` (worker.beat_lock)."""
    hold_beat_lock()


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
@signals.worker_shutdown.connect  # the threads pool's tasks ran in the main process
def _close_process_resources(**_: Any) -> None:
    from worker.db import reset_engine
    from worker.s3 import close_store

    close_store()
    reset_engine()
