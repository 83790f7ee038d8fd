"""Building blocks shared by the schemas: strict inputs, safe IDs, ISO 8601 UTC timestamps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, PlainSerializer, StringConstraints

from worker.ids import MAX_ID_LENGTH

T = TypeVar("T")


def iso_utc(value: datetime) -> str:
    """Always UTC, always microseconds: 2026-11-23T10:46:24.123456Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Timestamp = Annotated[datetime, PlainSerializer(iso_utc, return_type=str)]
SafeId = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", max_length=MAX_ID_LENGTH)
]
LanguageMap = dict[Annotated[str, StringConstraints(min_length=1, max_length=16)], str]
JsonObject = dict[str, Any]


class InputModel(BaseModel):
    """Request bodies: unknown fields are an error (400 naming the field), not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class OrgScopedInput(InputModel):
    """A create body may repeat the organization (as Didomi clients often do); it must match."""

    organization_id: SafeId | None = None


class OutputModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(BaseModel, Generic[T]):
    """Paginated list envelope used by /widgets, /metadata/purposes and /preferences."""

    total: int
    limit: int
    skip: int
    data: list[T]
