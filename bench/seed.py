"""Bulk rows in one SQL statement (``INSERT ... SELECT`` over a generated series).

The tables are inspected at run time: expressions are given for the columns we know, and
any other NOT NULL column without a server default (the schema may gain some) gets a neutral
value of its type, so seeding keeps working while the schema moves.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, inspect, text

from worker.models.types import UTCDateTime


def dialect() -> str:
    from worker.db import get_engine

    return get_engine().dialect.name


def columns(table: str) -> dict[str, dict[str, Any]]:
    from worker.db import get_engine

    return {c["name"]: dict(c) for c in inspect(get_engine()).get_columns(table)}


def json_param(name: str) -> str:
    return f"CAST(:{name} AS jsonb)" if dialect() == "postgresql" else f":{name}"


def new_id_sql() -> str:
    if dialect() == "postgresql":
        return "gen_random_uuid()::text"
    return "lower(hex(randomblob(16)))"


def _neutral(col: dict[str, Any], is_pg: bool) -> str:
    try:
        py = col["type"].python_type
    except NotImplementedError:
        py = str
    if py is bool:
        return "false" if is_pg else "0"
    if py in (int, float):
        return "0"
    if py in (dt.datetime, dt.date):
        return ":seed_now"
    if py in (dict, list):
        return "CAST('{}' AS jsonb)" if is_pg else "'{}'"
    return "''"


def insert_series(
    table: str,
    known: Mapping[str, str],
    count: int,
    params: Mapping[str, Any],
    start: int = 0,
    datetimes: tuple[str, ...] = (),
) -> None:
    """Insert ``count`` rows; ``i`` (from ``start``) is the row number in the expressions.

    ``datetimes`` names the bind parameters that are timezone-aware datetimes.
    """
    from worker.db import get_engine

    is_pg = dialect() == "postgresql"
    cols = columns(table)
    exprs = {name: expr for name, expr in known.items() if name in cols}
    for name, col in cols.items():
        if name in exprs or col.get("nullable", True) or col.get("default") is not None:
            continue
        if col.get("autoincrement") is True:
            continue
        exprs[name] = _neutral(col, is_pg)
    names = ", ".join(f'"{n}"' for n in exprs)
    values = ", ".join(exprs.values())
    if is_pg:
        source = "generate_series(:start, :stop - 1) AS s(i)"
        sql = f'INSERT INTO "{table}" ({names}) SELECT {values} FROM {source}'
    else:
        series = (
            "WITH RECURSIVE s(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM s"
            " WHERE i + 1 < :stop)"
        )
        sql = f'{series} INSERT INTO "{table}" ({names}) SELECT {values} FROM s'
    stmt = text(sql)
    for name in (*datetimes, "seed_now"):
        if f":{name}" in sql:
            stmt = stmt.bindparams(bindparam(name, type_=UTCDateTime()))
    all_params = {"start": start, "stop": start + count, **params}
    if ":seed_now" in sql:
        all_params["seed_now"] = _now()
    with get_engine().begin() as conn:
        conn.execute(stmt, all_params)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def insert_widgets(
    org_id: str,
    count: int,
    *,
    prefix: str,
    at: dt.datetime,
    purposes: list[str] | None = None,
    start: int = 0,
) -> None:
    """``count`` draft widgets of the organization, ids ``prefix0``, ``prefix1``..., created and
    last edited ``at``, selecting ``purposes``."""
    is_pg = dialect() == "postgresql"
    cast_text = "CAST(:prefix AS text)" if is_pg else ":prefix"
    i_text = "i::text" if is_pg else "CAST(i AS TEXT)"
    widgets = {
        "id": f"{cast_text} || {i_text}",
        "organization_id": ":org",
        "name": f"'Seeded widget ' || {i_text}",
        "format": "'embeddable'",
        "template_id": "'sections'",
        "headless": "false" if is_pg else "0",
        "enabled_languages": json_param("langs"),
        "default_language": "'en'",
        "domain": "'www.example.com'",
        "last_domain_used": "'www.example.com'",
        "selected_purposes_ids": json_param("purposes"),
        "selected_preferences_ids": json_param("empty_list"),
        "components": json_param("components"),
        "version": "1",
        "created_at": ":at",
        "updated_at": ":at",
    }
    params = {
        "org": org_id,
        "prefix": prefix,
        "langs": json.dumps(["en", "fr"]),
        "purposes": json.dumps(purposes or []),
        "empty_list": "[]",
        "components": json.dumps({"theme": {"color": "#1f6feb"}, "sections": []}),
        "at": at,
    }
    insert_series("widgets", widgets, count, params, start=start, datetimes=("at",))
