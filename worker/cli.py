"""Operator commands: ``python -m worker.cli cleanup --dry-run``, ``redeploy`` and friends."""

from __future__ import annotations

import argparse
import json
import sys

from worker import cli_redeploy
from worker.settings import ConfigurationError, get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser("cleanup", help="archive draft widgets not edited for the retention")
    clean.add_argument("--dry-run", action="store_true", help="list what would be archived")
    clean.add_argument("--days", type=int, help="override DRAFT_RETENTION_DAYS")
    sub.add_parser("reconcile", help="re-send lost jobs and recover stuck ones now")
    cli_redeploy.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "redeploy":
        return cli_redeploy.run(args)
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
