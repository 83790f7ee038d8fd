"""Command-line options; ``--quick`` swaps in tiny sizes for a CI smoke run."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SECTIONS = (
    "floors",
    "deploys",
    "latency",
    "api",
    "listing",
    "cleanup",
    "soak",
    "bursts",
    "statements",
    "catalog",
    "bulk",
    "webhooks",
)
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass
class Options:
    n: int = 300
    repeat: int = 3
    only: tuple[str, ...] = SECTIONS
    quick: bool = False
    postgres: str | None = None
    s3_latency_ms: float = 0.0
    json_path: Path = DEFAULT_JSON
    keep_logs: bool = False
    clients: int = 16  # concurrent HTTP clients sending deploys (section 2)
    api_clients: int = 32  # section 4
    api_requests: int = 1000  # per repetition and endpoint (section 4)
    rate: float | None = None  # offered load of section 3 (default: half of section 2's)
    latency_deploys: int | None = None  # per repetition (default: --n)
    listing_sizes: tuple[int, int] = (1_000, 100_000)
    listing_requests: int = 20
    cleanup_drafts: int = 10_000
    soak: tuple[int, int] = (1_000, 10_000)
    soak_pool: int = 500
    soak_repeat: int = 1
    soak_restart: bool = True  # a fresh worker for each soak run (not in --quick)
    burst: int = 100
    worker_args: tuple[str, ...] = ()  # e.g. ("--concurrency", "64")
    workers: int = 1  # worker processes (one per core: --workers 2)
    bulk_widgets: int = 10_000
    catalog_widgets: tuple[int, int] = (100_000, 10_000)  # widgets, of which embedding the item
    floor_pings: int = 200

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["json_path"] = str(self.json_path)
        out["postgres"] = bool(self.postgres)  # the URL is machine-specific
        return out


def _pair(raw: str) -> tuple[int, int]:
    a, b = (int(x.replace("_", "")) for x in raw.split(","))
    return a, b


def _sections(raw: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in raw.split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; known: {SECTIONS}")
    return names


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="./dev bench",
        description="The deploy pipeline against its floors, measured in one run.",
    )
    p.add_argument("--n", type=int, help="deploys per repetition (default 300; quick 10)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per figure (>= 3)")
    p.add_argument("--only", type=_sections, default=SECTIONS, help=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke, < 90 s)")
    p.add_argument("--postgres", metavar="URL", help="PostgreSQL server to create a database in")
    p.add_argument("--s3-latency-ms", type=float, default=0.0, help="delay per S3 request")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the figures")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    p.add_argument("--clients", type=int, default=16, help="HTTP clients sending deploys")
    p.add_argument("--api-clients", type=int, default=32, help="clients of the API section")
    p.add_argument("--api-requests", type=int, help="requests per endpoint and repetition")
    p.add_argument("--rate", type=float, help="offered deploys/s of the latency section")
    p.add_argument("--latency-deploys", type=int, help="deploys per latency repetition")
    p.add_argument("--listing-sizes", type=_pair, help="rows, e.g. 1000,100000")
    p.add_argument("--listing-requests", type=int, default=20, help="requests per list shape")
    p.add_argument(
        "--worker-args",
        default="",
        help="extra worker arguments, to compare with its defaults: "
        "--worker-args='--concurrency 64' (the prefork pool: WORKER_POOL=prefork ./dev bench)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes, e.g. one per core (default 1)"
    )
    p.add_argument("--bulk-widgets", type=int, help="widgets per bulk (default 10000; quick 30)")
    p.add_argument("--catalog-widgets", type=_pair, help="widgets,embedding (default 100000,10000)")
    p.add_argument("--cleanup-drafts", type=int, help="stale drafts (default 10000; quick 50)")
    p.add_argument("--soak", type=_pair, help="deploy checkpoints (default 1000,10000)")
    p.add_argument("--soak-pool", type=int, help="widgets the soak cycles through")
    p.add_argument("--soak-repeat", type=int, default=1, help="soak runs (each restarts it)")
    p.add_argument("--burst", type=int, help="deploys of one widget at once (default 100)")
    a = p.parse_args(argv)
    if a.repeat < 3:
        p.error("--repeat must be at least 3 (every figure is a median of >= 3 runs)")
    o = Options(
        repeat=a.repeat,
        only=a.only,
        quick=a.quick,
        postgres=a.postgres,
        s3_latency_ms=a.s3_latency_ms,
        json_path=a.json,
        keep_logs=a.keep_logs,
        clients=a.clients,
        api_clients=a.api_clients,
        rate=a.rate,
        listing_requests=a.listing_requests,
        soak_repeat=a.soak_repeat,
        worker_args=tuple(shlex.split(a.worker_args)),
        workers=a.workers,
    )
    if a.quick:
        o.n, o.api_requests, o.listing_sizes, o.cleanup_drafts = 10, 32, (100, 2_000), 50
        o.soak, o.soak_pool, o.burst, o.floor_pings = (50, 200), 50, 10, 10
        o.soak_restart = False
        o.latency_deploys = 6
        o.catalog_widgets = (2_000, 200)
        o.bulk_widgets = 30
    overridable = ("n", "api_requests", "listing_sizes", "cleanup_drafts", "soak", "burst")
    for name in (*overridable, "catalog_widgets", "bulk_widgets"):
        if getattr(a, name) is not None:
            setattr(o, name, getattr(a, name))
    if a.soak_pool is not None:
        o.soak_pool = a.soak_pool
    o.latency_deploys = a.latency_deploys or o.latency_deploys or o.n
    return o
