"""Section 5, listing at scale (PostgreSQL): ``GET /widgets/deployments`` and
``/widgets/archived`` for one organization with 1,000 and then 100,000 rows, per query shape;
shapes that slow down more than 1.5x get their ``EXPLAIN (ANALYZE, BUFFERS)`` printed."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

from sqlalchemy import text

from bench import seed
from bench.fixtures import Org
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, percentile, ratio

SLOW_RATIO = 1.5
ROW_SECONDS = 30  # one row every 30 s of history
ROWS_PER_WIDGET = 10
ENDPOINTS = {"deployments": "/widgets/deployments", "archived": "/widgets/archived"}


def shapes(rows: int, widget_id: str, archived_id: str) -> dict[str, dict[str, dict[str, str]]]:
    common = {
        "first page": {},
        "$sort[created_at]=-1": {"$sort[created_at]": "-1"},
        "$sort[updated_at]=1": {"$sort[updated_at]": "1"},
        "$skip=90% of rows": {"$skip": str(int(rows * 0.9))},
    }
    return {
        "deployments": {**common, "widget_id=": {"widget_id": widget_id}},
        "archived": {**common, "widget_id=": {"widget_id": archived_id}},
    }


def run(ctx: Context) -> SectionResult:
    small, large = ctx.opts.listing_sizes
    res = SectionResult("listing", f"listing at scale ({small:,} vs {large:,} rows)")
    if ctx.stack.backend != "postgresql":
        res.status = "skipped"
        res.notes.append("skipped (SQLite)")
        return res
    org = ctx.api.new_org("bench listing", catalog=False)
    salt = uuid.uuid4().hex[:8]
    base = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=large * ROW_SECONDS + 86400)
    config = _sample_config(org)
    figures: dict[tuple[str, str, int], Figure] = {}
    widget_id = f"lw{salt}-{(small // 2) // ROWS_PER_WIDGET}"
    archived_id = f"la{salt}-{small // 2}"
    seeded = 0
    sql_shapes: dict[int, dict[str, dict[str, dict[str, str]]]] = {}
    for rows in (small, large):
        ctx.say(f"seeding {rows - seeded:,} rows into deployments and archived_widgets")
        t0 = time.monotonic()
        _seed(org, salt, base, config, seeded, rows - seeded)
        seeded = rows
        ctx.say(f"seeded in {time.monotonic() - t0:.1f}s")
        sql_shapes[rows] = shapes(rows, widget_id, archived_id)
        for rep in range(ctx.opts.repeat):
            ctx.say(f"{rows:,} rows: requests, repetition {rep + 1}")
            for table, table_shapes in sql_shapes[rows].items():
                for label, params in table_shapes.items():
                    p50 = _p50(ctx, org, ENDPOINTS[table], params, ctx.opts.listing_requests)
                    figures.setdefault((table, label, rows), Figure()).add(p50)
    slow: list[tuple[str, str, dict[str, str]]] = []
    for table, table_shapes in sql_shapes[large].items():
        for label, params in table_shapes.items():
            f_small, f_large = (
                figures[(table, label, small)],
                figures[(table, label, large)],
            )
            res.add(f"{table} {label}: p50 @{small:,}", f_small, "ms")
            res.add(f"{table} {label}: p50 @{large:,}", f_large, "ms")
            r = ratio(f_large, f_small)
            res.add(f"{table} {label}: {large:,} / {small:,}", r, "x")
            if r.median > SLOW_RATIO:
                slow.append((table, label, params))
    res.notes.append(
        f"p50 of {ctx.opts.listing_requests} sequential requests per shape and repetition;"
        f" {ROWS_PER_WIDGET} deployments per widget"
    )
    plans: dict[str, list[str]] = {}
    for table, label, params in slow:
        plan = _explain(org, table, params)
        plans[f"{table} {label}"] = plan
        res.notes.append(f"SLOW (> {SLOW_RATIO}x): {table} {label}; EXPLAIN ANALYZE:")
        res.notes.extend("    " + line for line in plan)
    if not slow:
        res.notes.append(f"no shape slows down more than {SLOW_RATIO}x")
    res.data["explain"] = plans
    return res


def _sample_config(org: Org) -> dict[str, Any]:
    from bench.fixtures import scalar

    raw = scalar("select config from deployments where config is not null limit 1")
    if isinstance(raw, str):
        raw = json.loads(raw)
    if isinstance(raw, dict):
        return raw
    return {"schema_version": 1, "organization_id": org.id, "widget": {"name": "x" * 4000}}


def _seed(
    org: Org, salt: str, base: dt.datetime, config: dict[str, Any], start: int, n: int
) -> None:
    from bench.fixtures import execute

    at = f"(:base + make_interval(secs => i * {ROW_SECONDS}))"
    widget = f"(CAST(:wprefix AS text) || (i / {ROWS_PER_WIDGET})::text)"
    dep = "md5(CAST(:salt AS text) || 'd' || i::text)"
    deployments = {
        "id": seed.new_id_sql(),
        "deployment_id": dep,
        "organization_id": ":org",
        "widget_id": widget,
        "config": f"jsonb_set(CAST(:config AS jsonb), '{{deployment_id}}', to_jsonb({dep}))",
        "status": "CASE WHEN i % 50 = 49 THEN 'failure' ELSE 'success' END",
        "error": "CASE WHEN i % 50 = 49 THEN 'S3 put failed: SlowDown (HTTP 503)' END",
        "attempts": "CASE WHEN i % 50 = 49 THEN 12 ELSE 1 END",
        "requeues": "0",
        "widget_version": f"1 + i % {ROWS_PER_WIDGET}",
        "sequence": f"1 + i % {ROWS_PER_WIDGET}",
        "s3_key": f"'configs/' || CAST(:api_key AS text) || '/containers/' || {widget} || '.json'",
        "checksum": "md5(CAST(:salt AS text) || 'c' || i::text) || md5(i::text)",
        "content_checksum": "md5(CAST(:salt AS text) || 'k' || i::text) || md5(i::text)",
        "live_deployment_id": dep,
        "enqueued_at": at,
        "started_at": f"{at} + interval '50 milliseconds'",
        "finished_at": f"{at} + interval '400 milliseconds'",
        "created_at": at,
        "updated_at": f"{at} + make_interval(secs => i % 97)",
    }
    params = {
        "org": org.id,
        "wprefix": f"lw{salt}-",
        "salt": salt,
        "config": json.dumps(config),
        "api_key": org.api_key,
        "base": base,
    }
    seed.insert_series("deployments", deployments, n, params, start=start, datetimes=("base",))
    archived = {
        "id": "CAST(:aprefix AS text) || i::text",
        "organization_id": ":org",
        "name": "'Archived widget ' || i::text",
        "format": "CASE WHEN i % 3 = 0 THEN 'hosted' ELSE 'embeddable' END",
        "template_id": "'sections'",
        "last_domain_used": "'www.example' || (i % 50)::text || '.com'",
        "widget_created_at": f"{at} - interval '30 days'",
        "created_at": at,
        "updated_at": f"{at} + make_interval(secs => i % 97)",
    }
    params = {"org": org.id, "aprefix": f"la{salt}-", "base": base}
    seed.insert_series("archived_widgets", archived, n, params, start=start, datetimes=("base",))
    for table in ("deployments", "archived_widgets"):
        execute(f"ANALYZE {table}")


def _p50(ctx: Context, org: Org, path: str, extra: dict[str, str], count: int) -> float:
    params = {"organization_id": org.id, **extra}
    headers = ctx.api.headers(org)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        resp = ctx.api.http.get(path, params=params, headers=headers)
        times.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path} {extra}: {resp.status_code} {resp.text[:300]}")
    return percentile(times, 50)


def _explain(org: Org, table: str, params: dict[str, str]) -> list[str]:
    """The statement the route runs, rebuilt with the API's own query helpers."""
    from sqlalchemy.dialects import postgresql
    from sqlmodel import select

    from worker.db import get_engine
    from worker.models import ArchivedWidget, Deployment

    try:
        from api_stub.query import apply_list_query, parse_list_query

        query = parse_list_query(list(params.items()), ("widget_id",))
        if table == "deployments":
            stmt: Any = select(Deployment).where(Deployment.organization_id == org.id)
            stmt = apply_list_query(stmt, Deployment, query)
        else:
            stmt = select(ArchivedWidget).where(ArchivedWidget.organization_id == org.id)
            stmt = apply_list_query(stmt, ArchivedWidget, query, {"widget_id": "id"})
        pg: Any = postgresql.dialect()  # type: ignore[no-untyped-call]
        sql = str(stmt.compile(dialect=pg, compile_kwargs={"literal_binds": True}))
    except Exception as exc:
        return [f"(could not rebuild the route's statement: {exc})"]
    with get_engine().connect() as conn:
        rows = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")).all()
    return [sql.replace("\n", " "), *(r[0] for r in rows)]
