"""``/health``'s body, for the OpenAPI document (200 and 503 answer the same shape)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(
        description="Each backing service (`database`, `broker`): `ok` or `error: <reason>`"
    )
