"""``./dev bench [options]``: the deploy pipeline against its floors, measured in one run.

    ./dev bench --quick                                   # CI smoke: tiny sizes, SQLite
    ./dev bench --postgres postgresql://postgres@127.0.0.1:5432/postgres --s3-latency-ms 30
    ./dev bench --only floors,deploys --n 500 --repeat 5

Starts its own Redis, moto S3 behind a counting/latency proxy (``bench.latency_proxy``; all S3
traffic of the run goes through it), a database (SQLite in a temp dir, or a fresh database
created on ``--postgres`` and dropped at the end), the API and a worker with the project's
defaults. Sections (``--only``, all by default): floors, deploys, latency, api, listing
(PostgreSQL only), cleanup, soak, bursts, statements, catalog, bulk; see
``bench/sections/``. Every figure is the median of ``--repeat`` (>= 3) repetitions, shown with
min-max; ratios pair figures of the same run.

Prints one table and writes the same figures as JSON (``--json``, default
``bench/results/latest.json``) with the machine, the commit and the options. Everything it
starts is stopped by PID at the end, also on Ctrl-C and SIGTERM; the logs are kept (path
printed) when something failed or with ``--keep-logs``. Exit status 1 when a section failed or
a deploy ended in failure.
"""

from __future__ import annotations

import importlib
import signal
import sys
import time
import traceback
from types import FrameType

from bench import report
from bench.fixtures import Api
from bench.options import Options, parse
from bench.report import SectionResult
from bench.sections import Context
from bench.stack import Stack

TITLES = {
    "floors": "floors",
    "deploys": "deploys end to end",
    "latency": "latency at a fixed offered load",
    "api": "API",
    "listing": "listing at scale",
    "cleanup": "cleanup at scale",
    "soak": "soak",
    "bursts": "bursts of one widget",
    "statements": "statements per deploy",
    "catalog": "catalog edit at scale",
    "bulk": "bulk redeploy vs single deploys",
    "webhooks": "webhooks",
}


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _header(opts: Options, stack: Stack, info: dict[str, object]) -> str:
    latency = f"{opts.s3_latency_ms:g} ms" if opts.s3_latency_ms else "none"
    return (
        f"bench: {stack.backend}, S3 latency {latency}, n={opts.n}, repeat={opts.repeat}"
        f"{', quick' if opts.quick else ''}"
        f"{', worker ' + ' '.join(opts.worker_args) if opts.worker_args else ''}"
        f"{f', {opts.workers} workers' if opts.workers > 1 else ''}"
        f" | {info['cpu_count']} x {info['cpu_model']} | "
        f"commit {str(info['git_commit'])[:10]}{' (dirty)' if info['git_dirty'] else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    info = report.machine()
    started = time.monotonic()
    stack = Stack(opts.postgres, opts.s3_latency_ms, opts.worker_args, opts.workers)
    results: list[SectionResult] = []
    failed = False
    api: Api | None = None
    try:
        print(f"bench: starting services (logs in {stack.tmp})", flush=True)
        stack.start(bare_app="api" in opts.only)
        api = Api(stack.api_url)
        ctx = Context(opts, stack, api)
        for name in opts.only:
            print(f"bench: section {name}", flush=True)
            module = importlib.import_module(f"bench.sections.{name}")
            t0 = time.monotonic()
            try:
                result: SectionResult = module.run(ctx)
            except Exception as exc:
                failed = True
                traceback.print_exc()
                result = SectionResult(name, TITLES[name], status="error")
                result.notes.append(f"error: {type(exc).__name__}: {str(exc)[:300]}")
                _recover(stack)
            if result.data.get("failures"):
                failed = True
            result.data["seconds"] = round(time.monotonic() - t0, 1)
            results.append(result)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        failed = True
    except Exception:
        traceback.print_exc()
        failed = True
    finally:
        if api is not None:
            api.close()
        keep = opts.keep_logs or failed
        stack.stop(keep_logs=keep)
        if keep:
            print(f"bench: logs kept in {stack.tmp}", file=sys.stderr)
    header = _header(opts, stack, info)
    if results:
        print()
        print(report.table(results, header))
        context = {"backend": stack.backend, "seconds": round(time.monotonic() - started, 1)}
        report.write_json(opts.json_path, opts, info, results, context)
        print(f"\nfigures written to {opts.json_path}")
    return 1 if failed else 0


def _recover(stack: Stack) -> None:
    """After a failed section: make sure a worker is up again for the next one."""
    try:
        if stack.pid("worker") is None:
            stack.start_worker()
        from worker.celery import app

        app.control.add_consumer("deployments", reply=True, timeout=5, limit=1)
    except Exception as exc:
        print(f"bench: could not restore the worker: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
