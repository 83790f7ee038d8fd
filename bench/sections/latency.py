"""Section 3, latency at a fixed offered load (half of section 2's API throughput): from the
POST until the new file is readable on S3 with its new ``deployment_id``."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from bench import fixtures
from bench.fixtures import Org
from bench.report import SectionResult
from bench.s3client import get_object_or_none, s3_client
from bench.sections import Context
from bench.sections.deploys import post_deploys
from bench.stack import BUCKET
from bench.stats import Figure, percentile

POLL_SECONDS = 0.01
TIMEOUT_SECONDS = 120.0


def run(ctx: Context) -> SectionResult:
    opts = ctx.opts
    count = opts.latency_deploys or opts.n
    org = ctx.api.new_org("bench latency")
    rate = opts.rate or _half_throughput(ctx, org)
    res = SectionResult("latency", f"latency at {rate:.1f} deploys/s offered ({count} deploys)")
    p50, p95, p99, lost, achieved = Figure(), Figure(), Figure(), Figure(), Figure()
    for rep in range(opts.repeat):
        widgets = ctx.api.create_widgets(org, count)
        done0, _ = fixtures.final_counts(org.id)
        ctx.say(f"{count} deploys at {rate:.1f}/s, repetition {rep + 1}")
        latencies, missing, offered = asyncio.run(_open_loop(ctx, org, widgets, rate))
        # Readers see the file just before its row commits: let the last rows finish.
        fixtures.wait_final(org.id, done0 + count, timeout=TIMEOUT_SECONDS)
        p50.add(percentile(latencies, 50) * 1000)
        p95.add(percentile(latencies, 95) * 1000)
        p99.add(percentile(latencies, 99) * 1000)
        lost.add(missing)
        achieved.add(offered)
    res.add("offered load achieved", achieved, "deploys/s")
    res.add("POST -> readable on S3: p50", p50, "ms")
    res.add("POST -> readable on S3: p95", p95, "ms")
    res.add("POST -> readable on S3: p99", p99, "ms")
    res.add(f"not readable within {TIMEOUT_SECONDS:.0f}s", lost, "deploys")
    res.notes.append(
        "open loop (each deploy timed from its scheduled send); readers poll GET on the object"
        f" every {POLL_SECONDS * 1000:.0f} ms through the same S3 endpoint (each GET pays the"
        " S3 latency too)"
    )
    if lost.median:
        res.data["failures"] = True
    return res


def _half_throughput(ctx: Context, org: Org) -> float:
    rates: Figure | None = ctx.shared.get("deploy_rate", {}).get("API")
    if rates is not None and rates.values:
        return rates.median / 2
    # Section 2 did not run: one quick measurement of the API path instead.
    n = ctx.opts.n
    ctx.say(f"measuring API deploy throughput first ({n} deploys)")
    widgets = ctx.api.create_widgets(org, n)
    done0, _ = fixtures.final_counts(org.id)
    t0 = time.monotonic()
    asyncio.run(post_deploys(ctx, org, widgets, ctx.opts.clients))
    end = fixtures.wait_final(org.id, done0 + n, timeout=max(120.0, n * 2.0))
    return n / (end - t0) / 2


async def _open_loop(
    ctx: Context, org: Org, widgets: list[str], rate: float
) -> tuple[list[float], int, float]:
    headers, params = ctx.api.headers(org), {"organization_id": org.id}
    latencies: list[float] = []
    missing = 0
    async with (
        s3_client() as s3,
        httpx.AsyncClient(base_url=ctx.api.base_url, timeout=60) as http,
    ):

        async def one(widget: str, scheduled: float) -> None:
            nonlocal missing
            resp = await http.post(
                "/widgets/deployments", json={"widget_id": widget}, params=params, headers=headers
            )
            if resp.status_code != 202:
                raise RuntimeError(f"POST /widgets/deployments: {resp.status_code} {resp.text}")
            dep_id = resp.json()["deployment_id"]
            key = org.container_key(widget)
            while time.perf_counter() - scheduled < TIMEOUT_SECONDS:
                body = await get_object_or_none(s3, BUCKET, key)
                if body is not None and json.loads(body).get("deployment_id") == dep_id:
                    latencies.append(time.perf_counter() - scheduled)
                    return
                await asyncio.sleep(POLL_SECONDS)
            missing += 1

        start = time.perf_counter()
        tasks = []
        for i, widget in enumerate(widgets):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(widget, scheduled)))
        sent_for = time.perf_counter() - start
        offered = (len(widgets) - 1) / sent_for if len(widgets) > 1 and sent_for else rate
        await asyncio.gather(*tasks)
    return latencies, missing, offered
