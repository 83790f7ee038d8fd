"""A real HTTP proxy in front of moto's server that can answer with errors on demand.

moto cannot be told to fail, so the S3 fault tests send their traffic through this proxy: it
forwards every request unchanged, except that it answers the next N requests of a given method
with a chosen status (500, 503...) in S3's XML error shape. It is a fault injector, not a mock:
the client, its retry logic and the successful requests all talk real HTTP to a real S3 server.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
    "<Message>injected by the test proxy</Message></Error>"
)
_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied"}


class FaultyS3Proxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self._lock = threading.Lock()
        self._faults: list[tuple[str, int]] = []  # (method, status), consumed in order
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status answered)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: without this, Nagle's algorithm and
            # the client's delayed ACK add ~40 ms to every answer with a body.
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._take_fault(self.command)
                if fault is not None:
                    payload = _ERROR_XML.format(code=_CODES.get(fault, "InternalError")).encode()
                    # Recorded before the answer goes out: a client that has its answer (and a
                    # test that then clears the log) never sees the request recorded late.
                    proxy._record(self.command, self.path, fault)
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=30
                )
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                proxy._record(self.command, self.path, resp.status)  # before the answer: above
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail_next(self, method: str, status: int, times: int = 1) -> None:
        with self._lock:
            self._faults.extend([(method.upper(), status)] * times)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()

    def count(self, method: str, status: int | None = None) -> int:
        with self._lock:
            return sum(
                1 for m, _, s in self.requests if m == method and (status is None or s == status)
            )

    def _take_fault(self, method: str) -> int | None:
        with self._lock:
            for i, (m, status) in enumerate(self._faults):
                if m == method:
                    del self._faults[i]
                    return status
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
