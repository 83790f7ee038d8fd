"""Workers killed again and again while work is in flight: the stack, the fault injector and
the probes of ``tests/reliability/test_worker_kills_*.py``.

Three faults, each injected :data:`KILLS` times, at least :data:`KILL_EVERY` seconds apart, always
at a worker that holds a running task at that moment (asked with Celery's ``active`` control
command just before):

* **pool child SIGKILL** (``WORKER_POOL=prefork``): the prefork child running a task is
  ``kill -9``-ed; the worker's parent notices (``WorkerLostError``) and, with
  ``task_reject_on_worker_lost``, puts the message back;
* **whole-worker SIGKILL** (the default threads pool, as the next fault): the worker's process
  group is ``kill -9``-ed (a host or container lost): its unacknowledged messages stay in Redis
  until the visibility timeout brings them back; a new worker is started at once, as a
  deployment would restart it;
* **whole-worker SIGTERM**: a warm shutdown, which must finish the running tasks or hand them
  back; a new worker is started at once. Every other time ``SIGTERM`` goes to the main process
  only (``docker stop``, Kubernetes), otherwise to the whole process group, pool children
  included (systemd's default ``KillMode=control-group``, and ``./dev serve``): the children then
  die at once and their tasks are handed back like a killed child's.

The stack (:func:`open_stack`, one per test module through the ``worker_kill_stack`` fixture of
``tests/reliability/conftest.py``) has a ``redis-server`` of its own, a fresh SQLite database,
moto behind a proxy that slows every S3 request (so work is in flight when a kill lands), the
in-process API, and two ``celery -A tests.support.short_visibility worker`` subprocesses: the
project's app with a visibility timeout of :data:`VISIBILITY_TIMEOUT` seconds, so that a killed
worker's messages come back in seconds rather than minutes (production: 240 s). Each test has an
organization of its own and starts with two live workers. The reconciler runs every two seconds
while the test waits for the jobs to finish, as beat would, with its re-send delay for jobs whose
message is gone scaled down the same way (:data:`RESEND_AFTER`): a worker SIGKILLed between
popping a message off its queue and recording it as unacknowledged (two Redis round trips in
kombu) loses it, and only the reconciler sends it again (the ``requeues`` figure). Whether a fault
hit work in flight is read from the workers' logs once the broker is drained (see
:meth:`Chaos.outcome`).

``RELIABILITY_SCALE`` (default 1) multiplies the jobs and the kills for a longer run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import OrgClient, make_org_client
from tests.support.outage_s3 import OutageS3Proxy
from tests.support.reliability import (
    FINAL,
    RedisServer,
    Worker,
    Workers,
    environment,
    fresh_sqlite,
    ping,
)
from tests.support.worker_probes import active_tasks, pool_children

SCALE = max(1, int(os.environ.get("RELIABILITY_SCALE", "1")))
KILLS = 4 * SCALE  # per fault and workload
KILL_EVERY = 2.5  # seconds, at least, between two kills
SPAN = KILLS * KILL_EVERY * 1.2  # the requests are paced to last about this long
VISIBILITY_TIMEOUT = 4  # seconds (production: 240)
RESEND_AFTER = 2 * VISIBILITY_TIMEOUT  # the reconciler's, for lost messages (production: 30)
CONCURRENCY = 2  # tasks at once per worker; two workers


def pool_for(fault: str) -> str:
    """The worker pool a fault is injected into: a pool child exists only in prefork; the
    whole-worker faults hit the project's default pool (threads)."""
    return "prefork" if fault == CHILD_SIGKILL else "threads"


CHILD_SIGKILL = "pool child SIGKILL"
WORKER_SIGKILL = "whole-worker SIGKILL"
WORKER_SIGTERM = "whole-worker SIGTERM"
FAULTS = (CHILD_SIGKILL, WORKER_SIGKILL, WORKER_SIGTERM)
FAULT_IDS = ("child-sigkill", "worker-sigkill", "worker-sigterm")

