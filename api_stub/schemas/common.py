"""Building blocks shared by the schemas: strict inputs, safe IDs, ISO 8601 UTC timestamps."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from worker.ids import MAX_ID_LENGTH

T = TypeVar("T")

# Limits of every request body (on top of api_stub.edge's byte limits).
MAX_JSON_DEPTH = 32  # objects and arrays nested in a body, the body itself included
MAX_METADATA_BYTES = 16 * 1024  # a ``metadata`` object, as compact UTF-8 JSON
MAX_COMPONENTS_BYTES = 128 * 1024  # a widget's ``components``
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def iso_utc(value: datetime) -> str:
    """Always UTC, always microseconds: 2026-11-23T10:46:24.123456Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Timestamp = Annotated[datetime, PlainSerializer(iso_utc, return_type=str)]
SAFE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
SafeId = Annotated[str, StringConstraints(pattern=SAFE_ID_PATTERN, max_length=MAX_ID_LENGTH)]
LanguageCode = Annotated[str, StringConstraints(min_length=1, max_length=16)]
LanguageMap = dict[LanguageCode, str]
JsonObject = dict[str, Any]


def _compact_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _at_most(limit: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def check(value: dict[str, Any]) -> dict[str, Any]:
        if _compact_size(value) > limit:
            raise PydanticCustomError(
                "json_too_large", "larger than {limit} bytes as JSON", {"limit": limit}
            )
        return value

    return check


# Free-form JSON objects of the request bodies, bounded (and, like every body value, finite,
# free of NUL characters and of lone surrogates, at most MAX_JSON_DEPTH deep: InputModel).
JsonMetadata = Annotated[dict[str, Any], AfterValidator(_at_most(MAX_METADATA_BYTES))]
JsonComponents = Annotated[dict[str, Any], AfterValidator(_at_most(MAX_COMPONENTS_BYTES))]


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def json_problems(document: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """What no stored or published JSON may hold, with where: nesting deeper than
    MAX_JSON_DEPTH, non-finite numbers (NaN, Infinity, 1e400), NUL characters (PostgreSQL
    refuses them) and lone surrogates (not encodable). Iterative: any depth is safe."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(document, (), 0)]
    while stack and len(problems) < 10:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth + 1 > MAX_JSON_DEPTH:
                problems.append((path, f"nested deeper than {MAX_JSON_DEPTH} levels"))
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and (problem := _text_problem(key)):
                    problems.append(((*path, key), f"key {problem}"))
                    continue
                stack.append((item, (*path, key), depth + 1))
        elif isinstance(value, str):
            if problem := _text_problem(value):
                problems.append((path, problem))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((path, "must be a finite number"))
    return problems


def _reject_null(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("not_null", "cannot be null")
    return value


def _without_null(schema: JsonSchemaValue) -> JsonSchemaValue:
    branches = schema.get("anyOf")
    if not isinstance(branches, list):
        return schema
    kept = [b for b in branches if b != {"type": "null"}]
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**kept[0], **rest} if len(kept) == 1 else {**rest, "anyOf": kept}


class _NotNull:
    """A field that may be omitted (PATCH: left unchanged) but is never null: ``null`` is a 400
    naming the field, and the schema does not say nullable."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_before_validator_function(_reject_null, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return _without_null(handler(schema))


NOT_NULL = _NotNull()


def _allows_null(schema: dict[str, Any]) -> bool:
    if schema.get("type") == "null":
        return True
    return any(_allows_null(b) for b in schema.get("anyOf", []) if isinstance(b, dict))


def document_input(schema: dict[str, Any]) -> None:
    # An omitted NOT_NULL field defaults to "unchanged", which JSON cannot say: no default.
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and not _allows_null(prop):
            del prop["default"]


class InputModel(BaseModel):
    """Request bodies: unknown fields are an error (400 naming the field), not silently dropped;
    every value JSON-safe (``json_problems``), each problem a 400 naming where it is."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=document_input)

    @model_validator(mode="before")
    @classmethod
    def _json_safe(cls, data: Any) -> Any:
        if isinstance(data, dict) and (problems := json_problems(data)):
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError("invalid_value", message),
                        loc=loc,
                        input=None,
                    )
                    for loc, message in problems
                ],
            )
        return data


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
