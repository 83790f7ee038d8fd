"""Didomi list queries: ``$limit``, ``$skip``, ``$sort[field]=1|-1`` and equality filters."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Query, Request
from pydantic import WithJsonSchema
from sqlalchemy import asc, desc
from sqlmodel import Session, SQLModel, col, func, select
from sqlmodel.sql.expression import SelectOfScalar

from api_stub.errors import bad_request
from api_stub.schemas.common import Page
from worker.ids import is_safe_id

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_SKIP = 2**63 - 1  # what a database OFFSET holds
# Plain ASCII digits, optionally negative (to say so): no sign '+', spaces, '_' or other digits.
_INTEGER = re.compile(r"-?[0-9]{1,20}", re.ASCII)
SORTABLE = ("created_at", "updated_at")
_SORT_PARAM = re.compile(r"\$sort\[([^\]]*)\]")
# Parameters every organization route takes; not filters.
_ROUTING_PARAMS = frozenset({"organization_id"})
M = TypeVar("M", bound=SQLModel)
T = TypeVar("T")


@dataclass(frozen=True)
class ListQuery:
    limit: int = DEFAULT_LIMIT
    skip: int = 0
    sort: tuple[tuple[str, int], ...] = ()
    filters: Mapping[str, str] = field(default_factory=dict)


def _non_negative_int(name: str, raw: str, maximum: int) -> int:
    if _INTEGER.fullmatch(raw) is None:
        raise bad_request(f"{name} must be an integer", {name: "not an integer"})
    value = int(raw)
    if value < 0:
        raise bad_request(f"{name} must not be negative", {name: "negative"})
    if value > maximum:
        raise bad_request(f"{name} must be at most {maximum}", {name: f"above {maximum}"})
    return value


def parse_list_query(params: Sequence[tuple[str, str]], filters: Sequence[str]) -> ListQuery:
    """Parse and validate; anything unknown is a 400 naming the parameter."""
    limit, skip = DEFAULT_LIMIT, 0
    sort: list[tuple[str, int]] = []
    found: dict[str, str] = {}
    for name, raw in params:
        if name == "$limit":
            limit = _non_negative_int(name, raw, MAX_LIMIT)
        elif name == "$skip":
            skip = _non_negative_int(name, raw, MAX_SKIP)
        elif m := _SORT_PARAM.fullmatch(name):
            key = m.group(1)
            if key not in SORTABLE:
                raise bad_request(
                    f"cannot sort on '{key}'; sortable fields: {', '.join(SORTABLE)}",
                    {name: "unknown sort field"},
                )
            if raw not in ("1", "-1"):
                raise bad_request(f"{name} must be 1 or -1", {name: "must be 1 or -1"})
            sort.append((key, int(raw)))
        elif name in filters:
            if not is_safe_id(raw):
                raise bad_request(f"{name} is not a valid id", {name: "invalid id"})
            found[name] = raw
        elif name not in _ROUTING_PARAMS:
            raise bad_request(f"unknown query parameter '{name}'", {name: "unknown parameter"})
    return ListQuery(limit=limit, skip=skip, sort=tuple(sort), filters=found)


_SORT_SCHEMA: dict[str, Any] = {"type": "integer", "enum": [1, -1]}
_LIST_PARAMETERS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "limit",
        "$limit",
        {"type": "integer", "minimum": 0, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
        f"Page size (at most {MAX_LIMIT})",
    ),
    (
        "skip",
        "$skip",
        {"type": "integer", "minimum": 0, "maximum": MAX_SKIP, "default": 0},
        "Items to skip",
    ),
    ("sort_created_at", "$sort[created_at]", _SORT_SCHEMA, "1: oldest first, -1: newest first"),
    ("sort_updated_at", "$sort[updated_at]", _SORT_SCHEMA, "1: oldest first, -1: newest first"),
]
_ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
    "maxLength": 64,
}


def list_query(*filters: str) -> Callable[..., ListQuery]:
    """A FastAPI dependency parsing the list query of a route with these equality filters.

    Its signature declares ``$limit``, ``$skip``, ``$sort[...]`` and the filters, so the OpenAPI
    documents them; the values are read from the request (``parse_list_query``).
    """

    def dependency(request: Request, **_: Any) -> ListQuery:
        return parse_list_query(list(request.query_params.multi_items()), filters)

    parameters = [
        inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)
    ]
    documented = [
        (
            name,
            Annotated[
                str | None, WithJsonSchema(schema), Query(alias=alias, description=description)
            ],
        )
        for name, alias, schema, description in _LIST_PARAMETERS
    ] + [
        (
            f"filter_{name}",
            Annotated[
                str | None,
                WithJsonSchema(_ID_SCHEMA),
                Query(alias=name, description=f"Only items of this {name}"),
            ],
        )
        for name in filters
    ]
    parameters += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None)
        for name, annotation in documented
    ]
    dependency.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return dependency


def apply_list_query(
    stmt: SelectOfScalar[M],
    model: type[M],
    query: ListQuery,
    columns: Mapping[str, str] | None = None,
) -> SelectOfScalar[M]:
    """Filter, sort and page ``stmt``; ``columns`` maps a filter name to another column."""
    for name, value in query.filters.items():
        stmt = stmt.where(col(getattr(model, (columns or {}).get(name, name))) == value)
    order: list[Any] = [
        (asc if direction == 1 else desc)(col(getattr(model, key))) for key, direction in query.sort
    ]
    # Default oldest first (creation order); the id tie-break keeps pages stable when
    # timestamps collide.
    created_at, ident = "created_at", "id"
    if not order:
        order.append(asc(col(getattr(model, created_at))))
    order.append(asc(col(getattr(model, ident))))
    return stmt.order_by(*order).offset(query.skip).limit(query.limit)


def count_of(stmt: SelectOfScalar[M]) -> SelectOfScalar[int]:
    return select(func.count()).select_from(stmt.order_by(None).subquery())


def fetch_page(
    session: Session,
    stmt: SelectOfScalar[M],
    model: type[M],
    query: ListQuery,
    convert: Callable[[Sequence[M]], list[T]],
) -> Page[T]:
    """The ``{total, limit, skip, data}`` envelope of a filtered, sorted, paged list."""
    total = session.exec(count_of(stmt)).one()
    rows = session.exec(apply_list_query(stmt, model, query)).all()
    return Page(total=total, limit=query.limit, skip=query.skip, data=convert(rows))
