"""Deploy throughput against a no-op Celery task on the same broker and worker.

    .venv/bin/python bench/deploy_throughput.py [--n 300] [--concurrency 2] [--postgres URL]

Starts its own Redis, moto S3 server and a `celery -A worker worker` subprocess, then times
(1) N no-op tasks (Celery's built-in `celery.accumulate`) and (2) N `widgets.deploy` jobs over
N/5 widgets, each to completion. Prints a table; the ratio is what to compare across runs,
since absolute numbers depend on the (shared, noisy) machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.processes import BIN_DIR, ManagedProcess, start_moto, start_redis  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--postgres", help="postgresql:// URL of an empty database to use")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    procs: list[ManagedProcess] = []
    try:
        redis_proc, broker = start_redis(tmp, ROOT, os.environ)
        procs.append(redis_proc)
        moto_proc, s3_url = start_moto(tmp, ROOT, os.environ)
        procs.append(moto_proc)
        os.environ.update(
            {
                "APP_ENV": "development",
                "DATABASE_URL": args.postgres or f"sqlite:///{tmp / 'bench.db'}",
                "CELERY_BROKER_URL": broker,
                "CELERY_RESULT_BACKEND": broker.rsplit("/", 1)[0] + "/1",
                "S3_ENDPOINT_URL": s3_url,
                "S3_BUCKET": "bench",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
            }
        )
        subprocess.run([str(BIN_DIR / "alembic"), "upgrade", "head"], cwd=ROOT, check=True)
        from sqlmodel import col, func, select

        from worker.celery import app
        from worker.db import unit_of_work
        from worker.models import Deployment, Organization, Widget
        from worker.s3 import get_store

        get_store().ensure_bucket()
        cmd = [str(BIN_DIR / "celery"), "-A", "worker", "worker", "-l", "WARNING"]
        cmd += ["--concurrency", str(args.concurrency)]
        procs.append(ManagedProcess("worker", cmd, os.environ, tmp, ROOT))
        app.control.ping(timeout=10)
        with unit_of_work() as s:
            org = Organization(name="bench")
            s.add(org)
            s.flush()
            widgets = [
                Widget(organization_id=org.id, name=f"w{i}") for i in range(max(1, args.n // 5))
            ]
            s.add_all(widgets)
            org_id, widget_ids = org.id, [w.id for w in widgets]

        start = time.perf_counter()
        results = [app.send_task("celery.accumulate", args=(i,)) for i in range(args.n)]
        for r in results:
            r.get(timeout=300)
        noop = time.perf_counter() - start

        dep_ids = [str(uuid.uuid4()) for _ in range(args.n)]
        start = time.perf_counter()
        for i, dep_id in enumerate(dep_ids):
            app.send_task(
                "widgets.deploy",
                queue="deployments",
                kwargs={
                    "organization_id": org_id,
                    "widget_id": widget_ids[i % len(widget_ids)],
                    "deployment_id": dep_id,
                },
            )
        done = 0
        while done < args.n:
            time.sleep(0.05)
            with unit_of_work() as s:
                done = s.exec(
                    select(func.count()).where(col(Deployment.status).in_(("success", "failure")))
                ).one()
        deploy = time.perf_counter() - start
        with unit_of_work() as s:
            failed = s.exec(select(func.count()).where(Deployment.status == "failure")).one()

        backend = "postgresql" if args.postgres else "sqlite"
        print(f"\n{args.n} tasks, prefork concurrency {args.concurrency}, {backend}, Redis broker")
        print(f"{'workload':<28}{'seconds':>10}{'tasks/s':>10}")
        print(f"{'no-op (celery.accumulate)':<28}{noop:>10.2f}{args.n / noop:>10.1f}")
        print(f"{'widgets.deploy':<28}{deploy:>10.2f}{args.n / deploy:>10.1f}")
        print(f"deploy / no-op throughput ratio: {noop / deploy:.2f}  (failures: {failed})")
        return 0
    finally:
        from worker.s3 import close_store

        close_store()
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    raise SystemExit(main())
