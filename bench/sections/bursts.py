"""Section 8, bursts of one widget: 100 deploys of the same widget enqueued at once (plain
producer). S3 PUTs of its key (counted by the proxy), time until all are final, and whether
the file left on S3 is the newest deployment's snapshot."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bench import fixtures, seed
from bench.fixtures import Org
from bench.report import SectionResult
from bench.s3client import get_object_or_none, s3_client
from bench.sections import Context
from bench.stack import BUCKET
from bench.stats import Figure


def run(ctx: Context) -> SectionResult:
    count = ctx.opts.burst
    res = SectionResult("bursts", f"bursts of one widget ({count} deploys at once)")
    org = ctx.api.new_org("bench bursts")
    order = "sequence" if "sequence" in seed.columns("deployments") else "created_at"
    puts, heads, seconds, failures, matches = Figure(), Figure(), Figure(), Figure(), Figure()
    for rep in range(ctx.opts.repeat):
        (widget,) = ctx.api.create_widgets(org, 1)
        path = f"/{BUCKET}/{org.container_key(widget)}"
        puts0, heads0 = ctx.stack.proxy.count("PUT", path), ctx.stack.proxy.count("HEAD", path)
        done0, failed0 = fixtures.final_counts(org.id)
        ctx.say(f"{count} deploys of one widget, repetition {rep + 1}")
        t0 = time.monotonic()
        for _ in range(count):
            fixtures.send_deploy(org.id, widget)
        end = fixtures.wait_final(org.id, done0 + count, timeout=max(300.0, count * 3.0))
        seconds.add(end - t0)
        puts.add(ctx.stack.proxy.count("PUT", path) - puts0)
        heads.add(ctx.stack.proxy.count("HEAD", path) - heads0)
        failures.add(fixtures.final_counts(org.id)[1] - failed0)
        ok, why = _file_is_newest(org, widget, order)
        matches.add(1 if ok else 0)
        if not ok:
            res.notes.append(f"repetition {rep + 1}: {why}")
    res.add("S3 PUTs of the widget's key", puts, "PUTs")
    res.add("S3 HEADs of the widget's key", heads, "HEADs")
    res.add("time until all final", seconds, "s")
    res.add("failures", failures, "deploys")
    res.add("file = newest deployment's config", matches, "1 = yes")
    res.notes.append(
        f"newest deployment = highest '{order}'; compared without 'deployment_id'"
        + (" (no 'sequence' column in this schema)" if order != "sequence" else "")
    )
    if failures.median or min(matches.values, default=1) < 1:
        res.data["failures"] = True
    return res


def _file_is_newest(org: Org, widget: str, order: str) -> tuple[bool, str]:
    from sqlalchemy import text

    from worker.db import read_only_engine

    with read_only_engine().connect() as conn:
        row = conn.execute(
            text(
                f"select deployment_id, config from deployments where widget_id = :w"
                f" and config is not null order by case when {order} is null then 1 else 0 end,"
                f" {order} desc, created_at desc limit 1"
            ),
            {"w": widget},
        ).first()
    if row is None:
        return False, "no deployment with a config"
    config = json.loads(row[1]) if isinstance(row[1], str) else row[1]

    async def read() -> bytes | None:
        async with s3_client() as client:
            return await get_object_or_none(client, BUCKET, org.container_key(widget))

    data = asyncio.run(read())
    if data is None:
        return False, "no file on S3"
    published: dict[str, Any] = json.loads(data)
    a = {k: v for k, v in published.items() if k != "deployment_id"}
    b = {k: v for k, v in config.items() if k != "deployment_id"}
    if a == b:
        return True, ""
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return False, f"file differs from deployment {row[0]} in {differ}"
