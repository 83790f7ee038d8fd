"""A webhook receiver on loopback that a test can make fail: answering 2xx, 500, 410, a redirect,
slowly, or dropping the connection without an answer ("down"). It records every request, with
its arrival time (``./dev bench``'s webhooks section measures delivery latency with it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODES = ("ok", "500", "410", "redirect", "slow", "down")


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int | None  # None: dropped without an answer
    at: float = 0.0  # arrival, time.time()


class Receiver:
    def __init__(self) -> None:
        self.mode = "ok"
        self.slow_seconds = 3.0
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                mode = receiver.mode
                status = {"ok": 204, "500": 500, "410": 410, "redirect": 302, "slow": 204}.get(mode)
                got = Received(dict(self.headers.items()), body, status, time.time())
                receiver._note(got)
                if mode == "slow":
                    time.sleep(receiver.slow_seconds)
                if status is None:  # down: the connection closes with no answer
                    self.close_connection = True
                    return
                self.send_response(status)
                if mode == "redirect":
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _note(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def answered(self, status: int) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.answered == status]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@contextmanager
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.close()
