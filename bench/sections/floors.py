"""Section 1, floors: what the pipeline cannot beat on this machine and these services.

A Celery no-op round trip and throughput (same broker, worker with the project's settings),
raw S3 PUTs of a real published file's size through one reused aiobotocore client (sequential,
at the worker's concurrency, at 32 in flight), and one deployments-row transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

from bench import fixtures
from bench.report import SectionResult
from bench.s3client import get_object_or_none, s3_client
from bench.sections import Context
from bench.stack import BUCKET
from bench.stats import Figure, percentile

FALLBACK_BODY_SIZE = 4400


def run(ctx: Context) -> SectionResult:
    from worker.celery import app

    res = SectionResult("floors", "floors (no-op task, raw S3 PUT, one DB transaction)")
    opts = ctx.opts
    conc = fixtures.worker_concurrency()
    ctx.shared["worker_concurrency"] = conc
    size = _published_size(ctx)
    ctx.shared["body_size"] = size
    res.notes.append(f"worker pool max-concurrency {conc}; PUT body {size} bytes")

    ping, accumulate = Figure(), Figure()
    for rep in range(opts.repeat):
        ctx.say(f"celery round trips, repetition {rep + 1}")
        times = []
        for _ in range(opts.floor_pings):
            t0 = time.perf_counter()
            app.send_task("celery.accumulate", args=(1,)).get(timeout=30)
            times.append((time.perf_counter() - t0) * 1000)
        ping.add(percentile(times, 50))
        count = opts.n * 2
        t0 = time.perf_counter()
        results = [app.send_task("celery.accumulate", args=(i,)) for i in range(count)]
        for r in results:
            r.get(timeout=120)
        accumulate.add(count / (time.perf_counter() - t0))
    res.add("no-op task round trip p50 (celery.accumulate)", ping, "ms")
    res.add(f"celery.accumulate throughput ({opts.n * 2} tasks)", accumulate, "tasks/s")

    body = _body(size)
    modes = {"sequential": (1, opts.n), f"{conc} in flight": (conc, opts.n * 2)}
    modes["32 in flight"] = (32, max(opts.n * 3, 64))
    puts = asyncio.run(_put_floors(ctx, body, modes))
    ctx.shared["put_rate"] = {}
    for label, (rate, p50, p99, cpu) in puts.items():
        key = "worker concurrency" if label == f"{conc} in flight" else label
        ctx.shared["put_rate"][key] = rate
        res.add(f"S3 PUT {label}: rate", rate, "PUT/s")
        res.add(f"S3 PUT {label}: p50", p50, "ms")
        res.add(f"S3 PUT {label}: p99", p99, "ms")
        res.add(f"S3 PUT {label}: client CPU", cpu, "ms/PUT")
        if label == "32 in flight":
            ctx.shared["put_client_cpu"] = cpu

    db = Figure()
    for rep in range(opts.repeat):
        ctx.say(f"deployments-row transactions, repetition {rep + 1}")
        db.add(percentile(_row_transactions(ctx.shared["floor_org"], opts.n), 50))
    res.add("deployments row INSERT + COMMIT p50", db, "ms")
    return res


def _published_size(ctx: Context) -> int:
    """Deploy one realistic widget through the API and measure the published file."""
    org = ctx.api.new_org("bench floors")
    ctx.shared["floor_org"] = org.id
    (widget,) = ctx.api.create_widgets(org, 1)
    resp = ctx.api.http.post(
        "/widgets/deployments",
        json={"widget_id": widget},
        params={"organization_id": org.id},
        headers=ctx.api.headers(org),
    )
    if resp.status_code != 202:
        ctx.say(f"could not deploy a sample widget ({resp.status_code}); using 4.4 KB")
        return FALLBACK_BODY_SIZE
    try:
        fixtures.wait_final(org.id, 1, 60)
    except TimeoutError:
        return FALLBACK_BODY_SIZE

    async def read() -> bytes | None:
        async with s3_client() as client:
            return await get_object_or_none(client, BUCKET, org.container_key(widget))

    data = asyncio.run(read())
    return len(data) if data else FALLBACK_BODY_SIZE


def _body(size: int) -> bytes:
    chunk = b'{"k":"' + b"x" * max(0, size - 8) + b'"}'
    return chunk[:size]


async def _put_floors(
    ctx: Context, body: bytes, modes: dict[str, tuple[int, int]]
) -> dict[str, tuple[Figure, Figure, Figure, Figure]]:
    out = {label: (Figure(), Figure(), Figure(), Figure()) for label in modes}
    sha = hashlib.sha256(body).hexdigest()
    async with s3_client() as client:  # ONE client, reused for every PUT

        async def put(key: str, lat: list[float]) -> None:
            t0 = time.perf_counter()
            await client.put_object(
                Bucket=BUCKET,
                Key=key,
                Body=body,
                ContentType="application/json",
                CacheControl="public, max-age=60",
                Metadata={"deployment-id": str(uuid.uuid4()), "sha256": sha},
            )
            lat.append((time.perf_counter() - t0) * 1000)

        for i in range(8):  # warm the connection pool
            await put(f"configs/floor/containers/warm-{i}.json", [])
        for rep in range(ctx.opts.repeat):
            for label, (concurrency, count) in modes.items():
                ctx.say(f"S3 PUT floor {label} x{count}, repetition {rep + 1}")
                lat: list[float] = []
                sem = asyncio.Semaphore(concurrency)

                async def one(i: int, lat: list[float] = lat, sem: asyncio.Semaphore = sem) -> None:
                    async with sem:
                        await put(f"configs/floor/containers/{i}.json", lat)

                cpu0, t0 = time.process_time(), time.perf_counter()
                await asyncio.gather(*(one(i) for i in range(count)))
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                rate, p50, p99, cpu_fig = out[label]
                rate.add(count / wall)
                p50.add(percentile(lat, 50))
                p99.add(percentile(lat, 99))
                cpu_fig.add(cpu * 1000 / count)
    return out


def _row_transactions(org_id: str, count: int) -> list[float]:
    from worker.db import unit_of_work
    from worker.models import Deployment

    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with unit_of_work() as session:
            session.add(
                Deployment(organization_id=org_id, widget_id="floor-widget", status="success")
            )
        times.append((time.perf_counter() - t0) * 1000)
    return times
