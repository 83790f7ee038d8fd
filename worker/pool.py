"""The worker's default pool: Celery's thread pool, with the task time limits it lacks.

One worker process runs up to ``WORKER_CONCURRENCY`` (default 32) tasks on threads that share
the process's database engine and S3 client (whose one event loop already multiplexes every
thread's calls). A deploy mostly waits on S3 and the database, so 32 uploads in flight cost one
process (~160 MiB) instead of 32 prefork children (~140 MiB each).

Celery's thread pool ignores ``task_soft_time_limit`` and ``task_time_limit``, and a thread
cannot be killed. This pool enforces them as the prefork pool does, as far as threads allow:

* **soft limit**: :class:`~celery.exceptions.SoftTimeLimitExceeded` is raised in the task's
  thread (an asynchronous exception, delivered at its next Python instruction; the S3 store
  waits in short slices so that one lands within a fraction of a second). The task handles it
  as it does under prefork: retried, or a chunk handed back.
* **hard limit**: the task is stuck where no exception reaches it. Like uWSGI's ``harakiri`` or
  gunicorn's worker timeout, the process logs the stuck thread's stack and exits with
  :data:`EXIT_STUCK`; its supervisor starts it again, and every message it held comes back as
  after a crash (the visibility timeout, or the reconciler). Every call a task makes is bounded
  well below the limit (S3's call budget, PostgreSQL's statement and lock timeouts, SQLite's
  busy timeout, the broker's socket timeouts), so this only fires on a bug.

No exception is ever delivered outside the task's own code: the watch is left, and a pending
exception cleared, under the same lock the watchdog fires under, before Celery's success or
failure callbacks run.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.concurrency import thread
from celery.exceptions import SoftTimeLimitExceeded

log = logging.getLogger(__name__)

EXIT_STUCK = 70  # EX_SOFTWARE: a task outlived its hard time limit
WATCH_INTERVAL = 0.25  # seconds between two looks at the running tasks


def _raise_in_thread(ident: int, exc: type[BaseException] | None) -> None:
    """Schedule ``exc`` in thread ``ident`` (``None`` clears one scheduled and not yet raised)."""
    target = ctypes.py_object(exc) if exc is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), target)


@dataclass(eq=False)  # hashed by identity: one entry per running task
class Watched:
    """One running task: its thread, its deadlines (monotonic), and what was done about them."""

    ident: int
    soft_at: float | None
    hard_at: float | None
    soft: float | None
    on_soft: Callable[[bool, float], Any] | None
    done: bool = False
    soft_fired: bool = False


class Watchdog:
    """Enforces the time limits of the tasks running on the pool's threads."""

    def __init__(self, exit_process: Callable[[int], None] = os._exit) -> None:
        self._lock = threading.Lock()
        self._running: set[Watched] = set()
        self._stop = threading.Event()
        self._exit = exit_process
        self._thread = threading.Thread(target=self._loop, name="time-limits", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def enter(
        self, soft: float | None, hard: float | None, on_soft: Callable[[bool, float], Any] | None
    ) -> Watched:
        now = time.monotonic()
        entry = Watched(
            ident=threading.get_ident(),
            soft_at=now + soft if soft else None,
            hard_at=now + hard if hard else None,
            soft=soft,
            on_soft=on_soft,
        )
        with self._lock:
            self._running.add(entry)
        return entry

    def leave(self, entry: Watched) -> None:
        """The task's code is over: no soft limit may reach this thread any more."""
        while True:
            try:
                with self._lock:
                    entry.done = True
                    self._running.discard(entry)
                    if entry.soft_fired:
                        _raise_in_thread(entry.ident, None)
                return
            except SoftTimeLimitExceeded:  # fired just before the lock was taken: done above
                continue

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        with self._lock:
            due = [
                e
                for e in self._running
                if e.soft_at is not None and now >= e.soft_at and not e.soft_fired
            ]
            for entry in due:
                entry.soft_fired = True
                _raise_in_thread(entry.ident, SoftTimeLimitExceeded)
            stuck = [e for e in self._running if e.hard_at is not None and now >= e.hard_at]
        for entry in due:
            if entry.on_soft is not None and entry.soft is not None:
                entry.on_soft(True, entry.soft)  # Celery's "Soft time limit exceeded" warning
        if stuck:
            self._give_up(stuck[0])

    def _give_up(self, entry: Watched) -> None:
        frame = sys._current_frames().get(entry.ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(gone)\n"
        log.critical(
            "a task outlived its hard time limit on thread %s; exiting (status %d) so that the "
            "supervisor restarts this worker and its messages are redelivered. Stuck at:\n%s",
            entry.ident,
            EXIT_STUCK,
            stack,
        )
        logging.shutdown()
        self._exit(EXIT_STUCK)


class TimeLimitedThreadPool(thread.TaskPool):  # type: ignore[misc]
    """``worker_pool`` of :mod:`worker.celery` by default (``WORKER_POOL=threads``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watchdog = Watchdog()

    def on_start(self) -> None:
        super().on_start()
        self.watchdog.start()

    def on_stop(self) -> None:
        # A warm shutdown waits for the running tasks: the watchdog still bounds them.
        super().on_stop()
        self.watchdog.stop()

    def on_apply(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        timeout_callback: Callable[[bool, float], Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        **_: Any,
    ) -> thread.ApplyResult:
        def run() -> None:
            if accept_callback is not None:
                accept_callback(os.getpid(), time.monotonic())
            entry = self.watchdog.enter(soft_timeout, timeout, timeout_callback)
            try:
                result = target(*(args or ()), **(kwargs or {}))
            except BaseException as exc:  # reported to Celery as a lost worker, as prefork does
                self.watchdog.leave(entry)
                if error_callback is None:
                    raise
                try:
                    raise WorkerLostError(repr(exc)) from exc
                except WorkerLostError:
                    error_callback(ExceptionInfo())
                return
            self.watchdog.leave(entry)
            if callback is not None:
                callback(result)

        return thread.ApplyResult(self.executor.submit(run))
