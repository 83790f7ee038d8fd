"""Alembic environment: the database comes from DATABASE_URL via the project's settings."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import worker.models  # noqa: F401 - registers every table on SQLModel.metadata
from worker.db import build_engine
from worker.settings import ConfigurationError, get_database_settings

target_metadata = SQLModel.metadata


def _database_url() -> str:
    try:
        return get_database_settings().sqlalchemy_url
    except ConfigurationError as exc:
        raise SystemExit(f"error: {exc}") from None  # one line, no traceback


def run_migrations_offline() -> None:
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = build_engine(_database_url())
    try:
        with engine.connect() as connection:
            # render_as_batch: SQLite can only ALTER tables by copying them.
            context.configure(
                connection=connection, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
