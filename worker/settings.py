"""Process configuration, read from the environment by pydantic-settings.

Nothing here runs at import time: call :func:`get_settings` (cached) where a value is needed,
so tests and the embedded stack can set the environment first.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AnyUrl, Field, RedisDsn, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.constants import LATE_WRITE_HORIZON_SECONDS
from worker.secret_strength import capacity_bits, is_strong

DEFAULT_SQLITE_PATH = Path("var") / "widgets.db"
DEV_SECRET_KEY = "dev-only-secret-key-never-use-in-production"  # noqa: S105 - accepted only when APP_ENV=development
DEV_ADMIN_TOKEN = "dev-admin-token"  # noqa: S105 - accepted only when APP_ENV=development

# What .env.example puts in every value that must be replaced: with APP_ENV=production, a
# setting that still contains it (any case) was copied, not chosen, and is refused.
PLACEHOLDER_MARKER = "change-me"
# Production secret rules (docs/api.md, "Tenancy and credentials"): long enough, and able to
# hold enough randomness for its encoding (worker.secret_strength): ``openssl rand -hex 32``,
# ``openssl rand -base64 32``, ``secrets.token_urlsafe(32)`` and a passphrase of six random words
# all pass.
SECRET_KEY_MIN_BYTES = 32  # UTF-8 bytes: the HMAC key that signs access tokens
ADMIN_TOKEN_MIN_CHARS = 24
SECRET_MIN_BITS = 128


def is_weak_secret(value: str, min_length: int, *, in_bytes: bool) -> bool:
    """Shorter than ``min_length`` (UTF-8 bytes or characters), or unable to hold
    :data:`SECRET_MIN_BITS` bits of randomness."""
    length = len(value.encode()) if in_bytes else len(value)
    return length < min_length or not is_strong(value, SECRET_MIN_BITS)


class DatabaseSettings(BaseSettings):
    """Just the database: all that ``alembic upgrade head`` needs (no secrets required)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    app_env: Literal["production", "development"] = "production"
    database_url: str = Field(default_factory=lambda: f"sqlite:///{DEFAULT_SQLITE_PATH}")

    @model_validator(mode="after")
    def _known_database(self) -> DatabaseSettings:
        if not self.database_url.startswith(("sqlite", "postgres")):
            raise ValueError("DATABASE_URL must be a sqlite:// or postgresql:// URL")
        return self

    @model_validator(mode="after")
    def _production_requirements(self) -> DatabaseSettings:
        if self.app_env == "production":
            problems = self._production_problems()
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def _production_problems(self) -> list[str]:
        """Everything wrong for production, each variable named once, in one message."""
        problems: list[str] = []
        missing = self._missing_in_production()
        if missing:
            problems.append(f"{', '.join(missing)} must be set when APP_ENV=production")
        placeholders = self._placeholders()
        if placeholders:
            problems.append(
                f"{', '.join(placeholders)} still contain the .env.example placeholder "
                f"{PLACEHOLDER_MARKER!r}: set real values when APP_ENV=production"
            )
        return problems + self._weak_in_production(skip=set(missing) | set(placeholders))

    def _missing_in_production(self) -> list[str]:
        # The SQLite default is a file of each container's own: processes would silently
        # disagree about every row. Production names its shared database explicitly.
        return [] if "database_url" in self.model_fields_set else ["DATABASE_URL"]

    def _placeholders(self) -> list[str]:
        """Settings (upper case) whose value contains :data:`PLACEHOLDER_MARKER`."""
        found = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            if text is not None and PLACEHOLDER_MARKER in str(text).lower():
                found.append(name.upper())
        return found

    def _weak_in_production(self, skip: set[str]) -> list[str]:
        """Problems of secrets too weak for production (those named in ``skip`` are already
        reported)."""
        return []

    @property
    def sqlalchemy_url(self) -> str:
        """DATABASE_URL with the driver SQLAlchemy should use (psycopg 3 for PostgreSQL)."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


class Settings(DatabaseSettings):
    """Every knob of the service; field names are the environment variables."""

    celery_broker_url: RedisDsn = RedisDsn("redis://127.0.0.1:6379/0")
    celery_result_backend: str | None = None

    s3_endpoint_url: AnyUrl | None = None
    s3_bucket: str = "widgets"
    aws_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    # Cache-Control of the production files (a CDN in front of the bucket): fresh for a minute,
    # then served stale for up to 5 more while the CDN revalidates in the background, and for a
    # day if the bucket errors. Preview files are always ``no-store`` (PREVIEW_CACHE_CONTROL).
    s3_cache_control: str = Field(
        default="public, max-age=60, stale-while-revalidate=300, stale-if-error=86400",
        min_length=1,
        max_length=256,
    )
    s3_max_attempts: int = Field(default=4, ge=1, le=20)
    s3_connect_timeout: float = Field(default=5.0, gt=0)
    s3_read_timeout: float = Field(default=20.0, gt=0)
    # Connections of a process's S3 client: the uploads one process can have in flight.
    s3_max_connections: int = Field(default=32, ge=1, le=1000)

    # How `celery -A worker worker` runs its tasks (its --pool and --concurrency override these).
    # "threads" (default): one process, WORKER_CONCURRENCY tasks on threads sharing one database
    # engine and one S3 client, with the time limits enforced by worker.pool; unset = 32 in
    # flight. "prefork": one process per task, unset = 4 per CPU core, at least 4 (more memory,
    # the worker's Python on every core). docs/operations.md compares them.
    worker_pool: Literal["threads", "prefork"] = "threads"
    worker_concurrency: int | None = Field(default=None, ge=1, le=256)

    draft_retention_days: int = Field(default=30, ge=1)
    cleanup_batch_size: int = Field(default=100, ge=1, le=10_000)
    # The draft cleanup runs daily at this hour (UTC), on a crontab: restarting beat never
    # pushes it back, and a run missed while beat was down is caught up when it starts again
    # (the schedule file remembers the last run).
    cleanup_crontab_hour: int = Field(default=3, ge=0, le=23)
    reconcile_schedule_seconds: float = Field(default=60, gt=0)
    # Beat's tick that sends the scheduled deployments now due (worker.services.schedule): a
    # scheduled deploy publishes within about this long of its publish_at.
    schedule_tick_seconds: float = Field(default=5, gt=0, le=60)
    # Webhooks (worker.services.webhook_delivery): beat's tick that sends the deliveries due;
    # one attempt's time budget (connect within WEBHOOK_CONNECT_TIMEOUT_SECONDS); the waits
    # between attempts (then ``failed``; ~27.6 h in all, each ±20 % jitter); how long the
    # previous secret still signs after a rotation.
    webhook_tick_seconds: float = Field(default=1, gt=0, le=60)
    webhook_timeout_seconds: float = Field(default=10, gt=0, le=30)
    webhook_connect_timeout_seconds: float = Field(default=3, gt=0, le=30)
    webhook_retry_schedule_seconds: list[float] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 36000], min_length=1, max_length=30
    )
    webhook_secret_overlap_seconds: float = Field(default=86400, ge=0)
    # Endpoints must be https on public addresses; true also allows http and private, loopback
    # and link-local addresses (the tests, the embedded stack). Unset: true in development only.
    webhook_allow_private_networks: bool | None = None
    # How long after a deployment failed, or a widget was archived, a write sent before it may
    # still reach S3: the task's hard time limit (the latest a write is sent) plus the 15 min
    # S3 accepts a signed request for, plus a margin. Past it, the file is checked once more
    # (worker.services.late_writes). Lower only for a store that enforces a shorter validity.
    late_write_horizon_seconds: float = Field(default=LATE_WRITE_HORIZON_SECONDS, ge=0)
    # Where celery beat keeps its schedule state (last run of each entry); put it on a volume.
    celery_beat_schedule_filename: str = "celerybeat-schedule"

    secret_key: SecretStr | None = None
    admin_token: SecretStr | None = None
    # Flower reads it itself; required to run Flower outside development (worker.celery).
    flower_basic_auth: SecretStr | None = None

    def _missing_in_production(self) -> list[str]:
        secrets = [
            name.upper() for name in ("secret_key", "admin_token") if getattr(self, name) is None
        ]
        return secrets + super()._missing_in_production()

    def _weak_in_production(self, skip: set[str]) -> list[str]:
        rules = (
            ("SECRET_KEY", self.secret_key, SECRET_KEY_MIN_BYTES, f"{SECRET_KEY_MIN_BYTES} bytes"),
            (
                "ADMIN_TOKEN",
                self.admin_token,
                ADMIN_TOKEN_MIN_CHARS,
                f"{ADMIN_TOKEN_MIN_CHARS} characters",
            ),
        )
        problems = []
        for name, secret, min_length, length_rule in rules:
            if secret is None or name in skip:
                continue
            value = secret.get_secret_value()
            if is_weak_secret(value, min_length, in_bytes=name == "SECRET_KEY"):
                problems.append(
                    f"{name} is too weak for APP_ENV=production: it needs at least {length_rule} "
                    f"and room for {SECRET_MIN_BITS} bits of randomness (this one: about "
                    f"{capacity_bits(value):.0f}; a repeated block counts once), e.g. the output "
                    "of openssl rand -hex 32, or of "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return problems + super()._weak_in_production(skip)

    @property
    def is_development(self) -> bool:
        return self.app_env == "development"

    @property
    def webhooks_may_reach_private_networks(self) -> bool:
        allowed = self.webhook_allow_private_networks
        return self.is_development if allowed is None else allowed

    @property
    def signing_key(self) -> str:
        """Key that signs session tokens (a fixed dev key only outside production)."""
        return self.secret_key.get_secret_value() if self.secret_key else DEV_SECRET_KEY

    @property
    def admin_bearer(self) -> str:
        return self.admin_token.get_secret_value() if self.admin_token else DEV_ADMIN_TOKEN


class ConfigurationError(RuntimeError):
    """Configuration is missing or invalid; the message is one line, fit for a start-up log."""


def _one_line(exc: ValidationError) -> ConfigurationError:
    problems = "; ".join(
        (f"{'.'.join(str(p) for p in err['loc']).upper()}: " if err["loc"] else "")
        + err["msg"].removeprefix("Value error, ")
        for err in exc.errors()
    )
    return ConfigurationError(f"invalid configuration: {problems}")


def get_database_settings() -> DatabaseSettings:
    try:
        return DatabaseSettings()
    except ValidationError as exc:
        raise _one_line(exc) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _one_line(exc) from None
