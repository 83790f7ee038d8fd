"""Section 11, a bulk redeploy against the same number of single deploys: N draft widgets
(``--bulk-widgets``, seeded) of a fresh organization deployed by one
``POST /widgets/deployments/bulk`` (``publication_status: draft``), and N others by N single
deploy messages (plain producer, the fastest single path); deploys/s of each, time from the
request until every deployment is final, and their ratio."""

from __future__ import annotations

import datetime as dt
import time
import uuid

from bench import fixtures, seed
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, ratio


def run(ctx: Context) -> SectionResult:
    n = ctx.opts.bulk_widgets
    res = SectionResult("bulk", f"bulk redeploy vs single deploys ({n:,} widgets each)")
    rates = {"bulk": Figure(), "single": Figure()}
    failures = Figure()
    for rep in range(ctx.opts.repeat):
        for mode in rates:
            org = ctx.api.new_org(f"bench bulk {mode} {rep}")
            widgets = _seed(org.id, n, org.purposes)
            ctx.say(f"{n:,} deploys as {mode}, repetition {rep + 1}")
            t0 = time.monotonic()
            if mode == "bulk":
                headers, params = ctx.api.headers(org), {"organization_id": org.id}
                resp = ctx.api.http.post(
                    "/widgets/deployments/bulk",
                    json={"publication_status": "draft"},
                    params=params,
                    headers=headers,
                )
                if resp.status_code != 202:
                    raise RuntimeError(f"POST /widgets/deployments/bulk: {resp.text[:300]}")
            else:
                for widget in widgets:
                    fixtures.send_deploy(org.id, widget)
            end = fixtures.wait_final(org.id, n, timeout=max(300.0, n * 0.5))
            rates[mode].add(n / (end - t0))
            failures.add(fixtures.final_counts(org.id)[1])
    res.add("bulk: deploys/s", rates["bulk"], "deploys/s")
    res.add("single deploys (plain producer): deploys/s", rates["single"], "deploys/s")
    res.add("bulk ÷ single deploys", ratio(rates["bulk"], rates["single"]), "x")
    res.add("failures", failures, "deploys")
    res.notes.append("widgets seeded as drafts selecting the organization's catalog")
    return res


def _seed(org_id: str, count: int, purposes: list[str]) -> list[str]:
    prefix = f"bulk-{uuid.uuid4().hex[:8]}-"
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    seed.insert_widgets(org_id, count, prefix=prefix, at=at, purposes=purposes)
    return [f"{prefix}{i}" for i in range(count)]
