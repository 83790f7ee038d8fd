"""Section 11, a bulk redeploy against the same number of single deploys: N draft widgets
(``--bulk-widgets``, seeded) of a fresh organization deployed by one
``POST /widgets/deployments/bulk`` (``publication_status: draft``), and N others by N single
deploy messages (plain producer, the fastest single path); deploys/s of each, time from the
request until every deployment is final, and their ratio; the worker's CPU per widget in each,
and (with the floors section) its ratio to a raw PUT's client CPU at 32 in flight."""

from __future__ import annotations

import datetime as dt
import time
import uuid

from bench import fixtures, procstat, seed
from bench.report import SectionResult
from bench.sections import Context
from bench.stats import Figure, ratio


def run(ctx: Context) -> SectionResult:
    n = ctx.opts.bulk_widgets
    res = SectionResult("bulk", f"bulk redeploy vs single deploys ({n:,} widgets each)")
    rates = {"bulk": Figure(), "single": Figure()}
    worker_cpu = {"bulk": Figure(), "single": Figure()}
    failures = Figure()
    for rep in range(ctx.opts.repeat):
        for mode in rates:
            org = ctx.api.new_org(f"bench bulk {mode} {rep}")
            widgets = _seed(org.id, n, org.purposes)
            ctx.say(f"{n:,} deploys as {mode}, repetition {rep + 1}")
            cpu0 = ctx.cpu()
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
            used = procstat.cpu_delta(cpu0, ctx.cpu())
            if "worker" in used:
                worker_cpu[mode].add(used["worker"] * 1000 / n)
            failures.add(fixtures.final_counts(org.id)[1])
    res.add("bulk: deploys/s", rates["bulk"], "deploys/s")
    res.add("single deploys (plain producer): deploys/s", rates["single"], "deploys/s")
    res.add("bulk ÷ single deploys", ratio(rates["bulk"], rates["single"]), "x")
    put_cpu: Figure | None = ctx.shared.get("put_client_cpu")
    for mode, label in (("bulk", "bulk"), ("single", "single deploys")):
        res.add(f"{label}: worker CPU", worker_cpu[mode], "ms/widget")
        if put_cpu is not None:
            res.add(
                f"{label}: worker CPU ÷ raw PUT client CPU", ratio(worker_cpu[mode], put_cpu), "x"
            )
    res.add("failures", failures, "deploys")
    res.notes.append("widgets seeded as drafts selecting the organization's catalog")
    return res


def _seed(org_id: str, count: int, purposes: list[str]) -> list[str]:
    prefix = f"bulk-{uuid.uuid4().hex[:8]}-"
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    seed.insert_widgets(org_id, count, prefix=prefix, at=at, purposes=purposes)
    return [f"{prefix}{i}" for i in range(count)]
