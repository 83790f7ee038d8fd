"""Section 9, statements per deploy: what one deploy sends to the database, counted.

The deploy service runs in this process (the same code the worker runs) against the bench's
database and S3; the API's ``POST /widgets/deployments`` runs in this process too, through the
whole app (its edge included), on the same database. Counted with engine events
(:mod:`bench.statements`): reads and writes, with transactions apart. The widget is the bench's
realistic one (three purposes, two preferences with values).
"""

from __future__ import annotations

from typing import Any

from bench.report import SectionResult
from bench.sections import Context
from bench.statements import Statements, counting
from bench.stats import Figure


def run(ctx: Context) -> SectionResult:
    from fastapi.testclient import TestClient

    from api_stub.app import app
    from worker.db import api_engine, get_engine, unit_of_work
    from worker.models import Deployment, utcnow
    from worker.s3 import get_store
    from worker.services.deploy import run_deployment

    res = SectionResult("statements", "statements per deploy (counted)")
    org = ctx.api.new_org("bench statements")
    headers, params = ctx.api.headers(org), {"organization_id": org.id}

    def deploy(widget_id: str) -> Statements:
        dep = Deployment(organization_id=org.id, widget_id=widget_id, enqueued_at=utcnow())
        with unit_of_work() as session:
            session.add(dep)
        with counting(get_engine(), this_thread=True) as seen:
            done = run_deployment(org.id, widget_id, dep.deployment_id, store=get_store)
        if done.status != "success":
            raise RuntimeError(f"deploy {dep.deployment_id} ended {done}")
        return seen

    figures: dict[str, tuple[Figure, Figure]] = {}

    def add(kind: str, seen: Statements) -> None:
        count, transactions = figures.setdefault(kind, (Figure(), Figure()))
        count.add(seen.count)
        transactions.add(seen.begins)
        res.data.setdefault("breakdown", {})[kind] = seen.sent

    with TestClient(app) as http:
        for rep in range(ctx.opts.repeat):
            ctx.say(f"counting, repetition {rep + 1}")
            (widget,) = ctx.api.create_widgets(org, 1)
            add("first deploy", deploy(widget))
            resp = ctx.api.http.patch(
                f"/widgets/{widget}",
                json={"name": f"renamed {rep}"},
                params=params,
                headers=headers,
            )
            resp.raise_for_status()
            add("redeploy, new content", deploy(widget))
            add("redeploy, same content", deploy(widget))
            with counting(api_engine()) as seen:
                posted: Any = http.post(
                    "/widgets/deployments",
                    json={"widget_id": widget},
                    params=params,
                    headers=headers,
                )
            if posted.status_code != 202:
                raise RuntimeError(f"POST /widgets/deployments: {posted.text[:300]}")
            add("API POST /widgets/deployments", seen)
    for kind, (count, transactions) in figures.items():
        res.add(f"{kind}: statements", count, "statements")
        res.add(f"{kind}: transactions", transactions, "transactions")
    res.notes.append(
        "worker: the service in this process; API: the app in this process; "
        "BEGIN/COMMIT not counted as statements; breakdowns in the JSON"
    )
    return res
