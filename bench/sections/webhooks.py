"""Section webhooks: what signed webhooks cost a deploy, and how soon they arrive.

N deploys of fresh widgets through a plain producer for an organization without endpoints, then
for one with one endpoint (``deployment.succeeded``) on a receiver on loopback; beat's
``widgets.dispatch_webhooks`` tick runs in this process every ``WEBHOOK_TICK_SECONDS`` (1 s),
as beat would. Figures: deploys/s of each and their ratio (the outbox's cost), and the latency
from each deployment's ``finished_at`` (the database's clock: this machine's) to its event's
arrival at the receiver, p50 and p99.
"""

from __future__ import annotations

import json
import threading
import time

from sqlalchemy import text

from bench import fixtures, procstat
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, ratio
from tests.support.webhook_receiver import Receiver, receiver


def _dispatching(stop: threading.Event, every: float) -> None:
    from worker.tasks.webhooks import dispatch_webhooks

    while not stop.wait(every):
        dispatch_webhooks()


def _finished_at(org_id: str) -> dict[str, float]:
    from worker.db import read_only_engine

    sql = text("select id, finished_at from deployments where organization_id = :org")
    with read_only_engine().connect() as conn:
        rows = conn.execute(sql, {"org": org_id}).all()
    out: dict[str, float] = {}
    for dep_id, finished in rows:
        if isinstance(finished, str):  # SQLite
            from datetime import UTC, datetime

            finished = datetime.fromisoformat(finished).replace(tzinfo=UTC)
        out[dep_id] = finished.timestamp()
    return out


def _latencies(hooks: Receiver, finished: dict[str, float]) -> list[float]:
    seen: dict[str, float] = {}
    for got in hooks.answered(204):
        dep_id = json.loads(got.body)["data"]["id"]
        seen.setdefault(dep_id, got.at)
    return [seen[d] - finished[d] for d in seen if d in finished]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def run(ctx: Context) -> SectionResult:
    from worker.settings import get_settings

    n = ctx.opts.n
    res = SectionResult("webhooks", f"webhooks ({n} deploys, one endpoint)")
    rates = {"without endpoints": Figure(), "one endpoint": Figure()}
    # CPU per deploy of each process group, deliveries included (waited for before the next).
    cpu: dict[str, dict[str, Figure]] = {label: {} for label in rates}
    p50, p99 = Figure(), Figure()
    stop = threading.Event()
    ticker = threading.Thread(
        target=_dispatching, args=(stop, get_settings().webhook_tick_seconds), daemon=True
    )
    ticker.start()
    try:
        with receiver() as hooks:
            plain = ctx.api.new_org("bench webhooks none")
            hooked = ctx.api.new_org("bench webhooks one")
            headers, params = ctx.api.headers(hooked), {"organization_id": hooked.id}
            body = {"url": hooks.url, "event_types": ["deployment.succeeded"]}
            created = ctx.api.http.post("/webhooks", json=body, params=params, headers=headers)
            if created.status_code != 201:
                raise RuntimeError(f"POST /webhooks: {created.status_code} {created.text}")
            for rep in range(ctx.opts.repeat):
                for label, org in (("without endpoints", plain), ("one endpoint", hooked)):
                    ctx.say(f"{n} deploys, {label}, repetition {rep + 1}")
                    widgets = ctx.api.create_widgets(org, n)
                    done0, _ = fixtures.final_counts(org.id)
                    cpu0 = ctx.cpu()
                    t0 = time.monotonic()
                    for widget in widgets:
                        fixtures.send_deploy(org.id, widget)
                    end = fixtures.wait_final(org.id, done0 + n, timeout=max(120.0, n * 2.0))
                    rates[label].add(n / (end - t0))
                    deadline = time.monotonic() + 60
                    expected = n * (rep + 1) if org is hooked else 0
                    while len(hooks.answered(204)) < expected and time.monotonic() < deadline:
                        time.sleep(0.1)
                    for group, seconds in procstat.cpu_delta(cpu0, ctx.cpu()).items():
                        cpu[label].setdefault(group, Figure()).add(seconds * 1000 / n)
            latencies = _latencies(hooks, _finished_at(hooked.id))
            for chunk_start in range(0, len(latencies), max(1, n)):
                chunk = latencies[chunk_start : chunk_start + n]
                if chunk:
                    p50.add(_percentile(chunk, 0.5))
                    p99.add(_percentile(chunk, 0.99))
            missing = n * ctx.opts.repeat - len(latencies)
    finally:
        stop.set()
        ticker.join(timeout=10)
    for label, fig in rates.items():
        res.add(f"deploys/s, {label}", fig, "deploys/s")
    res.add(
        "deploys/s with one endpoint ÷ without",
        ratio(rates["one endpoint"], rates["without endpoints"]),
        "x",
    )
    for label, groups in cpu.items():
        for group, fig in groups.items():
            res.add(f"CPU {group}, {label} (deliveries included)", fig, "ms/deploy")
    res.add("delivery latency after deployment.succeeded, p50", p50, "ms")
    res.add("delivery latency after deployment.succeeded, p99", p99, "ms")
    res.notes.append(
        f"producer path; dispatch tick every {get_settings().webhook_tick_seconds:g} s in the"
        f" bench process (as beat); events not delivered within 60 s: {missing}"
    )
    return res
