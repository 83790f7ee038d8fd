"""``python -m worker.cli status`` and ``deployments tail``: what an operator reaches for first.

``status`` reads, each bounded in time: the queues' depth (Redis lists), the workers that answer
a ping, the beat lease holder (:mod:`worker.beat_lock`), jobs by status, the age of the oldest
``ready`` job of each kind, and the bulk jobs still fanning out. Exit status 1 when the broker
cannot be read or no worker answers (a script's health check), else 0.

``deployments tail`` prints an organization's latest deployments, then follows them live: one
line per new deployment or change of status, polled from the database (``--interval``), until
Ctrl-C or ``--for`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import func
from sqlmodel import col, select

from worker import constants as c
from worker.beat_lock import BEAT_LOCK_KEY
from worker.db import read_session
from worker.ids import is_safe_id
from worker.models import ArchiveJob, BulkJob, Deployment, utcnow
from worker.settings import get_settings

PING_TIMEOUT = 1.0
EXIT_UNHEALTHY = 1
TAIL_BACKLOG = 10


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = sub.add_parser(
        "status",
        help="queues, workers, beat, jobs by state: is it all running?",
        description=(
            "Queue depths, the workers answering a ping, the beat lease holder, jobs by status "
            "and the age of the oldest ready job of each kind. Exit status 1 when the broker "
            "cannot be read or no worker answers."
        ),
    )
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    deployments = sub.add_parser("deployments", help="an organization's deployments")
    which = deployments.add_subparsers(dest="deployments_command", required=True)
    tail = which.add_parser(
        "tail",
        help="follow an organization's deployments live",
        description=(
            "Print the organization's latest deployments, then one line per new deployment or "
            "change of status, until Ctrl-C."
        ),
    )
    tail.add_argument("--organization", required=True, help="organization id")
    tail.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls (default: %(default)g)"
    )
    tail.add_argument("--for", dest="duration", type=float, help="stop after this many seconds")


# -- status -----------------------------------------------------------------------------------


@dataclass
class Status:
    queues: dict[str, int] | None = None  # None: the broker could not be read
    workers: list[str] = field(default_factory=list)
    beat: str | None = None  # the lease holder
    beat_expires_in: int | None = None
    jobs: dict[str, dict[str, int]] = field(default_factory=dict)
    oldest_ready_seconds: dict[str, float | None] = field(default_factory=dict)
    bulk_fanning_out: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.queues is not None and bool(self.workers)


def _broker(status: Status) -> None:
    from worker.celery import app
    from worker.producer import queue_sizes

    url = str(get_settings().celery_broker_url)
    try:
        status.queues = queue_sizes(c.QUEUES)
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            holder = client.get(BEAT_LOCK_KEY)
            status.beat = holder.decode() if isinstance(holder, bytes) else None
            ttl = int(client.ttl(BEAT_LOCK_KEY))
            status.beat_expires_in = ttl if ttl >= 0 else None
        finally:
            client.close()
        replies = app.control.ping(timeout=PING_TIMEOUT) or []
        status.workers = sorted(name for reply in replies for name in reply)
    except (redis.RedisError, BrokerError, OSError) as exc:
        status.problems.append(f"broker: {exc}")
    if status.queues is not None and not status.workers:
        status.problems.append(f"no worker answered a ping within {PING_TIMEOUT:g} s")


def _jobs(status: Status) -> None:
    now = utcnow()
    with read_session("cli.status") as session:
        kinds: tuple[tuple[str, Any, Any], ...] = (
            ("deployments", col(Deployment.status), col(Deployment.created_at)),
            ("archive_jobs", col(ArchiveJob.status), col(ArchiveJob.created_at)),
        )
        for kind, job_status, created_at in kinds:
            rows = session.exec(select(job_status, func.count()).group_by(job_status)).all()
            status.jobs[kind] = {str(s): int(n) for s, n in rows}
            oldest: datetime | None = session.exec(
                select(func.min(created_at)).where(job_status == "ready")
            ).one()
            status.oldest_ready_seconds[kind] = (
                None if oldest is None else round((now - oldest).total_seconds(), 1)
            )
        status.bulk_fanning_out = session.exec(
            select(func.count()).where(
                col(BulkJob.fanned_out_at).is_(None), col(BulkJob.error).is_(None)
            )
        ).one()


def collect_status() -> Status:
    status = Status()
    _broker(status)
    _jobs(status)
    return status


def _counts(counts: dict[str, int]) -> str:
    order = ("ready", "running", "success", "failure")
    return ", ".join(f"{s} {counts.get(s, 0)}" for s in order)


def _age(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds:g} s"


def run_status(args: argparse.Namespace) -> int:
    status = collect_status()
    if args.json:
        print(json.dumps({**asdict(status), "healthy": status.healthy}, indent=2))
    else:
        queues = (
            "unreadable"
            if status.queues is None
            else ", ".join(f"{q} {n}" for q, n in status.queues.items())
        )
        workers = ", ".join(status.workers) or "none answered"
        beat = "no lease held (beat not running?)"
        if status.beat:
            beat = f"lease held by {status.beat} (refreshed; expires in {status.beat_expires_in} s)"
        print(f"queues        {queues}")
        print(f"workers       {len(status.workers)}: {workers}")
        print(f"beat          {beat}")
        for kind, label in (("deployments", "deployments"), ("archive_jobs", "archive jobs")):
            oldest = _age(status.oldest_ready_seconds.get(kind))
            print(f"{label:<13} {_counts(status.jobs.get(kind, {}))} (oldest ready: {oldest})")
        print(f"bulk jobs     {status.bulk_fanning_out} fanning out")
        for problem in status.problems:
            print(f"problem: {problem}", file=sys.stderr)
    return 0 if status.healthy else EXIT_UNHEALTHY


# -- deployments tail -------------------------------------------------------------------------


def _line(dep: Deployment) -> str:
    parts = [
        dep.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        dep.deployment_id,
        f"widget {dep.widget_id}",
        dep.status,
        f"seq {dep.sequence}" if dep.sequence is not None else "seq -",
        f"by {dep.created_by}",
    ]
    if dep.bulk_id:
        parts.append(f"bulk {dep.bulk_id}")
    if dep.error:
        parts.append(f"error: {dep.error}")
    return "  ".join(parts)


def _changed_since(organization_id: str, since: datetime | None) -> list[Deployment]:
    with read_session("cli.tail") as session:
        stmt = select(Deployment).where(Deployment.organization_id == organization_id)
        if since is None:
            stmt = stmt.order_by(col(Deployment.updated_at).desc()).limit(TAIL_BACKLOG)
            return list(reversed(session.exec(stmt).all()))
        stmt = stmt.where(col(Deployment.updated_at) >= since).order_by(
            col(Deployment.updated_at), col(Deployment.id)
        )
        return list(session.exec(stmt).all())


def run_tail(args: argparse.Namespace, clock: Any = time.monotonic) -> int:
    if not is_safe_id(args.organization):
        print("error: --organization must be 1-64 characters of [A-Za-z0-9_-]", file=sys.stderr)
        return 2
    deadline = None if args.duration is None else clock() + args.duration
    seen: dict[str, tuple[str, datetime]] = {}  # id -> (status, updated_at) printed
    since: datetime | None = None
    try:
        while True:
            for dep in _changed_since(args.organization, since):
                if seen.get(dep.id) == (dep.status, dep.updated_at):
                    continue  # the same timestamp is read again (>=): printed already
                seen[dep.id] = (dep.status, dep.updated_at)
                since = dep.updated_at if since is None else max(since, dep.updated_at)
                print(_line(dep), flush=True)
            if since is None:
                since = utcnow()
            # Only rows at or after ``since`` are read again: older entries are never needed.
            seen = {k: v for k, v in seen.items() if v[1] >= since}
            if deadline is not None and clock() >= deadline:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
