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
5. **A deadline**: a request not answering ``REQUEST_DEADLINE_SECONDS`` after it arrived (or
   after its body did, or was refused) is answered 503 with ``Retry-After`` on its connection,
   whatever holds it (a database that hangs: stopped, or packets dropped, which no server-side
   timeout ends); routes that call S3 get ``S3_ROUTE_DEADLINE_SECONDS``. The request goes on in
   the background, its answer discarded; its session then refuses to commit
   (``api_stub.deps``), so the 503 is true.

**The database unavailable** (``api_stub.errors``: a 503 with ``Retry-After``, never a 500):

* while checking the token's API key (step 2, before the body is read) it is answered here; a
  body on its way is read and dropped first (within the limits and the body timeout of step
  3), so the connection stays usable;
* a GET or HEAD whose database connection was lost under it (a backend killed, a failover) is
  run again, once, on a fresh connection, instead of being answered 503: it only reads, so
  running it twice is safe. ``pool_pre_ping`` alone does not cover this: it replaces a
  connection that died *while pooled*, at checkout, not one that dies during the request.
  Writes are not retried: their transaction was rolled back, the 503 says so, the client
  retries (with the same idempotency key, e.g. ``deployment_id``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import anyio
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_stub.admission import admitted
from api_stub.deps import (
    KEY_CHECKED_STATE,
    ORGANIZATION_STATE,
    check_admin,
    check_key_active,
    check_org_token,
)
from api_stub.errors import (
    ABANDONED_STATE,
    DB_CONNECTION_LOST_STATE,
    ApiError,
    DatabaseBusy,
    allowed_methods,
    error_body,
    unavailable_headers,
    unavailable_message,
)
from api_stub.route_policy import (
    BODY_READ_TIMEOUT_SECONDS,
    JSON_BODY_LIMIT,
    MAX_ASSET_BYTES,
    REQUEST_DEADLINE_SECONDS,
    UPLOAD_BODY_LIMIT,
    RouteKind,
    RoutePolicy,
    route_policy,
)
from worker.db import api_engine, database_unavailable
from worker.ids import is_safe_id
from worker.models import Organization
from worker.settings import get_settings

log = logging.getLogger(__name__)


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
        policy = route_policy(scope["method"], scope["path"])
        # The request is handled in a task of its own, so that its answer does not depend on
        # it finishing (see _answer_within).
        task = asyncio.ensure_future(self._handle(scope, exchange, policy))
        try:
            await self._answer_within(policy.deadline, task, exchange, scope)
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _answer_within(
        self, seconds: float, task: asyncio.Future[None], exchange: _Exchange, scope: Scope
    ) -> None:
        """Wait for the request's handling; if it has not started its answer ``seconds`` after
        the request (or its body) arrived, answer 503 and leave it to finish in the background,
        its answer discarded and its transaction never committed (``api_stub.deps``)."""
        arrived = time.monotonic()
        while not task.done():
            anchor = max(arrived, exchange.body_ended_at or arrived)
            if exchange.response_started:
                await asyncio.wait({task})  # answering: the server's flow control applies
            elif exchange.reading_body:
                await asyncio.wait({task}, timeout=1.0)  # the body's own timeout (408) applies
            elif time.monotonic() < anchor + seconds:
                await asyncio.wait({task}, timeout=anchor + seconds - time.monotonic())
            else:
                break
        if task.done():
            task.result()  # the handling's own exception, if any
            return
        exchange.abandon()
        _background.add(task)
        task.add_done_callback(_abandoned_done)
        log.warning("%s %s not answered within %g s (database hung?): 503", *_what(scope), seconds)
        # The body, if still unread, is read and dropped (within its limit and timeout), so
        # the connection carries the next request.
        drained = await exchange.drain(force=True)
        if not drained and exchange.refusal is not None:
            await exchange.respond(
                exchange.refusal.code, exchange.refusal.message, close=True, force=True
            )
            return
        await exchange.respond(
            503,
            unavailable_message(f"no answer within {seconds:g} s"),
            close=not drained,
            headers=unavailable_headers(),
            force=True,
        )

    async def _handle(self, scope: Scope, exchange: _Exchange, policy: RoutePolicy) -> None:
        try:
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
        except DatabaseBusy as exc:
            log.warning("database busy checking %s %s: %s", scope["method"], scope["path"], exc)
            await exchange.unavailable(str(exc))
            return
        except (DBAPIError, PoolTimeoutError) as exc:
            found = database_unavailable(exc)
            if found is None:
                log.exception("error while checking %s %s", scope["method"], scope["path"])
                await exchange.respond(500, "Internal server error", close=exchange.has_body)
            else:
                log.warning(
                    "database unavailable checking %s %s: %s",
                    scope["method"],
                    scope["path"],
                    found.reason,
                )
                await exchange.unavailable(found.reason)
            return
        except Exception:
            log.exception("error while checking %s %s", scope.get("method"), scope.get("path"))
            await exchange.respond(500, "Internal server error", close=exchange.has_body)
            return
        # A read whose connection is lost under it runs once more (see the module).
        runs = 2 if scope["method"] in ("GET", "HEAD") and not exchange.has_body else 1
        base_scope, base_state = dict(scope), dict(scope.get("state", {}))
        for run in range(runs):
            run_scope = scope if run == 0 else {**base_scope, "state": dict(base_state)}
            exchange.start_run(run_scope, may_retry=run + 1 < runs)
            try:
                await self.app(run_scope, exchange.receive, exchange.send)
            except Exception:
                if exchange.response_started:
                    raise
                if exchange.refusal is None:
                    log.exception(
                        "unhandled error on %s %s", scope.get("method"), scope.get("path")
                    )
                    await exchange.respond(500, "Internal server error", close=False)
            if not exchange.retrying:
                break
            log.warning("%s %s lost its database connection: running it again", *_what(scope))
        if exchange.refusal is not None and not exchange.response_started:
            await exchange.refuse(exchange.refusal)

    async def _authenticate(self, scope: Scope, headers: Headers, kind: RouteKind) -> None:
        if kind == "public":
            return
        try:
            await self._check_credentials(scope, headers, kind)
        except ApiError as exc:
            # A path no route serves is the application's 404, whoever asks (the routes are
            # public: /openapi.json); checked only on a refusal, so it costs the hot path nothing.
            if exc.code in (401, 403) and not allowed_methods(scope["app"], scope["path"]):
                return
            raise

    async def _check_credentials(self, scope: Scope, headers: Headers, kind: RouteKind) -> None:
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

        def key_active() -> Organization:
            with Session(api_engine(read_only=True)) as session:
                return check_key_active(session, claims)

        for attempt in (1, 2):
            try:
                async with admitted(write=False):
                    org = await anyio.to_thread.run_sync(key_active)
                break
            except DBAPIError as exc:
                # A read: once more on a fresh connection if this one was lost under it.
                found = database_unavailable(exc)
                if attempt == 2 or found is None or not found.connection_lost:
                    raise
                log.warning("checking the API key lost its database connection: once more")
        state = scope.setdefault("state", {})
        state[KEY_CHECKED_STATE], state[ORGANIZATION_STATE] = claims["sub"], org


def _what(scope: Scope) -> tuple[str, str]:
    return scope.get("method", ""), scope.get("path", "")


# Handlings answered 503 by the deadline and still running (kept referenced until they end).
_background: set[asyncio.Future[None]] = set()


def _abandoned_done(task: asyncio.Future[None]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.warning("a request answered 503 at its deadline then failed: %r", task.exception())


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
        # The run of the application in progress, whether its answer may be a retried 503
        # (held back: ``retrying``), and whether its body message must be replayed.
        self.run_scope: Scope = scope
        self.may_retry = False
        self.retrying = False
        self._replay: Message | None = None
        # When the body was complete, or refused (408, 413): the deadline counts from then.
        self.body_ended_at: float | None = None
        # Answered 503 by the deadline: whatever the handling does next goes nowhere.
        self.abandoned = False

    @property
    def reading_body(self) -> bool:
        return self.deadline is not None and not self.body_complete and self.refusal is None

    def abandon(self) -> None:
        self.abandoned = True
        for state in (self.scope.setdefault("state", {}), self.run_scope.setdefault("state", {})):
            state[ABANDONED_STATE] = True

    def start_run(self, scope: Scope, *, may_retry: bool) -> None:
        self.run_scope, self.may_retry = scope, may_retry
        if self.retrying and self.body_complete:
            # The first run read the (empty) body: the next one reads it again.
            self._replay = {"type": "http.request", "body": b"", "more_body": False}
        self.retrying = False

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

    async def receive(self, *, force: bool = False) -> Message:
        if self.refusal is not None or (self.abandoned and not force):
            return {"type": "http.disconnect"}
        if self._replay is not None:
            replay, self._replay = self._replay, None
            return replay
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
            self.body_ended_at = time.monotonic()
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.refusal = Refusal(
                    413, f"Request body larger than {self.limit} bytes", close=True
                )
                self.body_ended_at = time.monotonic()
                return {"type": "http.disconnect"}
            if not message.get("more_body", False):
                self.body_complete = True
                self.body_ended_at = time.monotonic()
        return message

    async def send(self, message: Message) -> None:
        if self.abandoned:
            return
        if self.refusal is not None:
            # The body was refused midway: whatever the application answers (it saw a
            # disconnect), the client gets the refusal, once.
            if message["type"] == "http.response.start" and not self.response_started:
                await self.refuse(self.refusal)
            return
        if self.retrying:
            return  # the body of a held-back 503
        if message["type"] == "http.response.start":
            if (
                self.may_retry
                and message["status"] == 503
                and self.run_scope.get("state", {}).get(DB_CONNECTION_LOST_STATE)
            ):
                self.retrying = True  # answered by the next run instead
                return
            self.response_started = True
        await self._send(message)

    async def drain(self, *, force: bool = False) -> bool:
        """Read and drop the rest of the body (within the limit and the body timeout); True
        once it is complete, so the connection can carry the next request."""
        if not self.has_body:
            return True
        while not self.body_complete:
            message = await self.receive(force=force)
            if message["type"] != "http.request":
                return False
        return True

    async def unavailable(self, reason: str) -> None:
        """503 with ``Retry-After``, the connection kept (the body, if any, drained first)."""
        if await self.drain():
            headers = unavailable_headers()
            await self.respond(503, unavailable_message(reason), close=False, headers=headers)
        elif self.refusal is not None:
            await self.refuse(self.refusal)
        # else the client went away: nobody to answer

    async def refuse(self, refusal: Refusal) -> None:
        await self.respond(refusal.code, refusal.message, close=refusal.close)

    async def respond(
        self,
        code: int,
        message: str,
        *,
        close: bool,
        headers: dict[str, str] | None = None,
        force: bool = False,
    ) -> None:
        if self.abandoned and not force:
            return
        self.response_started = True
        body = json.dumps(error_body(code, message)).encode()
        raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
        ]
        if code == 401:
            raw_headers.append((b"www-authenticate", b"Bearer"))
        if close:
            raw_headers.append((b"connection", b"close"))
        await self._send({"type": "http.response.start", "status": code, "headers": raw_headers})
        await self._send({"type": "http.response.body", "body": body})


__all__ = [
    "BODY_READ_TIMEOUT_SECONDS",
    "JSON_BODY_LIMIT",
    "MAX_ASSET_BYTES",
    "REQUEST_DEADLINE_SECONDS",
    "UPLOAD_BODY_LIMIT",
    "EdgeMiddleware",
    "route_policy",
]