# What the workers' logs say (see :meth:`Chaos.outcome`).
RECEIVED = re.compile(r"Task widgets\.\w+\[([\w-]+)\] received")
DONE = re.compile(r"Task widgets\.\w+\[([\w-]+)\] (?:succeeded|retry|raised)")
CHILD_LOST = "Worker exited prematurely: signal 9 (SIGKILL)"  # a pool child died holding a job
WARM_SHUTDOWN = "Warm shutdown"
LOG_CHARS = 100_000_000  # whole logs


def reconcile_now() -> None:
    """One reconcile run in this process, as beat would send it."""
    from worker.tasks.maintenance import reconcile_and_resend

    reconcile_and_resend()


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    broker: str
    proxy: OutageS3Proxy
    workers: Workers
    http: TestClient
    s3: Any

    def org(self) -> OrgClient:
        return make_org_client(self.http)

    def live(self) -> list[Worker]:
        return [w for w in self.workers.started if w.proc.alive()]

    def prepare(self, pool: str) -> None:
        """Two live, ready workers of ``pool`` and S3 at full speed, whatever an earlier test
        left."""
        for worker in self.live():
            if WARM_SHUTDOWN in worker.log():  # stopped by an earlier test that failed half-way
                worker.proc.proc.wait(timeout=60)
            elif worker.pool != pool:
                worker.proc.stop(timeout=30)
        for _ in range(2 - len(self.live())):
            self.workers.start(concurrency=CONCURRENCY, wait=False, pool=pool)
        for worker in self.live():
            self.workers.wait_ready(worker)
        self.proxy.slow(0)


