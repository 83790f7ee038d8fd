"""Operator commands: ``python -m worker.cli cleanup --dry-run``, ``redeploy`` and friends."""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy.exc import OperationalError

from worker import cli_redeploy, cli_status
from worker.settings import ConfigurationError, Settings, get_settings

DESCRIPTION = """\
Operator commands for the widget deployment worker: they act on the same database and broker
as the API and the workers (and celery beat, which runs cleanup and reconcile on a schedule).

environment (the same settings as the workers; see docs/configuration.md):
  APP_ENV            production (default: every secret required) or development
  DATABASE_URL       the database (default in development: sqlite:///var/widgets.db)
  CELERY_BROKER_URL  the Redis broker jobs are sent to
  S3_BUCKET, S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY  the object store
  DRAFT_RETENTION_DAYS  how long an unedited draft lives (cleanup)

exit status: 0 done, 2 bad arguments or configuration (redeploy and status: also 1; see their
--help)
"""
CLEANUP_DESCRIPTION = (
    "Archive draft widgets (never published) not edited for DRAFT_RETENTION_DAYS days and with "
    "no deployment in flight, through their archive jobs: what celery beat runs daily."
)
RECONCILE_DESCRIPTION = (
    "Re-send jobs accepted but never run (their message lost, or never sent while the broker "
    "was down), recover deployments stuck running, and give up jobs past their attempts: what "
    "celery beat runs every RECONCILE_SCHEDULE_SECONDS."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.cli",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    clean = sub.add_parser(
        "cleanup",
        help="archive drafts not edited for DRAFT_RETENTION_DAYS days",
        description=CLEANUP_DESCRIPTION,
    )
    clean.add_argument(
        "--dry-run", action="store_true", help="list what would be archived (JSON lines)"
    )
    clean.add_argument("--days", type=int, help="retention in days (default: DRAFT_RETENTION_DAYS)")
    sub.add_parser(
        "reconcile",
        help="re-send lost jobs and recover stuck ones now",
        description=RECONCILE_DESCRIPTION,
    )
    cli_redeploy.add_parser(sub)
    cli_status.add_parsers(sub)
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        return _run(args, settings)
    except OperationalError as exc:
        # Most often a database nobody migrated (a fresh SQLite file): one line, not a traceback.
        print(
            f"error: the database at DATABASE_URL cannot be used ({exc.orig or exc}); run "
            "`alembic upgrade head` against it, or use the export line `./dev serve` prints",
            file=sys.stderr,
        )
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "redeploy":
        return cli_redeploy.run(args)
    if args.command == "status":
        return cli_status.run_status(args)
    if args.command == "deployments":
        return cli_status.run_tail(args)
    if args.command == "cleanup":
        days = args.days or settings.draft_retention_days
        if args.dry_run:
            from worker.services.cleanup import find_stale_drafts

            rows = find_stale_drafts(days, limit=10_000)
            for w in rows:
                print(
                    json.dumps(
                        {
                            "organization_id": w.organization_id,
                            "widget_id": w.id,
                            "name": w.name,
                            "updated_at": w.updated_at.isoformat(),
                        }
                    )
                )
            print(f"{len(rows)} draft widget(s) not edited for {days} days would be archived")
            return 0
        from worker.services.cleanup import archive_stale_drafts
        from worker.tasks.maintenance import send_archives

        report = archive_stale_drafts(
            days, settings.cleanup_batch_size, on_batch_committed=send_archives
        )
        print(f"{len(report.archived)} draft widget(s) archived")
        return 0

    from worker.tasks.maintenance import reconcile_and_resend

    # The same path as beat's widgets.reconcile: the broker is read first, so a lost job is
    # found even behind a backlog.
    rec = reconcile_and_resend()
    picked = len(rec.deployments) + len(rec.archives) + len(rec.bulks)
    print(
        f"re-sent {picked - len(rec.unsent)} job(s) of {picked} found lost or stuck "
        f"({len(rec.deployments)} deployment(s), {len(rec.archives)} archive job(s), "
        f"{len(rec.bulks)} bulk job(s); the broker did not take {len(rec.unsent)}: the next run "
        f"sends them); {len(rec.failed)} given up; {len(rec.give_up)} frozen deployment(s) "
        "given up after an S3 check"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
