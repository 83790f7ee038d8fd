"""Section 7, soak: resident memory of the worker's whole process tree after 1,000 and after
10,000 deploys (plain producer, a pool of widgets edited between rounds so every deploy
publishes new bytes), on a freshly started worker; growth between the two."""

from __future__ import annotations

import statistics
import time

from bench import fixtures, procstat
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure

MiB = 2**20


def run(ctx: Context) -> SectionResult:
    first, second = ctx.opts.soak
    pool_size = min(ctx.opts.soak_pool, first)
    runs = ctx.opts.soak_repeat
    fresh = "fresh worker" if ctx.opts.soak_restart else "worker not restarted (quick)"
    res = SectionResult("soak", f"soak ({first:,} then {second:,} deploys, {fresh})")
    org = ctx.api.new_org("bench soak")
    pool = ctx.api.create_widgets(org, pool_size)
    rss = {first: Figure(), second: Figure()}
    pss = {first: Figure(), second: Figure()}
    growth, pss_growth, rate, failures = Figure(), Figure(), Figure(), Figure()
    for run_no in range(runs):
        if ctx.opts.soak_restart:
            ctx.say(f"restarting the worker (soak run {run_no + 1} of {runs})")
            ctx.stack.restart_worker()
        done0, failed0 = fixtures.final_counts(org.id)
        sent, t0 = 0, time.monotonic()
        for checkpoint in (first, second):
            while sent < checkpoint:
                batch = pool[: min(len(pool), checkpoint - sent)]
                _edit(org.id)  # new content: every deploy below writes a new file
                for widget in batch:
                    fixtures.send_deploy(org.id, widget)
                sent += len(batch)
                fixtures.wait_final(org.id, done0 + sent, timeout=max(300.0, len(batch) * 2.0))
            pid = ctx.stack.pid("worker")
            assert pid is not None, "the worker died during the soak"
            ctx.say(f"{sent:,} deploys done; sampling the worker's memory")
            pids = procstat.tree(pid)
            rss[checkpoint].add(statistics.median(procstat.settled_rss(pid)) / MiB)
            pss[checkpoint].add(procstat.pss_bytes(pids) / MiB)
        rate.add(sent / (time.monotonic() - t0))
        failures.add(fixtures.final_counts(org.id)[1] - failed0)
        growth.add((rss[second].values[-1] / rss[first].values[-1] - 1) * 100)
        pss_growth.add((pss[second].values[-1] / pss[first].values[-1] - 1) * 100)
    res.add(f"worker RSS after {first:,} deploys", rss[first], "MiB")
    res.add(f"worker RSS after {second:,} deploys", rss[second], "MiB")
    res.add("RSS growth", growth, "%")
    res.add(f"worker PSS after {first:,} deploys", pss[first], "MiB")
    res.add(f"worker PSS after {second:,} deploys", pss[second], "MiB")
    res.add("PSS growth", pss_growth, "%")
    res.add("deploys/s over the soak", rate, "deploys/s")
    res.add("failures", failures, "deploys")
    res.notes.append(
        f"{runs} soak run(s) (--soak-repeat){'' if ctx.opts.soak_restart else ', no restart'};"
        " RSS = median of 3"
        f" samples 0.3 s apart, summed over the tree; PSS splits pages shared after fork;"
        f" {len(pool)} widgets cycled, each edited before every round"
    )
    if runs < 3:
        res.notes.append("fewer than 3 soak runs: min-max shows one value")
    if failures.median:
        res.data["failures"] = True
    return res


def _edit(org_id: str) -> None:
    """Bump every widget of the organization the way an edit does (new version, new name)."""
    fixtures.execute(
        "update widgets set version = version + 1,"
        " name = 'soak widget v' || CAST(version + 1 AS TEXT)"
        " where organization_id = :org",
        org=org_id,
    )
