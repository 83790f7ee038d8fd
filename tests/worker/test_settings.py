"""Configuration: what each entry point requires, and the one-line errors when it is wrong."""

from __future__ import annotations

import base64
import os
import secrets
import string
import subprocess

import pytest
from pydantic import ValidationError

from tests.conftest import PROJECT_ROOT
from worker.processes import BIN_DIR
from worker.settings import Settings

SECRETS = ("SECRET_KEY", "ADMIN_TOKEN", "FLOWER_BASIC_AUTH", "APP_ENV")
# Strong enough for production (what docs/api.md tells operators to generate).
STRONG_KEY = secrets.token_urlsafe(32)
STRONG_TOKEN = secrets.token_urlsafe(32)


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
        (["celery", "-A", "worker", "worker"], {"SECRET_KEY": STRONG_KEY}),
        (["celery", "-A", "worker", "beat"], {"ADMIN_TOKEN": STRONG_TOKEN}),
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
    strong = {"SECRET_KEY": STRONG_KEY, "ADMIN_TOKEN": STRONG_TOKEN}
    result = subprocess.run(
        [str(BIN_DIR / cmd[0]), *cmd[1:]],
        cwd=PROJECT_ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k not in SECRETS and k != "DATABASE_URL"},
            "APP_ENV": "production",
            **strong,
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
        SECRET_KEY=STRONG_KEY,
        ADMIN_TOKEN=STRONG_TOKEN,
    )
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [
        "error: invalid configuration: DATABASE_URL must be set when APP_ENV=production"
    ], lines


def test_development_keeps_its_sqlite_default(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = Settings(app_env="development")
    assert settings.database_url == "sqlite:///var/widgets.db"


# -- production secrets: long, varied, and never the .env.example placeholder ------------------


def production(**values: str) -> Settings:
    """Production settings from explicit values (they win over the test environment's)."""
    base = {
        "app_env": "production",
        "database_url": "postgresql://widgets:db-pass@db/widgets",
        "secret_key": STRONG_KEY,
        "admin_token": STRONG_TOKEN,
    }
    return Settings(**{**base, **values})


def refusal(**values: str) -> str:
    with pytest.raises(ValidationError) as info:
        production(**values)
    [error] = info.value.errors()
    return str(error["msg"])


KEY_STYLES = {
    "openssl-rand-hex-32": lambda: secrets.token_hex(32),
    "openssl-rand-hex-16": lambda: secrets.token_hex(16),  # 32 characters, 128 bits
    "openssl-rand-base64-32": lambda: base64.b64encode(secrets.token_bytes(32)).decode(),
    "token-urlsafe-32": lambda: secrets.token_urlsafe(32),
    "passphrase": lambda: "correct horse battery staple galaxy orbit",
    "letters": lambda: string.ascii_letters[:32],
    "non-ascii-40-bytes": lambda: "àéîõüçñßøåæœèêëìíïðò",  # 20 characters, 40 bytes of UTF-8
}


@pytest.mark.parametrize("make", KEY_STYLES.values(), ids=KEY_STYLES.keys())
def test_production_accepts_keys_made_the_usual_ways(make):
    production(secret_key=make())


def test_production_accepts_every_openssl_hex_key_whatever_digits_it_happens_to_lack():
    """The old rule (16 distinct characters) refused ~23 % of ``openssl rand -hex 32``: a
    64-character hex string often lacks one of the 16 digits, yet holds 256 bits."""
    from worker.secret_strength import is_strong
    from worker.settings import SECRET_MIN_BITS

    keys = [secrets.token_hex(32) for _ in range(5000)]
    assert sum(len(set(k)) < 16 for k in keys) > 500  # the old rule's refusals are in there
    assert all(is_strong(k, SECRET_MIN_BITS) for k in keys)


def test_production_accepts_an_admin_token_at_the_documented_minimum():
    production(admin_token=secrets.token_urlsafe(18))  # 24 characters, 144 bits


@pytest.mark.parametrize(
    "weak",
    [
        pytest.param(string.ascii_letters[:31], id="31-bytes"),
        pytest.param("k" * 64, id="one-character-repeated"),
        pytest.param("0123456789abcdef" * 2, id="a-repeated-hex-block"),
        pytest.param("password" * 4, id="a-repeated-word"),
        pytest.param("a" * 63 + "b", id="almost-one-character"),
        pytest.param("àéîõüçñßø", id="9-characters-18-bytes"),
    ],
)
def test_production_refuses_a_short_or_non_random_secret_key(weak):
    msg = refusal(secret_key=weak)
    assert "SECRET_KEY is too weak for APP_ENV=production" in msg, msg
    assert "32 bytes" in msg and "128 bits" in msg and "openssl rand -hex 32" in msg
    assert "ADMIN_TOKEN" not in msg
    assert weak not in msg  # a secret is never echoed into a log


@pytest.mark.parametrize(
    "weak",
    [
        pytest.param(string.ascii_letters[:23], id="23-characters"),
        pytest.param("abcdefghijk" * 3, id="a-repeated-block"),
        pytest.param("t" * 40, id="one-character-repeated"),
    ],
)
def test_production_refuses_a_short_or_non_random_admin_token(weak):
    msg = refusal(admin_token=weak)
    assert "ADMIN_TOKEN is too weak for APP_ENV=production" in msg, msg
    assert "24 characters" in msg and "128 bits" in msg
    assert "SECRET_KEY" not in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("secret_key", "change-me-a-long-random-string-of-32-or-more-characters"),
        ("admin_token", "change-me-admin-token"),
        ("admin_token", STRONG_TOKEN + "-CHANGE-ME"),
        ("database_url", "postgresql://widgets:change-me-db-password@postgres:5432/widgets"),
        ("aws_secret_access_key", "change-me-s3-secret"),
        ("flower_basic_auth", "ops:change-me-flower-password"),
    ],
)
def test_production_refuses_any_value_left_at_the_env_example_placeholder(field, value):
    msg = refusal(**{field: value})
    assert msg.startswith(f"Value error, {field.upper()} still contain")
    assert "'change-me'" in msg and "too weak" not in msg, msg  # one reason per variable


def test_every_production_problem_is_reported_in_one_line(monkeypatch):
    from worker.settings import ConfigurationError, get_settings

    for name in (*SECRETS, "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("ADMIN_TOKEN", "change-me-admin-token")
    monkeypatch.setenv("SECRET_KEY", "short")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError) as info:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("invalid configuration: DATABASE_URL must be set"), message
    assert "ADMIN_TOKEN still contain the .env.example placeholder 'change-me'" in message
    assert "SECRET_KEY is too weak" in message and "short" not in message


def test_development_accepts_any_secret():
    settings = Settings(
        app_env="development", secret_key="k", admin_token="change-me", database_url="sqlite://"
    )
    assert settings.signing_key == "k" and settings.admin_bearer == "change-me"


def test_a_production_process_with_a_weak_secret_refuses_to_start_in_one_line(tmp_path):
    result = run(
        [str(BIN_DIR / "celery"), "-A", "worker", "worker"],
        APP_ENV="production",
        DATABASE_URL=f"sqlite:///{tmp_path / 'w.db'}",
        SECRET_KEY=STRONG_KEY,
        ADMIN_TOKEN="admin",
    )
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "ADMIN_TOKEN is too weak for APP_ENV=production" in lines[0], lines
