"""Running the jobs of one chunk message (a bulk redeploy's deploys, a cleanup's archives) at
once: on this process's threads, which share its S3 client and event loop
(:mod:`worker.s3`) and its database pool."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy.exc import OperationalError

from worker.s3 import TransientS3Error

log = logging.getLogger(__name__)
T = TypeVar("T")


class Outcome(Protocol):
    @property
    def status(self) -> str: ...


OutcomeT = TypeVar("OutcomeT", bound=Outcome)

CHUNK = 50  # jobs per message
MAX_ITEMS = 500  # a message naming more is cut here (its rest is left to the reconciler)
# Jobs in flight per process: below the PostgreSQL pool's 10 connections, as each job holds one
# for its short transactions.
CONCURRENCY = 8

# How a chunk's jobs run: the process's thread pool, or (the interleaving explorer, tests that
# need to know which job meets a fault) one by one in the calling thread.
MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[object]]

_lock = threading.Lock()
_pool: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """This process's threads: made in the process that uses them, never inherited by fork."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), concurrent.futures.ThreadPoolExecutor(CONCURRENCY, "chunk"))
        return _pool[1]


def concurrently(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[object]:
    return list(_thread_pool().map(fn, items))


def one_by_one(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[object]:
    return [fn(item) for item in items]


def chunks(items: Sequence[T], size: int | None = None) -> list[list[T]]:
    size = size or CHUNK
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


Item = tuple[str, str]  # (widget_id, job_id)
HandBack = Callable[[str, str, str], object]  # organization_id, widget_id, job_id: a send

# What a single job's task retries (worker.tasks.base): a chunk hands such a job back to one.
TRANSIENT_ERRORS = (TransientS3Error, OperationalError)


@dataclass
class ChunkReport(Generic[OutcomeT]):
    """What one delivery of a chunk did: the jobs' outcomes, and the jobs handed back to single
    messages (all of them when the chunk's shared first transaction failed). The chunk's
    threads add to it; its lock guards the lists only, never a send."""

    organization_id: str
    items: Sequence[Item]
    send_single: HandBack
    kind: str  # "deployment", "archive job": for the log
    outcomes: list[OutcomeT] = field(default_factory=list)
    handed_back: list[str] = field(default_factory=list)  # job ids
    whole_chunk_handed_back: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.widget_of = {job_id: widget_id for widget_id, job_id in self.items}

    def add(self, outcome: OutcomeT) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def hand_back(self, job_id: str, why: object) -> None:
        """Send ``job_id`` as a single message (with its task's retries and attempts cap)."""
        log.info("%s %s handed back to a single message: %s", self.kind, job_id, why)
        with self._lock:
            self.handed_back.append(job_id)
        self.send_single(self.organization_id, self.widget_of[job_id], job_id)

    def hand_back_all(self, why: object) -> ChunkReport[OutcomeT]:
        """The chunk's shared transaction failed, so nothing of it is committed: every job goes
        the single way, which handles each case."""
        self.whole_chunk_handed_back = True
        for _, job_id in self.items:
            self.hand_back(job_id, why)
        return self

    def as_dict(self) -> dict[str, object]:
        by_status: dict[str, int] = {}
        for done in self.outcomes:
            by_status[done.status] = by_status.get(done.status, 0) + 1
        return {
            "jobs": len(self.outcomes) + len(self.handed_back),
            "by_status": by_status,
            "handed_back": self.handed_back,
            "whole_chunk_handed_back": self.whole_chunk_handed_back,
        }
