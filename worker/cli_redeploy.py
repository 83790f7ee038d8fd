"""``python -m worker.cli redeploy``: a bulk redeploy from a shell, with a live progress bar.

The job is committed first, then sent. If the broker does not take the message the job is not
lost: it stays ``ready`` and the reconciler (``widgets.reconcile``, run by celery beat) sends it
once the broker answers, within :func:`resend_bound` seconds; the command says so and keeps
following the job. Exit status: 0 when every deployment succeeded, 1 when the job ended
``failure`` (a deployment failed, or the fan-out was given up), 2 for bad arguments, 3 when
``--timeout`` passed first.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlmodel import col, select

from worker.db import unit_of_work
from worker.ids import is_safe_id
from worker.models import CREATED_BY_ADMIN, BulkJob, Organization, Widget
from worker.services import bulk, reconcile
from worker.settings import get_settings

POLL_SECONDS = 0.5
EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 1, 2, 3


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "redeploy",
        help="redeploy many widgets and follow the progress",
        description=(
            "Create a bulk redeploy of one organization's widgets (those a selector names), send "
            "it, and follow it with a progress bar until every deployment is final."
        ),
        epilog=(
            f"exit status: 0 every deployment succeeded, {EXIT_FAILED} the job ended failure "
            f"(a deployment failed, or the fan-out was given up), {EXIT_USAGE} bad arguments, "
            f"{EXIT_TIMEOUT} --timeout passed first (the job goes on)"
        ),
    )
    p.add_argument("--organization", required=True, help="organization id")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--purpose", help="widgets whose live snapshot embeds this purpose")
    which.add_argument("--preference", help="widgets whose live snapshot embeds this preference")
    which.add_argument(
        "--unpublished", action="store_true", help="widgets with unpublished changes"
    )
    which.add_argument("--widget", nargs="+", help="these widgets")
    p.add_argument("--reason", help="recorded on the bulk job and its deployments")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600,
        help="seconds to follow the job (default: %(default)g)",
    )


def _selector(args: argparse.Namespace) -> dict[str, object]:
    if args.purpose:
        return {"purpose_id": args.purpose}
    if args.preference:
        return {"preference_id": args.preference}
    if args.unpublished:
        return {"publication_status": "unpublished_changes"}
    return {"widget_ids": list(args.widget)}


def _problem(args: argparse.Namespace, selector: dict[str, object]) -> str | None:
    ids = [args.organization, args.purpose, args.preference, *(args.widget or [])]
    if not all(is_safe_id(i) for i in ids if i is not None):
        return "ids must be 1-64 characters of [A-Za-z0-9_-]"
    with unit_of_work() as s:
        if s.get(Organization, args.organization) is None:
            return f"unknown organization {args.organization}"
        if args.widget:
            found = set(
                s.exec(
                    select(Widget.id).where(
                        Widget.organization_id == args.organization,
                        col(Widget.id).in_(args.widget),
                        col(Widget.archived_at).is_(None),
                    )
                ).all()
            )
            missing = sorted(set(args.widget) - found)
            if missing:
                return f"widget(s) not found in this organization: {', '.join(missing)}"
    return None


def resend_bound() -> float:
    """Seconds, once the broker answers, before the reconciler sends a job whose send failed:
    its next run (every ``RECONCILE_SCHEDULE_SECONDS``) after the job is ``RESEND_AFTER`` old."""
    return get_settings().reconcile_schedule_seconds + reconcile.RESEND_AFTER


def run(args: argparse.Namespace) -> int:
    from worker.producer import send_bulk

    selector = _selector(args)
    problem = _problem(args, selector)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    with unit_of_work() as s:
        job_id = bulk.create(s, args.organization, selector, CREATED_BY_ADMIN, args.reason).id
    print(f"bulk job {job_id}")
    if not send_bulk(args.organization, job_id):
        print(
            f"warning: the broker did not take the job (unreachable); it is saved, and the "
            f"reconciler (widgets.reconcile, run by celery beat) sends it within "
            f"{resend_bound():.0f}s of the broker answering again. Waiting for it.",
            file=sys.stderr,
        )
    deadline = time.monotonic() + args.timeout
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ok {task.fields[success]}  failed {task.fields[failure]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("fanning out", total=None, success=0, failure=0)
        while True:
            with unit_of_work() as s:
                job = s.get(BulkJob, job_id)
                assert job is not None
                state = bulk.progress(s, job)
            fanned = job.fanned_out_at is not None
            waiting = state.status == "ready"  # not started: no worker took it yet
            bar.update(
                task,
                description="redeploying" if fanned else "waiting" if waiting else "fanning out",
                total=state.total if fanned else None,
                completed=state.success + state.failure,
                success=state.success,
                failure=state.failure,
            )
            if state.status in ("success", "failure"):
                break
            if time.monotonic() > deadline:
                print(f"error: not finished after {args.timeout:.0f}s", file=sys.stderr)
                return EXIT_TIMEOUT
            time.sleep(POLL_SECONDS)
    print(f"{state.status}: {state.success} succeeded, {state.failure} failed of {state.total}")
    if state.error is not None:
        print(f"error: the fan-out was given up: {state.error}", file=sys.stderr)
    return EXIT_FAILED if state.status == "failure" else 0
