"""A real HTTP proxy in front of moto's S3 server with switchable misbehaviour.

Like :class:`tests.support.faulty_s3.FaultyS3Proxy` it forwards real HTTP to a real S3 server
(moto); what it adds, each switched on and off by the test while workers are running:

* :meth:`ChaosS3Proxy.chaos`: random faults on a chosen set of methods, from a seeded
  :class:`random.Random`: with probability ``p`` a request is answered ``500``/``503`` (S3's XML
  error shape, nothing forwarded), or its connection is dropped, either before it is forwarded
  or *after* (the write landed, the answer is lost); every request of those methods waits a
  random ``[a, b]`` ms before being forwarded;
* :attr:`ChaosS3Proxy.strip_conditional_headers`: requests are forwarded without ``If-None-Match``
  and ``If-Match``, i.e. a store that ignores conditional writes (moto does not check request
  signatures, so removing signed headers is accepted);
* :meth:`ChaosS3Proxy.hold_responses`: requests of a method are forwarded at once (the write
  happens on S3) but their responses are held until :meth:`ChaosS3Proxy.release`, to freeze a
  client *after* its upload landed;
* counters of requests by ``(method, path, status)`` (``status`` 0: the connection was dropped)
  and of the faults injected.

:meth:`ChaosS3Proxy.close` releases whatever is held and stops the server.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the chaos proxy</Message></Error>"
)
_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}
DROPPED = 0  # the status counted for a request whose connection was dropped
# Fault kinds: an S3 error answer, or the connection dropped before / after forwarding.
FAULT_KINDS = ("500", "503", "drop", "drop-after")
CONDITIONAL_HEADERS = frozenset({"if-none-match", "if-match"})
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "expect"})
MAX_HOLD_SECONDS = 120.0


class ChaosS3Proxy:
    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._rng = random.Random(seed)
        # Random faults: off until chaos() is called.
        self._chaos_methods: frozenset[str] = frozenset()
        self._p = 0.0
        self._delay_ms = (0.0, 0.0)
        self._kinds: tuple[str, ...] = FAULT_KINDS
        # True: drop both conditional headers; a set of names: drop only those.
        self.strip_conditional_headers: bool | frozenset[str] = False
        # Held responses.
        self._hold_method: str | None = None
        self.held = 0  # responses being held right now
        self.held_total = 0  # responses ever held
        # Counters.
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.injected: Counter[tuple[str, str]] = Counter()  # (method, fault kind)
        self.stripped = 0  # requests that had a conditional header removed
        # (monotonic time answered, method, path, status, note) of each request; the note has
        # its conditional header and the ``sequence`` metadata of a write, if any
        self.journal: list[tuple[float, str, str, int, str]] = []
        self._handlers = 0  # requests being handled right now
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without this, Nagle's algorithm and
            # the client's delayed ACK add ~40 ms to every answer with a body.
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                with proxy._lock:
                    proxy._handlers += 1
                try:
                    proxy._serve(self)
                finally:
                    with proxy._lock:
                        proxy._handlers -= 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A client killed while its response was held: the broken pipe is expected, not news.
        self.server.handle_error = lambda *_: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="chaos-s3-proxy", daemon=True
        )
        self._thread.start()

    # -- switches ---------------------------------------------------------------------------

    def chaos(
        self,
        methods: Iterable[str],
        *,
        p: float,
        delay_ms: tuple[float, float] = (0, 0),
        kinds: Iterable[str] = FAULT_KINDS,
        seed: int | None = None,
    ) -> None:
        """Random faults (probability ``p``) and delays (uniform in ``delay_ms``) on ``methods``."""
        kinds = tuple(kinds)
        assert kinds and set(kinds) <= set(FAULT_KINDS), kinds
        assert 0 <= p <= 1 and 0 <= delay_ms[0] <= delay_ms[1]
        with self._lock:
            if seed is not None:
                self._rng.seed(seed)
            self._chaos_methods = frozenset(m.upper() for m in methods)
            self._p, self._delay_ms, self._kinds = p, (delay_ms[0], delay_ms[1]), kinds

    def calm(self) -> None:
        """No more random faults or delays."""
        with self._lock:
            self._chaos_methods = frozenset()

    def hold_responses(self, method: str) -> None:
        """Forward every ``method`` request, then hold its response until :meth:`release`."""
        with self._cond:
            self._hold_method = method.upper()

    def release(self) -> None:
        """Stop holding; every held response is sent now."""
        with self._cond:
            self._hold_method = None
            self._cond.notify_all()

    def wait_held(self, timeout: float, count: int = 1) -> bool:
        """True once at least ``count`` responses are being held."""
        with self._cond:
            return self._cond.wait_for(lambda: self.held >= count, timeout)

    # -- counters ---------------------------------------------------------------------------

    def count(
        self, method: str | None = None, *, key: str | None = None, status: int | None = None
    ) -> int:
        """Requests answered (or dropped: status 0), filtered by method, object key, status."""
        with self._lock:
            return sum(
                n
                for (m, path, s), n in self.requests.items()
                if (method is None or m == method.upper())
                and (key is None or path.endswith("/" + key))
                and (status is None or s == status)
            )

    def faults(self, method: str | None = None) -> int:
        """Faults injected so far (error answers and dropped connections)."""
        with self._lock:
            return sum(
                n for (m, _), n in self.injected.items() if method is None or m == method.upper()
            )

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.injected.clear()
            self.journal.clear()
            self.stripped = 0
            self.held_total = 0

    def close(self) -> None:
        self.release()
        self.calm()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
        # Handler threads are daemons; give the ones still writing a moment to finish.
        deadline = time.monotonic() + 5
        while self._handlers and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- the request path -------------------------------------------------------------------

    def _draw(self, method: str) -> tuple[str | None, float]:
        """(fault kind or None, delay in seconds) for one request."""
        with self._lock:
            if method not in self._chaos_methods:
                return None, 0.0
            fault = self._rng.random() < self._p
            kind = self._rng.choice(self._kinds)
            delay = self._rng.uniform(*self._delay_ms) / 1000
            return (kind if fault else None), delay

    def _count(
        self, h: BaseHTTPRequestHandler, path: str, status: int, fault: str | None = None
    ) -> None:
        method = h.command
        note = " ".join(
            f"{k.lower()}={v}"
            for k, v in h.headers.items()
            if k.lower() in CONDITIONAL_HEADERS or k.lower() == "x-amz-meta-sequence"
        )
        with self._lock:
            self.requests[(method, path, status)] += 1
            self.journal.append((time.monotonic(), method, path, status, note))
            if fault is not None:
                self.injected[(method, fault)] += 1

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, urlsplit(h.path).path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        fault, delay = self._draw(method)
        if delay:
            time.sleep(delay)
        if fault in ("500", "503"):
            status = int(fault)
            payload = _ERROR_XML.format(code=_ERROR_CODES[status]).encode()
            # Counted before the client can see the answer (here and below): a test that reads
            # the counters once its client is done never misses a request counted late.
            self._count(h, path, status, fault)
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(payload)
            return
        if fault == "drop":
            self._count(h, path, DROPPED, fault)
            self._drop(h)
            return

        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        if self.strip_conditional_headers:
            stripping = (
                CONDITIONAL_HEADERS
                if self.strip_conditional_headers is True
                else {name.lower() for name in self.strip_conditional_headers}
            )
            kept = {k: v for k, v in headers.items() if k.lower() not in stripping}
            if len(kept) != len(headers):
                with self._lock:
                    self.stripped += 1
            headers = kept
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            conn.request(method, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            resp_headers = resp.getheaders()
        finally:
            conn.close()

        if fault == "drop-after":  # S3 did the work; the client never hears of it
            self._count(h, path, DROPPED, fault)
            self._drop(h)
            return
        self._hold(method)
        h.send_response(resp.status)
        for name, value in resp_headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP or (lower == "content-length" and method != "HEAD"):
                continue
            h.send_header(name, value)
        if method != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        self._count(h, path, resp.status)
        with contextlib.suppress(OSError):
            if method != "HEAD":
                h.wfile.write(data)
            h.wfile.flush()

    def _hold(self, method: str) -> None:
        with self._cond:
            if self._hold_method != method:
                return
            self.held += 1
            self.held_total += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: self._hold_method != method, MAX_HOLD_SECONDS)
            finally:
                self.held -= 1
                self._cond.notify_all()

    @staticmethod
    def _drop(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)