@contextlib.contextmanager
def open_stack(services: dict[str, Any], tmp: Path) -> Iterator[Stack]:
    """Own Redis, fresh SQLite, S3 through a proxy that can slow it, the in-process API and two
    short-visibility workers (not waited for: :meth:`Stack.prepare` does)."""
    from api_stub.app import app as api

    redis_server = RedisServer(tmp)
    proxy = OutageS3Proxy(services["moto_url"])
    env = {
        "DATABASE_URL": fresh_sqlite(tmp),
        "CELERY_BROKER_URL": redis_server.url(),
        "S3_ENDPOINT_URL": proxy.url,
    }
    worker_env = {**env, "TEST_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT)}
    try:
        with (
            pytest.MonkeyPatch.context() as patch,
            environment(**env),
            TestClient(api) as http,
            Workers(tmp, worker_env, app="tests.support.short_visibility") as workers,
        ):
            # The reconciler (run by this process) re-sends a ``ready`` job that has no message
            # in the broker after RESEND_AFTER s (30): scaled down like the visibility timeout.
            # A worker SIGKILLed between taking a message off its queue (BRPOP) and recording
            # it as unacknowledged loses that message; only this re-send brings it back.
            patch.setattr("worker.services.reconcile.RESEND_AFTER", RESEND_AFTER)
            yield Stack(redis_server.url(), proxy, workers, http, services["s3"])
    finally:
        proxy.close()
        redis_server.stop()


# -- injecting the faults ----------------------------------------------------------------------


@dataclass
class Kill:
    victim: Worker
    pid: int  # the process signalled (negative: its process group)
    busy: bool  # just before, it was running a task (Celery's ``active``)


@dataclass
class HeldTail:
    """Holds the last quarter of a workload's requests until all but one of the faults are
    injected: on a machine slow to restart workers, the work could otherwise run out before the
    faults land (seen with two CI runs sharing 2 cores: only 2 of 4 kills)."""

    count: int
    gate: threading.Event = field(default_factory=threading.Event)

    def wait_turn(self, i: int) -> None:
        if i >= self.count - self.count // 4:
            self.gate.wait(timeout=120)  # bounded: released by inject() whatever happens

    def release(self) -> None:
        self.gate.set()


@dataclass
class Chaos:
    """Injects one kind of fault into the stack's workers, at a worker that is running a task;
    replaces a worker killed or stopped as a whole, as a deployment would restart it."""

    fault: str
    stack: Stack
    kills: list[Kill] = field(default_factory=list)
    replacements: int = 0
    gone: set[str] = field(default_factory=set)
    ready: set[str] = field(default_factory=set)
    offsets: dict[str, int] = field(default_factory=dict)  # log lines of earlier tests

    def __post_init__(self) -> None:
        self.offsets = {w.name: len(w.log(LOG_CHARS)) for w in self.stack.workers.started}

    def log(self, worker: Worker) -> str:
        """The worker's log since this test began."""
        return worker.log(LOG_CHARS)[self.offsets.get(worker.name, 0) :]

    def live(self) -> list[Worker]:
        return [w for w in self.stack.workers.started if w.name not in self.gone and w.proc.alive()]

    def answering(self) -> list[Worker]:
        out = []
        for worker in self.live():
            if worker.name not in self.ready and ping(self.stack.broker, worker.name, 0.2):
                self.ready.add(worker.name)
            if worker.name in self.ready:
                out.append(worker)
        return out

    def strike(self, wait: float = 10.0) -> Kill | None:
        """Wait (up to ``wait`` s) for a worker that is running a task, then inject the fault
        into it at once; None if no worker answers at all."""
        deadline = time.monotonic() + wait
        while True:
            ready = self.answering()
            active = active_tasks(self.stack.broker, [w.name for w in ready])
            busy = [w for w in ready if active.get(w.name)]
            if busy or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        candidates = busy or ready
        if not candidates:
            return None
        victim = candidates[0]  # the oldest: replacements get time to come up
        running = active.get(victim.name, [])
        if self.fault == CHILD_SIGKILL:
            # The child that started its task last is the least likely to be done already.
            latest = max(running, key=lambda t: t.get("time_start") or 0, default=None)
            pid = int(latest["worker_pid"]) if latest and latest.get("worker_pid") else 0
            pid = pid or (pool_children(victim.pid) or [victim.pid])[0]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        elif self.fault == WORKER_SIGKILL:
            pid = victim.pid
            victim.proc.signal_group(signal.SIGKILL)
            victim.proc.proc.wait(timeout=10)
        elif len(self.kills) % 2 == 0:
            pid = victim.pid
            os.kill(pid, signal.SIGTERM)  # the main process only: docker stop, Kubernetes
        else:
            # The whole process group, pool children included: systemd's default
            # (KillMode=control-group) and this project's own ``./dev serve``.
            pid = -victim.pid
            victim.proc.signal_group(signal.SIGTERM)
        kill = Kill(victim, pid, busy=bool(running))
        if self.fault != CHILD_SIGKILL:
            self.gone.add(victim.name)
            # The restart, as a deployment would do it.
            self.stack.workers.start(concurrency=CONCURRENCY, wait=False, pool=victim.pool)
            self.replacements += 1
        self.kills.append(kill)
        return kill

    def run(
        self,
        times: int,
        every: float,
        stop: Callable[[], bool],
        before_last: Callable[[], None] = lambda: None,
    ) -> None:
        """``times`` faults, at least ``every`` s apart, until ``stop()`` says the work is done;
        ``before_last`` is called once all but the last are injected (or when it stops)."""
        try:
            for n in range(times):
                if n == times - 1:
                    before_last()
                started = time.monotonic()
                if stop() or self.strike() is None:
                    return
                time.sleep(max(0.0, every - (time.monotonic() - started)))
        finally:
            before_last()

    def wait_ready(self) -> None:
        """The workers started meanwhile answer."""
        for worker in self.live():
            self.stack.workers.wait_ready(worker)

    def stopped_cleanly(self, timeout: float = 60) -> int:
        """SIGTERM-ed workers that finished their warm shutdown and exited 0 by themselves."""
        clean = 0
        for kill in self.kills:
            code = kill.victim.proc.proc.wait(timeout=timeout)
            assert WARM_SHUTDOWN in self.log(kill.victim), kill.victim.log(3000)
            clean += code == 0
        return clean

    def outcome(self) -> dict[str, int]:
        """What the workers' logs say the faults did (read once the broker is drained).

        * child SIGKILL: ``hits`` are the children that died holding a job (the parent logs
          ``WorkerLostError``); ``redelivered`` the tasks received more than once;
        * whole worker: ``held`` are the messages the victim had received and not finished when
          signalled; each was either ``finished_by_victim`` during its warm shutdown or
          ``handed_back`` (received again by another worker); ``unaccounted`` must be 0. A kill
          ``hits`` if it finished or handed back at least one task.
        """
        logs = {w.name: self.log(w) for w in self.stack.workers.started}
        deliveries: Counter[str] = Counter()
        for log in logs.values():
            deliveries.update(RECEIVED.findall(log))
        out = Counter(
            hits=0, held=0, finished_by_victim=0, handed_back=0, unaccounted=0, redelivered=0
        )
        out["redelivered"] = sum(1 for n in deliveries.values() if n > 1)
        if self.fault == CHILD_SIGKILL:
            lost = sum(log.count(CHILD_LOST) for log in logs.values())
            out["hits"] = min(len(self.kills), lost)
            return dict(out)
        for kill in self.kills:
            log = logs[kill.victim.name]
            _, marker, after = log.partition(WARM_SHUTDOWN)
            done = set(DONE.findall(log))
            held = [t for t in dict.fromkeys(RECEIVED.findall(log)) if t not in done]
            finished = set(DONE.findall(after)) if marker else set()
            back = [t for t in held if deliveries[t] > 1]
            out["held"] += len(held) + len(finished)
            out["finished_by_victim"] += len(finished)
            out["handed_back"] += len(back)
            out["unaccounted"] += len(held) - len(back)
            out["hits"] += bool(back or finished)
        return dict(out)


def inject(
    st: Stack,
    fault: str,
    runner: threading.Thread,
    rows: Callable[[], list[Any]],
    tail: HeldTail | None = None,
) -> tuple[Chaos, float, float]:
    """Once a job runs, :data:`KILLS` faults while the requests are sent and the jobs run; then
    wait for the requests to be answered. ``tail``: the requests held until the last fault."""
    chaos = Chaos(fault, st)
    deadline = time.monotonic() + 60
    while not any(r.status == "running" for r in rows()):
        assert time.monotonic() < deadline, "no job ever ran"
        time.sleep(0.05)

    def done() -> bool:
        return not runner.is_alive() and all(r.status in FINAL for r in rows())

    start = time.monotonic()
    chaos.run(KILLS, KILL_EVERY, stop=done, before_last=tail.release if tail else lambda: None)
    end = time.monotonic()
    runner.join(timeout=180)
    assert not runner.is_alive(), "the requests were not all answered"
    return chaos, start, end


def assert_faults_landed(
    fault: str, chaos: Chaos, outcome: dict[str, int], clean: int | None
) -> None:
    kills = len(chaos.kills)
    assert kills == KILLS, f"only {kills} faults injected before the work ran out"
    # At least half the faults demonstrably hit work in flight.
    assert outcome["hits"] * 2 >= kills, (outcome, [k.busy for k in chaos.kills])
    if fault in (CHILD_SIGKILL, WORKER_SIGKILL):
        assert outcome["redelivered"] >= 1, "no killed task was delivered again"
    if fault != CHILD_SIGKILL:
        # Every message a killed or stopping worker held was finished by it or came back.
        assert outcome["unaccounted"] == 0, outcome
    if fault == WORKER_SIGTERM:
        assert clean == kills, f"{clean} of {kills} workers finished their warm shutdown"
