"""Configuration: what each entry point requires, and the one-line errors when it is wrong."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import PROJECT_ROOT
from worker.processes import BIN_DIR

SECRETS = ("SECRET_KEY", "ADMIN_TOKEN", "FLOWER_BASIC_AUTH", "APP_ENV")


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and k != "DATABASE_URL"}
    return subprocess.run(
        cmd, cwd=PROJECT_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_migrations_need_only_the_database_url(tmp_path):
    db = tmp_path / "only-db.sqlite"
    result = run([str(BIN_DIR / "alembic"), "upgrade", "head"], DATABASE_URL=f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    import sqlite3

    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"widgets", "deployments", "archived_widgets", "widget_assets"} <= tables


def test_migrations_reject_an_unknown_database_in_one_line():
    result = run([str(BIN_DIR / "alembic"), "upgrade", "head"], DATABASE_URL="mysql://x/y")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: invalid configuration: DATABASE_URL must be a sqlite:// or postgresql:// URL"
    ]


@pytest.mark.parametrize(
    ("cmd", "env"),
    [
        (["celery", "-A", "worker", "worker"], {}),
        (["celery", "-A", "worker", "worker"], {"SECRET_KEY": "k" * 40}),
        (["celery", "-A", "worker", "beat"], {"ADMIN_TOKEN": "t"}),
    ],
)
def test_production_processes_refuse_to_start_without_secrets(cmd, env):
    result = run([str(BIN_DIR / cmd[0]), *cmd[1:]], **env)
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "must be set when APP_ENV=production" in lines[0]
    for name in ("SECRET_KEY", "ADMIN_TOKEN"):
        assert (name in lines[0]) is (name not in env)


def test_cli_reports_bad_configuration_in_one_line():
    result = run(
        [str(BIN_DIR / "python"), "-m", "worker.cli", "cleanup", "--dry-run"],
        APP_ENV="development",
        DRAFT_RETENTION_DAYS="0",
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "DRAFT_RETENTION_DAYS" in lines[0], lines


@pytest.mark.parametrize(
    "cmd",
    [
        ["celery", "-A", "worker", "worker"],
        ["celery", "-A", "worker", "beat"],
        ["alembic", "upgrade", "head"],
        ["python", "-m", "worker.cli", "reconcile"],
    ],
)
def test_production_refuses_to_start_without_a_database_url(cmd, tmp_path):
    """Production on the SQLite default would give each container a database of its own."""
    secrets = {"SECRET_KEY": "s" * 40, "ADMIN_TOKEN": "t" * 40}
    result = subprocess.run(
        [str(BIN_DIR / cmd[0]), *cmd[1:]],
        cwd=PROJECT_ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k not in SECRETS and k != "DATABASE_URL"},
            "APP_ENV": "production",
            **secrets,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [
        "error: invalid configuration: DATABASE_URL must be set when APP_ENV=production"
    ], lines


def test_the_api_refuses_to_start_without_a_database_url():
    result = run(
        [str(BIN_DIR / "uvicorn"), "api_stub.app:app", "--port", "0", "--log-level", "warning"],
        APP_ENV="production",
        SECRET_KEY="s" * 40,
        ADMIN_TOKEN="t" * 40,
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [
        "error: invalid configuration: DATABASE_URL must be set when APP_ENV=production"
    ], lines


def test_development_keeps_its_sqlite_default(monkeypatch):
    from worker.settings import Settings

    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = Settings(app_env="development")
    assert settings.database_url == "sqlite:///var/widgets.db"
