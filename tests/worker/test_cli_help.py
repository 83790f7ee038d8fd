"""``python -m worker.cli --help`` and each command's, and its first error: what an operator reads
first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT


def cli_help(*command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", *command, "--help"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "COLUMNS": "100"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_top_help_says_what_the_commands_act_on_and_the_environment_they_read():
    text = cli_help()
    assert text.index("Operator commands") < text.index("cleanup")  # description first
    for variable in ("APP_ENV", "DATABASE_URL", "CELERY_BROKER_URL", "S3_BUCKET"):
        assert variable in text, variable
    assert "archive drafts not edited for DRAFT_RETENTION_DAYS days" in text
    assert "for the retention\n" not in text  # the old line, cut mid-sentence


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("cleanup", ["DRAFT_RETENTION_DAYS", "--dry-run", "celery beat runs daily"]),
        ("reconcile", ["Re-send jobs accepted but never run", "RECONCILE_SCHEDULE_SECONDS"]),
        (
            "redeploy",
            ["exit status: 0", "1 the job ended failure", "3 --timeout", "(default: 3600)"],
        ),
    ],
)
def test_each_command_has_a_description(command: str, says: list[str]) -> None:
    text = " ".join(cli_help(command).split())  # argparse wraps lines: compare words
    for phrase in says:
        assert phrase in text, (command, phrase)


def test_a_database_nobody_migrated_is_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "APP_ENV": "development", "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "cleanup", "--dry-run"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "no such table" in out.stderr and "alembic upgrade head" in out.stderr
