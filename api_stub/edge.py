"""The HTTP edge, a pure ASGI middleware: what is decided before the application reads anything.

For every request, in this order:

1. **Body size** from ``Content-Length``: above the route's limit (``JSON_BODY_LIMIT``, or
   ``UPLOAD_BODY_LIMIT`` for multipart uploads) it is a 413 at once. Nothing is read, so a client
   that sent ``Expect: 100-continue`` never gets ``100 Continue`` (the server sends it only when
   the application first asks for the body).
2. **Authentication**: an organization route needs a valid bearer token whose API key still
   exists (401), for the ``?organization_id=`` of the request (403); an admin route the admin
   token. So a request without a valid token is a 401 whatever its body, malformed or huge.
3. **While the body is read**: bytes are counted (chunked bodies have no ``Content-Length``) and
   reading stops past the limit (413); a body that does not arrive within
   ``BODY_READ_TIMEOUT_SECONDS`` is a 408. Both close the connection (the rest of the body is
   never read).
4. **Unexpected errors** become a 500 in the error shape here, not in Starlette's outermost
   middleware (which re-raises, so the server would close the connection): after any error the
   connection stays usable.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Literal

import anyio
from sqlmodel import Session
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_stub.deps import (
    KEY_CHECKED_STATE,
    check_admin,
    check_key_active,
    check_org_token,
)
from api_stub.errors import ApiError, error_body
from worker.db import read_only_engine
from worker.ids import is_safe_id
from worker.settings import get_settings

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
# Any request body but an upload: the largest valid JSON body is well below this.
JSON_BODY_LIMIT = 256 * KiB
# One asset (at most MAX_ASSET_BYTES) plus the multipart framing around it.
MAX_ASSET_BYTES = 2 * MiB
MULTIPART_OVERHEAD = 16 * KiB
UPLOAD_BODY_LIMIT = MAX_ASSET_BYTES + MULTIPART_OVERHEAD
# The whole body must have arrived this long after the application first asks for it.
BODY_READ_TIMEOUT_SECONDS = 30.0

RouteKind = Literal["organization", "admin", "public"]


@dataclass(frozen=True)
class RoutePolicy:
    kind: RouteKind
    body_limit: int


# Routes anyone may call; the admin routes; every other path is an organization route (so a
# new route is authenticated here unless it is listed). tests/api_stub/test_body_limits.py checks
# these tables against the routes' own dependencies and bodies in the OpenAPI.
PUBLIC_PATHS = frozenset({"/health", "/sessions", "/openapi.json", "/docs"})
PUBLIC_PREFIXES = ("/docs/",)
ADMIN_PATHS = frozenset({"/organizations"})
ADMIN_PREFIXES = ("/organizations/",)
# Multipart uploads (method, path pattern): one asset each.
UPLOAD_ROUTES = (("POST", re.compile(r"/widgets/[^/]+/assets")),)


def route_policy(method: str, path: str) -> RoutePolicy:
    """Who may call ``method path`` and how large its body may be."""
    kind: RouteKind = "organization"
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        kind = "public"
    elif path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES):
        kind = "admin"
    upload = any(method == m and pattern.fullmatch(path) for m, pattern in UPLOAD_ROUTES)
    return RoutePolicy(kind, UPLOAD_BODY_LIMIT if upload else JSON_BODY_LIMIT)


class Refusal(Exception):
    def __init__(self, code: int, message: str, *, close: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.close = code, message, close


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        body_read_timeout: float = BODY_READ_TIMEOUT_SECONDS,
    ) -> None:
        self.app = app
        self.body_read_timeout = body_read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(scope, receive, send, self.body_read_timeout)
        try:
            policy = route_policy(scope["method"], scope["path"])
            exchange.limit = policy.body_limit
            exchange.check_declared_length()
            await self._authenticate(scope, exchange.headers, policy.kind)
        except Refusal as refusal:
            await exchange.refuse(refusal)
            return
        except ApiError as exc:
            # Refused before the body was read: close if a body is on its way, so it is never
            # read (and never drained) either.
            await exchange.refuse(Refusal(exc.code, exc.message, close=exchange.has_body))
            return
        except Exception:
            log.exception("error while checking %s %s", scope.get("method"), scope.get("path"))
            await exchange.respond(500, "Internal server error", close=exchange.has_body)
            return
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:
            if exchange.response_started:
                raise
            if exchange.refusal is None:
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                await exchange.respond(500, "Internal server error", close=False)
        if exchange.refusal is not None and not exchange.response_started:
            await exchange.refuse(exchange.refusal)

    async def _authenticate(self, scope: Scope, headers: Headers, kind: RouteKind) -> None:
        if kind == "public":
            return
        settings = get_settings()
        authorization = headers.get("authorization")
        if kind == "admin":
            check_admin(authorization, settings)
            return
        organization_id = QueryParams(scope.get("query_string", b"")).get("organization_id")
        # A missing or malformed organization_id is the application's 400, after the 401.
        claims = check_org_token(
            authorization, organization_id if is_safe_id(organization_id) else None, settings
        )

        def key_active() -> None:
            with Session(read_only_engine()) as session:
                check_key_active(session, claims)

        await anyio.to_thread.run_sync(key_active)
        scope.setdefault("state", {})[KEY_CHECKED_STATE] = claims["sub"]


class _Exchange:
    """One request/response: counts the body as the application reads it, and answers for it
    when the body is refused midway (whatever the application then tries to send)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, timeout: float) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.headers = Headers(scope=scope)
        self.timeout = timeout
        self.limit = JSON_BODY_LIMIT
        self.received = 0
        self.body_complete = False
        self.deadline: float | None = None
        self.refusal: Refusal | None = None
        self.response_started = False

    @property
    def has_body(self) -> bool:
        length = self.headers.get("content-length")
        return "transfer-encoding" in self.headers or (length is not None and length != "0")

    def check_declared_length(self) -> None:
        values = self.headers.getlist("content-length")
        if not values:
            return
        if len(set(values)) != 1 or not values[0].isascii() or not values[0].isdigit():
            raise Refusal(400, "Invalid Content-Length header", close=True)
        if int(values[0]) > self.limit:
            raise Refusal(
                413, f"Request body larger than {self.limit} bytes (Content-Length)", close=True
            )

    async def receive(self) -> Message:
        if self.refusal is not None:
            return {"type": "http.disconnect"}
        if self.body_complete:
            return await self._receive()
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
        message: Message | None = None
        with anyio.move_on_after(max(0.0, self.deadline - time.monotonic())):
            message = await self._receive()
        if message is None:
            self.refusal = Refusal(
                408, f"Request body not received within {self.timeout:g} seconds", close=True
            )
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.refusal = Refusal(
                    413, f"Request body larger than {self.limit} bytes", close=True
                )
                return {"type": "http.disconnect"}
            if not message.get("more_body", False):
                self.body_complete = True
        return message

    async def send(self, message: Message) -> None:
        if self.refusal is not None:
            # The body was refused midway: whatever the application answers (it saw a
            # disconnect), the client gets the refusal, once.
            if message["type"] == "http.response.start" and not self.response_started:
                await self.refuse(self.refusal)
            return
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def refuse(self, refusal: Refusal) -> None:
        await self.respond(refusal.code, refusal.message, close=refusal.close)

    async def respond(self, code: int, message: str, *, close: bool) -> None:
        self.response_started = True
        body = json.dumps(error_body(code, message)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if code == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if close:
            headers.append((b"connection", b"close"))
        await self._send({"type": "http.response.start", "status": code, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


__all__ = [
    "BODY_READ_TIMEOUT_SECONDS",
    "JSON_BODY_LIMIT",
    "MAX_ASSET_BYTES",
    "UPLOAD_BODY_LIMIT",
    "EdgeMiddleware",
    "route_policy",
]
