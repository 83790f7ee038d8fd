"""Section 10, a catalog edit at scale: ``PATCH /metadata/purposes/{id}`` for an organization
with 100,000 widgets of which 10,000 embed the purpose (``--catalog-widgets``), latency per
request through the API. Each PATCH marks the 10,000 (one ``UPDATE widgets`` over the
snapshot refs, in the edit's transaction), so every request does the full work."""

from __future__ import annotations

import datetime as dt
import time
import uuid

from bench import seed
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, percentile

REQUESTS = 20  # per repetition; quick: 5


def run(ctx: Context) -> SectionResult:
    total, embedding = ctx.opts.catalog_widgets
    res = SectionResult(
        "catalog", f"catalog edit at scale ({total:,} widgets, {embedding:,} embedding it)"
    )
    org = ctx.api.new_org("bench catalog", catalog=False)
    headers, params = ctx.api.headers(org), {"organization_id": org.id}
    body = {"description": {"en": "Analytics"}, "metadata": {"category": "analytics"}}
    created = ctx.api.http.post("/metadata/purposes", json=body, params=params, headers=headers)
    created.raise_for_status()
    purpose = created.json()["id"]
    ctx.say(f"seeding {total:,} widgets, {embedding:,} with a snapshot embedding the purpose")
    t0 = time.monotonic()
    _seed(org.id, purpose, total, embedding)
    res.notes.append(f"seeded in {time.monotonic() - t0:.1f} s")
    requests = 5 if ctx.opts.quick else REQUESTS
    p50, p95, marked = Figure(), Figure(), Figure()
    for rep in range(ctx.opts.repeat):
        ctx.say(f"{requests} PATCHes, repetition {rep + 1}")
        times: list[float] = []
        for i in range(requests):
            edit = {"description": {"en": f"Analytics, edit {rep}.{i}"}}
            t = time.perf_counter()
            resp = ctx.api.http.patch(
                f"/metadata/purposes/{purpose}", json=edit, params=params, headers=headers
            )
            times.append((time.perf_counter() - t) * 1000)
            resp.raise_for_status()
            marked.add(resp.json()["affected_widgets"])
        p50.add(percentile(times, 50))
        p95.add(percentile(times, 95))
    res.add("PATCH /metadata/purposes/{id} p50", p50, "ms")
    res.add("PATCH /metadata/purposes/{id} p95", p95, "ms")
    res.add("widgets marked per PATCH", marked, "widgets")
    return res


def _seed(org_id: str, purpose: str, total: int, embedding: int) -> None:
    at = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    prefix = f"cat-{uuid.uuid4().hex[:8]}-"
    seed.insert_widgets(org_id, embedding, prefix=prefix, at=at, purposes=[purpose])
    seed.insert_widgets(org_id, total - embedding, prefix=prefix, at=at, start=embedding)
    # Their live snapshots (sequence 1) embed the purpose, as a freeze records it.
    is_pg = seed.dialect() == "postgresql"
    i_text = "i::text" if is_pg else "CAST(i AS TEXT)"
    prefix_text = "CAST(:prefix AS text)" if is_pg else ":prefix"
    refs = {
        "widget_id": f"{prefix_text} || {i_text}",
        "sequence": "1",
        "item_id": ":item",
        "organization_id": ":org",
    }
    params = {"prefix": prefix, "item": purpose, "org": org_id}
    seed.insert_series("snapshot_catalog_refs", refs, embedding, params)
