"""Section 2, deploys end to end: N deploys of N fresh widgets through the API and through a
plain Celery producer, timed until every one is final; deploys/s against the PUT floors, CPU
per deploy per process group (/proc, whole process trees), failures; the worker's memory (all
its processes) idle and at its peak under that load."""

from __future__ import annotations

import asyncio
import time

import httpx

from bench import fixtures, procstat
from bench.fixtures import Org
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, ratio

PATHS = ("API", "producer")
MiB = 1024 * 1024


def run(ctx: Context) -> SectionResult:
    res = SectionResult("deploys", f"deploys end to end ({ctx.opts.n} distinct widgets)")
    n = ctx.opts.n
    orgs = {path: ctx.api.new_org(f"bench deploys {path}") for path in PATHS}
    rate = {path: Figure() for path in PATHS}
    cpu: dict[str, dict[str, Figure]] = {path: {} for path in PATHS}
    failures = {path: Figure() for path in PATHS}
    memory = {k: Figure() for k in ("idle RSS", "idle PSS", "peak RSS under load", "processes")}
    worker_pid = ctx.stack.pid("worker")
    for rep in range(ctx.opts.repeat):
        if worker_pid is not None:
            pids = procstat.tree(worker_pid)
            memory["idle RSS"].add(procstat.rss_bytes(pids) / MiB)
            memory["idle PSS"].add(procstat.pss_bytes(pids) / MiB)
            memory["processes"].add(len(pids))
        widgets = {path: ctx.api.create_widgets(orgs[path], n) for path in PATHS}
        for path in PATHS:
            ctx.say(f"{n} deploys via {path}, repetition {rep + 1}")
            org = orgs[path]
            done0, failed0 = fixtures.final_counts(org.id)
            cpu0 = ctx.cpu()
            t0 = time.monotonic()
            with procstat.PeakRss(lambda: ctx.stack.pid("worker")) as peak:
                if path == "API":
                    asyncio.run(post_deploys(ctx, org, widgets[path], ctx.opts.clients))
                else:
                    for widget in widgets[path]:
                        fixtures.send_deploy(org.id, widget)
                end = fixtures.wait_final(org.id, done0 + n, timeout=max(120.0, n * 2.0))
            memory["peak RSS under load"].add(peak.peak / MiB)
            used = procstat.cpu_delta(cpu0, ctx.cpu())
            rate[path].add(n / (end - t0))
            for group, seconds in used.items():
                cpu[path].setdefault(group, Figure()).add(seconds * 1000 / n)
            failures[path].add(fixtures.final_counts(org.id)[1] - failed0)
    ctx.shared["deploy_rate"] = rate
    floors: dict[str, Figure] = ctx.shared.get("put_rate", {})
    for path in PATHS:
        res.add(f"{path}: deploys/s", rate[path], "deploys/s")
        for label, floor in floors.items():
            res.add(f"{path}: deploys/s vs PUT floor, {label}", ratio(rate[path], floor), "x")
        for group, fig in cpu[path].items():
            res.add(f"{path}: CPU {group}", fig, "ms/deploy")
        if "postgres" not in cpu[path]:
            res.add(f"{path}: CPU database", None, "ms/deploy", "n/a (SQLite, in-process)")
        res.add(f"{path}: failures", failures[path], "deploys")
    for what, fig in memory.items():
        res.add(f"worker {what}", fig, "processes" if what == "processes" else "MiB")
    if not floors:
        res.notes.append("no PUT floors in this run (section floors not selected): no ratios")
    res.notes.append(
        f"API path: {ctx.opts.clients} concurrent HTTP clients; producer: send_task in a loop;"
        " time = first send until the last deployment is final (DB polled every 50 ms)"
    )
    if any(f.median for f in failures.values()):
        res.data["failures"] = True
    return res


async def post_deploys(ctx: Context, org: Org, widgets: list[str], clients: int) -> None:
    headers, params = ctx.api.headers(org), {"organization_id": org.id}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=ctx.api.base_url, timeout=120, limits=limits) as http:

        async def one(widget: str) -> None:
            resp = await http.post(
                "/widgets/deployments", json={"widget_id": widget}, params=params, headers=headers
            )
            if resp.status_code != 202:
                raise RuntimeError(f"POST /widgets/deployments: {resp.status_code} {resp.text}")

        await fixtures.bounded(clients, [one(w) for w in widgets])
