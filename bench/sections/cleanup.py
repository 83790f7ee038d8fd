"""Section 6, cleanup at scale: drafts not edited for more than ``DRAFT_RETENTION_DAYS``,
inserted in bulk, then ``widgets.cleanup_drafts`` (queue ``maintenance``) until none is left;
peak resident memory of the worker's process tree meanwhile."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from typing import Any

from bench import fixtures, procstat, seed
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure

POLL_SECONDS = 0.1


def run(ctx: Context) -> SectionResult:
    from worker.settings import get_settings

    count = ctx.opts.cleanup_drafts
    settings = get_settings()
    retention, period = settings.draft_retention_days, settings.reconcile_schedule_seconds
    res = SectionResult("cleanup", f"cleanup at scale ({count:,} stale drafts)")
    org = ctx.api.new_org("bench cleanup", catalog=False)
    figs = {k: Figure() for k in ("seconds", "rate", "peak", "sent", "failed", "reconciles")}
    for rep in range(ctx.opts.repeat):
        _insert_drafts(org.id, count, retention)
        ctx.say(f"{count:,} drafts, repetition {rep + 1}")
        with procstat.PeakRss(lambda: ctx.stack.pid("worker"), 0.2) as rss:
            t0 = time.monotonic()
            run = _Run(org.id, period)
            run.until_done(t0 + max(600.0, count * 0.3))
            elapsed = time.monotonic() - t0
        figs["seconds"].add(elapsed)
        figs["rate"].add(count / elapsed)
        figs["peak"].add(rss.peak / 2**20)
        figs["sent"].add(run.cleanups)
        figs["failed"].add(run.failed)
        figs["reconciles"].add(run.reconciles)
    res.add("time until no draft is left", figs["seconds"], "s")
    res.add("drafts removed per second", figs["rate"], "drafts/s")
    res.add("peak worker RSS (whole tree)", figs["peak"], "MiB")
    res.add("widgets.cleanup_drafts messages sent", figs["sent"], "tasks")
    res.add("widgets.cleanup_drafts runs that failed", figs["failed"], "tasks")
    res.add("widgets.reconcile runs (beat's schedule)", figs["reconciles"], "tasks")
    res.notes.append(
        f"drafts last edited {retention + 10} days ago (DRAFT_RETENTION_DAYS={retention});"
        " a new cleanup is sent when the previous one ended and drafts are still unmarked;"
        f" widgets.reconcile is sent every {period:g} s as beat would"
        " (RECONCILE_SCHEDULE_SECONDS)"
    )
    if any(figs["failed"].values):
        res.notes.append(
            "cleanup runs failed (see the worker log: e.g. the 45 s soft time limit): drafts"
            " they marked archived wait for the reconciler to send their archive jobs"
        )
    return res


class _Run:
    """One cleanup until no draft of the organization is left, with beat's reconciler."""

    def __init__(self, org_id: str, reconcile_period: float) -> None:
        self.org_id, self.period = org_id, reconcile_period
        self.cleanups = self.failed = self.reconciles = 0
        self.result = self._send("widgets.cleanup_drafts")
        self.cleanups += 1

    def _send(self, task: str) -> Any:
        from worker.celery import app

        return app.send_task(task, queue="maintenance")

    def _count(self, extra: str = "") -> int:
        sql = f"select count(*) from widgets where organization_id = :org{extra}"
        return int(fixtures.scalar(sql, org=self.org_id))

    def until_done(self, deadline: float) -> None:
        next_reconcile = time.monotonic() + self.period
        while (left := self._count()) > 0:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"{left} drafts left after the deadline")
            if now >= next_reconcile:
                self._send("widgets.reconcile")
                self.reconciles += 1
                next_reconcile = now + self.period
            # One cleanup run archives a bounded number of batches: send another once it
            # has ended while drafts are still waiting to be picked.
            if self.result is not None and self.result.ready():
                self.failed += bool(self.result.failed())
                self.result = None
            if self.result is None and self._count(" and archived_at is null"):
                self.result = self._send("widgets.cleanup_drafts")
                self.cleanups += 1
            time.sleep(POLL_SECONDS)


def _insert_drafts(org_id: str, count: int, retention: int) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=retention + 10)
    seed.insert_widgets(org_id, count, prefix=f"draft-{uuid.uuid4().hex[:8]}-", at=old)
