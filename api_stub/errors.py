"""Errors in the Didomi (Feathers) shape: {code, name, className, message, errors}.

**The database unavailable is a 503, never a 500.** A connection that died under the request,
no connection to be had, SQLite's "database is locked", a PostgreSQL statement or lock timeout
(:func:`worker.db.database_unavailable` decides), or a request not admitted to the database in
time (:class:`DatabaseBusy`, ``api_stub.admission``): ``503 Unavailable`` in the error shape with
``Retry-After: 1``, logged as one line without a traceback. Nothing of such a request was
committed (its transaction is rolled back, by the server if its connection died), so the client
retries it; the one exception is a connection lost during the COMMIT itself, whose outcome is
unknown (a deploy retried with the same ``deployment_id`` is idempotent). The handlers are
registered for those exception classes (not for ``Exception``), so they run in Starlette's
ExceptionMiddleware and the connection stays open for the next request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.db import database_unavailable

log = logging.getLogger(__name__)

ERROR_NAMES: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "bad-request"),
    401: ("NotAuthenticated", "not-authenticated"),
    403: ("Forbidden", "forbidden"),
    404: ("NotFound", "not-found"),
    405: ("MethodNotAllowed", "method-not-allowed"),
    408: ("Timeout", "timeout"),
    409: ("Conflict", "conflict"),
    413: ("PayloadTooLarge", "payload-too-large"),
    415: ("UnsupportedMediaType", "unsupported-media-type"),
    422: ("Unprocessable", "unprocessable"),
    500: ("GeneralError", "general-error"),
    503: ("Unavailable", "unavailable"),
}


_HTTP_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})


class ErrorBody(BaseModel):
    """The shape of every error the API answers (documented in the OpenAPI as ``Error``)."""

    code: int = Field(description="The HTTP status code", examples=[400])
    name: str = Field(examples=["BadRequest"])
    className: str = Field(examples=["bad-request"])
    message: str
    errors: dict[str, Any] = Field(description="Offending fields (dotted paths) and why")


# Seconds a client should wait before retrying a 503 (the header's value).
RETRY_AFTER_SECONDS = 1
# Set in the request's scope state when a 503 is for a connection lost under the request: the
# edge (api_stub.edge) retries a GET or HEAD once instead of answering it.
DB_CONNECTION_LOST_STATE = "db_connection_lost"
# Set by the edge when it answered 503 at the request's deadline: the request's session must not
# commit anything any more (api_stub.deps), so that the 503 is true.
ABANDONED_STATE = "answered_at_deadline"


class DatabaseBusy(Exception):
    """The request was not admitted to the database in time (``api_stub.admission``), or may
    not commit any more (answered 503 at its deadline, ``api_stub.deps``)."""


class ApiError(Exception):
    def __init__(self, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.errors = code, message, errors or {}


def bad_request(message: str, errors: dict[str, Any] | None = None) -> ApiError:
    return ApiError(400, message, errors)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"No {what} found for id '{ident}'")


def error_body(code: int, message: str, errors: dict[str, Any] | None = None) -> dict[str, Any]:
    name, class_name = ERROR_NAMES.get(code, ("GeneralError", "general-error"))
    return {
        "code": code,
        "name": name,
        "className": class_name,
        "message": message,
        "errors": errors or {},
    }


def _response(
    code: int,
    message: str,
    errors: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if code == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(error_body(code, message, errors), status_code=code, headers=headers)


def unavailable_message(reason: str) -> str:
    return f"Service temporarily unavailable ({reason}); retry in {RETRY_AFTER_SECONDS} s"


def unavailable_headers() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "values", 0, "name") -> "values.0.name"; the request part is dropped.
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _json_error(err: Any, body: Any) -> str:
    """A malformed JSON body's error, where a person looks for it: line and column (FastAPI
    gives the character offset as the error's location)."""
    loc = tuple(err.get("loc", ()))
    reason = str((err.get("ctx") or {}).get("error") or "not valid JSON")
    offset = loc[-1] if loc and isinstance(loc[-1], int) else None
    if offset is None:
        return f"invalid JSON: {reason}"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    line = text.count("\n", 0, offset) + 1
    column = offset - text.rfind("\n", 0, offset)
    return f"invalid JSON at line {line}, column {column}: {reason}"


def _path_patterns(app: FastAPI) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    cached: list[tuple[re.Pattern[str], frozenset[str]]] | None = getattr(
        app.state, "path_patterns", None
    )
    if cached is None:
        cached = []
        for template, item in app.openapi().get("paths", {}).items():
            regex = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            methods = {m.upper() for m in item if m.upper() in _HTTP_METHODS}
            if "GET" in methods:
                methods.add("HEAD")
            cached.append((re.compile(regex), frozenset(methods)))
        app.state.path_patterns = cached
    return cached


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some operation of ``path`` answers (from the OpenAPI paths)."""
    found: set[str] = set()
    for pattern, methods in _path_patterns(app):
        if pattern.fullmatch(path):
            found |= methods
    return sorted(found)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        # A 503 (e.g. the object store unavailable) tells the client when to try again, like
        # every other 503 of the API.
        headers = unavailable_headers() if exc.code == 503 else None
        return _response(exc.code, exc.message, exc.errors, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors: dict[str, str] = {}
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                errors.setdefault("body", _json_error(err, exc.body))
                continue
            msg = str(err.get("msg", "invalid"))
            if err.get("type") == "extra_forbidden":
                msg = "unknown field"
            errors.setdefault(_field_name(tuple(err.get("loc", ()))), msg)
        summary = "; ".join(f"{k}: {v}" for k, v in errors.items())
        return _response(400, f"Invalid request: {summary}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of one route only; a path has a route per method.
            allowed = allowed_methods(request.app, request.url.path)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return _response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(DatabaseBusy)
    async def _busy(request: Request, exc: DatabaseBusy) -> JSONResponse:
        log.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
        return _response(503, unavailable_message(str(exc)), headers=unavailable_headers())

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeoutError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        found = database_unavailable(exc)
        if found is None:  # a bug or a constraint, not an outage: a 500 (connection kept)
            log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
            return _response(500, "Internal server error")
        cause = getattr(exc, "orig", None) or exc
        log.warning(
            "database unavailable on %s %s: %s (%s: %s)",
            request.method,
            request.url.path,
            found.reason,
            type(cause).__name__,
            str(cause).strip().splitlines()[0][:200] if str(cause).strip() else "",
        )
        if found.connection_lost:
            request.scope.setdefault("state", {})[DB_CONNECTION_LOST_STATE] = True
        return _response(503, unavailable_message(found.reason), headers=unavailable_headers())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The API boundary: log the traceback, never leak it to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _response(500, "Internal server error")
