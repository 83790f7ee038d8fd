"""``/health``: liveness and readiness (database and broker reachable)."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api_stub.deps import SettingsDep
from worker.db import read_only_engine

router = APIRouter(tags=["health"])
PROBE_TIMEOUT_SECONDS = 2.0


def _database() -> str:
    try:
        with read_only_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


def _broker(url: str) -> str:
    client = redis.Redis.from_url(
        url, socket_timeout=PROBE_TIMEOUT_SECONDS, socket_connect_timeout=PROBE_TIMEOUT_SECONDS
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"error: {type(exc).__name__}"
    finally:
        client.close()
    return "ok"


@router.get("/health")
def health(settings: SettingsDep, response: Response) -> dict[str, Any]:
    checks = {"database": _database(), "broker": _broker(str(settings.celery_broker_url))}
    healthy = all(v == "ok" for v in checks.values())
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        response.headers["Retry-After"] = "1"  # like every other 503 of the API
    return {"status": "ok" if healthy else "unavailable", "checks": checks}
