"""Section 4, API: ``POST /widgets/deployments`` requests/s and p99 from 32 concurrent clients,
against a bare endpoint run the same way (``bench/bare_app.py``) that only sends the message.

The worker stops consuming ``deployments`` meanwhile; the queue is purged afterwards and the
rows the API created are closed as failures, so nothing of this section reaches later ones.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from bench import fixtures
from bench.fixtures import Org
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, percentile, ratio

QUEUE = "deployments"


def run(ctx: Context) -> SectionResult:
    from worker.celery import app

    opts = ctx.opts
    res = SectionResult(
        "api", f"API: POST /widgets/deployments, {opts.api_clients} concurrent clients"
    )
    org = ctx.api.new_org("bench api")
    widgets = ctx.api.create_widgets(org, opts.api_clients)
    targets = {"API": (ctx.api.base_url, "/widgets/deployments")}
    # Started with the stack (in parallel with the API and the worker), else now.
    bare = ctx.stack.bare_url or ctx.stack.start_uvicorn("bare", "bench.bare_app:app")
    try:
        targets["bare (send only)"] = (bare, "/widgets/deployments")
        if "/auth/widgets/deployments" in httpx.get(bare + "/openapi.json").text:
            targets["bare + auth"] = (bare, "/auth/widgets/deployments")
        app.control.cancel_consumer(QUEUE, reply=True, timeout=5, limit=1)
        rps = {name: Figure() for name in targets}
        p99 = {name: Figure() for name in targets}
        errors = {name: Figure() for name in targets}
        for rep in range(opts.repeat):
            for name, (url, path) in targets.items():  # interleaved: drift hits all alike
                ctx.say(f"{opts.api_requests} requests to {name}, repetition {rep + 1}")
                rate, lat, bad = asyncio.run(
                    _load(ctx, org, widgets, url, path, opts.api_requests, opts.api_clients)
                )
                rps[name].add(rate)
                p99[name].add(percentile(lat, 99) * 1000)
                errors[name].add(bad)
    finally:
        purged = fixtures.purge_queue(QUEUE)
        fixtures.execute(
            "update deployments set status = 'failure', error = 'bench: message purged'"
            " where organization_id = :org and status = 'ready'",
            org=org.id,
        )
        app.control.add_consumer(QUEUE, reply=True, timeout=5, limit=1)
        ctx.stack.stop_process("bare")
    for name in targets:
        res.add(f"{name}: requests/s", rps[name], "req/s")
        res.add(f"{name}: p99", p99[name], "ms")
        if any(errors[name].values):
            res.add(f"{name}: errors (non-202 or dropped connection)", errors[name], "requests")
    for name in targets:
        if name != "API":
            res.add(f"API / {name}: requests/s", ratio(rps["API"], rps[name]), "x")
    res.notes.append(
        f"worker not consuming '{QUEUE}' during the section; {purged} messages purged after"
    )
    return res


async def _load(
    ctx: Context, org: Org, widgets: list[str], url: str, path: str, total: int, clients: int
) -> tuple[float, list[float], int]:
    headers, params = ctx.api.headers(org), {"organization_id": org.id}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    bad = 0
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def post(widget: str) -> None:
            nonlocal bad
            t0 = time.perf_counter()
            try:
                resp = await http.post(
                    path, json={"widget_id": widget}, params=params, headers=headers
                )
            except httpx.TransportError:  # a dropped connection is an error, not the end
                bad += 1
                return
            latencies.append(time.perf_counter() - t0)
            bad += resp.status_code != 202

        # Warm-up: every connection opened once; not counted.
        await asyncio.gather(*(post(widgets[i % len(widgets)]) for i in range(clients)))
        latencies.clear()
        bad = 0
        sent = 0

        async def client(index: int) -> None:
            nonlocal sent
            # One widget per client: no two clients queue on the same widget's row lock.
            while sent < total:
                sent += 1
                await post(widgets[index % len(widgets)])

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return total / elapsed, latencies, bad
