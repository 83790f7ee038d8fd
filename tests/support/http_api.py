"""The API as a real server, driven over real HTTP by many keep-alive clients.

* :func:`production_env`: ``APP_ENV=production`` settings with freshly generated strong
  ``SECRET_KEY`` / ``ADMIN_TOKEN`` for a database, broker and S3 of the test's choosing;
* :class:`ApiServer`: ``uvicorn api_stub.app:app`` as a subprocess on a free port, ready once
  ``/health`` answers 200, stopped by PID;
* :func:`admin_org`: an organization, an API key and an access token, made over HTTP;
* :class:`HttpClients`: ``clients`` threads, each with its own ``httpx.Client`` (one keep-alive
  connection), recording every attempt (status, latency, ``Retry-After``, error shape, whether
  the TCP connection was the same as the previous attempt's).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.api import OrgClient
from tests.support.reliability import PROJECT_ROOT, p99
from worker.processes import BIN_DIR, ManagedProcess, free_port, wait_until

ERROR_KEYS = {"code", "name", "className", "message", "errors"}


def production_env(database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    """Production settings (strong generated secrets) on the given database and broker; S3 and
    the rest come from this process's environment (the session's moto)."""
    return {
        "APP_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "ADMIN_TOKEN": secrets.token_urlsafe(48),
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        **extra,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class ApiServer:
    """``uvicorn api_stub.app:app`` on a free loopback port; stopped by PID."""

    def __init__(self, log_dir: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_token = env["ADMIN_TOKEN"]
        cmd = [str(BIN_DIR / "uvicorn"), "api_stub.app:app", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-level", "warning", *args]
        self.proc = ManagedProcess(
            f"api-{self.port}", cmd, {**os.environ, **env}, log_dir, PROJECT_ROOT
        )
        try:
            wait_until(self._ready, 60, "the API's /health")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.proc.alive(), f"the API exited:\n{self.proc.log_tail()}"
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, chars: int = 200_000) -> str:
        return self.proc.log_tail(chars)

    def stop(self) -> None:
        self.proc.stop(timeout=20)

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def admin_org(http: httpx.Client, admin_token: str) -> OrgClient:
    """A new organization with an API key and an access token, through the admin routes."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    r = http.post("/organizations", json={"name": f"org-{uuid.uuid4().hex[:6]}"}, headers=admin)
    assert r.status_code == 201, r.text
    org = r.json()
    cred = http.post(f"/organizations/{org['id']}/api-keys", headers=admin)
    assert cred.status_code == 201, cred.text
    body = {"type": "api-key", "key": cred.json()["key"], "secret": cred.json()["secret"]}
    token = http.post("/sessions", json=body)
    assert token.status_code == 201, token.text
    return OrgClient(http, org, token.json()["access_token"])


def local_port(response: httpx.Response) -> int | None:
    """The client-side port of the TCP connection that carried ``response`` (same port on two
    responses of one client: the same keep-alive connection)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    try:
        return int(sock.getsockname()[1]) if sock is not None else None
    except OSError:  # already closed
        return None


@dataclass
class Attempt:
    """One HTTP request (a logical call may take several: 503s are retried)."""

    started: float
    seconds: float
    status: int  # 0: the request raised (timeout, connection error)
    method: str = "POST"
    retry_after: str | None = None
    error_shape: bool = True  # a non-2xx body in the error shape
    body: str = ""
    exception: str = ""
    port: int | None = None
    same_connection: bool | None = None  # None: first request of the client


@dataclass
class HttpClients:
    """``clients`` threads, each with its own keep-alive ``httpx.Client``.

    :meth:`run` calls ``work(client, i)`` for ``i`` in ``range(count)``, spread over the
    threads; :meth:`request` makes one request, retrying a 503 after its ``Retry-After`` (at
    most ``max_retries`` times) and recording every attempt.
    """

    base_url: str
    token: str
    organization_id: str
    clients: int = 50
    timeout: float = 30.0
    max_retries: int = 20
    attempts: list[Attempt] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)
    _all: list[httpx.Client] = field(default_factory=list)

    def client(self) -> httpx.Client:
        http: httpx.Client | None = getattr(self._local, "http", None)
        if http is None:
            http = httpx.Client(
                base_url=self.base_url,
                timeout=self.timeout,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                headers={"Authorization": f"Bearer {self.token}"},
                event_hooks={"response": [self._note_port]},
            )
            self._local.http, self._local.port = http, None
            with self._lock:
                self._all.append(http)
        return http

    def _note_port(self, response: httpx.Response) -> None:
        # Called once the head arrived, before the body is read (and the connection possibly
        # closed after it).
        self._local.current_port = local_port(response)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response | None:
        """The final response (None if the last attempt raised)."""
        http = self.client()
        params = {"organization_id": self.organization_id, **kw.pop("params", {})}
        response: httpx.Response | None = None
        for _ in range(1 + self.max_retries):
            t0 = time.monotonic()
            attempt = Attempt(t0, 0.0, 0, method)
            response = None
            self._local.current_port = None
            try:
                response = http.request(method, path, params=params, **kw)
                response.read()
            except httpx.HTTPError as exc:
                attempt.exception = repr(exc)[:300]
            attempt.seconds = time.monotonic() - t0
            if response is not None:
                attempt.status = response.status_code
                attempt.retry_after = response.headers.get("retry-after")
                attempt.port = self._local.current_port
                previous = getattr(self._local, "port", None)
                if previous is not None:
                    attempt.same_connection = attempt.port == previous
                self._local.port = attempt.port
                if response.status_code >= 300:
                    attempt.body = response.text[:500]
                    try:
                        attempt.error_shape = set(response.json()) == ERROR_KEYS
                    except ValueError:
                        attempt.error_shape = False
            else:
                self._local.port = None
            with self._lock:
                self.attempts.append(attempt)
            if response is None or response.status_code != 503:
                return response
            time.sleep(min(float(attempt.retry_after or 1), 5.0))
        return response

    def run(self, count: int, work: Callable[[HttpClients, int], None]) -> None:
        with ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(lambda i: work(self, i), range(count)))

    def close(self) -> None:
        with self._lock:
            for http in self._all:
                http.close()
            self._all.clear()

    # -- figures -------------------------------------------------------------------------------

    def statuses(self) -> Counter[int]:
        with self._lock:
            return Counter(a.status for a in self.attempts)

    def latencies(self, method: str | None = None) -> list[float]:
        with self._lock:
            return [a.seconds for a in self.attempts if method in (None, a.method)]

    def figures(self) -> dict[str, Any]:
        statuses = self.statuses()
        latencies = self.latencies()
        return {
            "requests": sum(statuses.values()),
            "http_5xx": sum(n for s, n in statuses.items() if s >= 500),
            "http_500": statuses.get(500, 0),
            "http_503": statuses.get(503, 0),
            "client_errors": statuses.get(0, 0),
            "api_p50_s": round(percentile(latencies, 0.5), 3),
            "api_p99_s": round(p99(latencies), 3),
            "api_max_s": round(max(latencies, default=0.0), 3),
        }


@contextmanager
def clients_for(
    server: ApiServer, org: OrgClient, clients: int, timeout: float = 30.0
) -> Iterator[HttpClients]:
    load = HttpClients(server.url, org.token, org.id, clients=clients, timeout=timeout)
    try:
        yield load
    finally:
        load.close()
