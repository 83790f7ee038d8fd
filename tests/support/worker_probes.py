"""What a test can ask of running Celery workers and their Redis broker from outside: the tasks
a worker is running now, a worker's pool children, the messages still in the broker.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis
from kombu.connection import Connection
from kombu.pidbox import Mailbox

BROKER_KEYS = ("deployments", "archives", "maintenance", "celery", "unacked")


def active_tasks(broker_url: str, names: list[str], timeout: float = 0.5) -> dict[str, list[Any]]:
    """Celery's ``active`` control command: the tasks each named worker is running now (each
    with its ``id``, ``time_start`` and the ``worker_pid`` of the pool child running it).
    Returns as soon as every named worker answered; those that did not are left out."""
    from worker.celery import app

    if not names:
        return {}
    with Connection(broker_url) as conn:
        mailbox = Mailbox(
            app.conf.control_exchange, type="fanout", accept=["json"], serializer="json"
        )(conn)
        replies = mailbox._broadcast(
            "active", reply=True, destination=names, timeout=timeout, limit=len(names)
        )
    answers: dict[str, list[Any]] = {}
    for reply in replies or []:
        for name, tasks in reply.items():
            if name in names and isinstance(tasks, list):
                answers[name] = tasks
    return answers


def pool_children(pid: int) -> list[int]:
    """The pids of the process's children (a prefork worker's pool)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def broker_backlog(broker_url: str) -> int:
    """Messages still waiting in the queues or delivered and not acknowledged."""
    client = redis.Redis.from_url(broker_url)
    try:
        return sum(int(client.llen(k) if k != "unacked" else client.hlen(k)) for k in BROKER_KEYS)
    finally:
        client.close()


def wait_broker_drained(broker_url: str, timeout: float) -> None:
    """A killed worker's messages come back after the visibility timeout: wait for them to be
    delivered again and acknowledged, so that what the logs say about them is complete."""
    deadline = time.monotonic() + timeout
    while (left := broker_backlog(broker_url)) > 0:
        assert time.monotonic() < deadline, f"{left} message(s) still in the broker"
        time.sleep(0.25)
