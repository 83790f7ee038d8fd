"""Sending one webhook request, with the guards a server-side request to a user's URL needs.

* **Where** (SSRF): an endpoint URL must be ``https`` with a host name or address and no
  credentials; at delivery the host is resolved and **every** address must be public (not
  loopback, private, link-local, multicast, reserved: ``ipaddress``'s ``is_global``). The
  request is then sent to the address that was checked (the host name stays in the TLS
  handshake and the ``Host`` header), so a DNS answer that changes in between cannot redirect
  it. ``WEBHOOK_ALLOW_PRIVATE_NETWORKS`` (true in development) also allows ``http`` and
  non-public addresses: the tests and the embedded stack deliver to loopback.
* **How long**: connect and total timeouts (``WEBHOOK_CONNECT_TIMEOUT_SECONDS``,
  ``WEBHOOK_TIMEOUT_SECONDS``); redirects are not followed (a 3xx is a failed attempt); the
  response body is read to at most :data:`MAX_RESPONSE_BYTES` and dropped.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import httpx

from worker.settings import Settings

MAX_URL_LENGTH = 2048
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "widget-worker-webhooks/1"


_client: tuple[int, httpx.Client] | None = None  # (the process that made it, the client)
_client_lock = threading.Lock()


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str]


def post_all(requests: Sequence[Request], settings: Settings) -> list[Answer]:
    """Each request once, all at once (a thread each: a batch takes one timeout at most, and
    holds no database connection while it waits); the answers in order."""
    if len(requests) == 1:
        return [post(requests[0].url, requests[0].body, requests[0].headers, settings)]
    with concurrent.futures.ThreadPoolExecutor(len(requests), "webhook") as threads:
        return list(threads.map(lambda r: post(r.url, r.body, r.headers, settings), requests))


def _shared_client() -> httpx.Client:
    """One client per process (made after fork), shared by its threads: building one costs a
    TLS context (the CA bundle parsed), far more than the request. No keep-alive: requests go
    to a checked address with the host name only in TLS SNI, and a pooled connection must never
    carry another host's request."""
    global _client
    with _client_lock:
        if _client is None or _client[0] != os.getpid():
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=0)
            client = httpx.Client(limits=limits, follow_redirects=False, trust_env=False)
            _client = (os.getpid(), client)
        return _client[1]


class UnsafeUrlError(ValueError):
    """The URL may not be delivered to (the message says why)."""


@dataclass(frozen=True)
class Answer:
    status_code: int | None  # None: no HTTP answer (refused, timed out, unsafe)
    latency_ms: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def check_url(url: str, allow_private: bool) -> SplitResult:
    """The URL's parts, or :class:`UnsafeUrlError`: checked when an endpoint is registered and
    again before every delivery."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrlError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as exc:
        raise UnsafeUrlError(f"not a URL: {exc}") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise UnsafeUrlError(f"the URL must be {' or '.join(schemes)}")
    if not parts.hostname:
        raise UnsafeUrlError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrlError("the URL may not carry credentials")
    if parts.fragment:
        raise UnsafeUrlError("the URL may not have a fragment")
    if not allow_private:
        try:
            _refuse_private(ipaddress.ip_address(parts.hostname))
        except ValueError as exc:
            if isinstance(exc, UnsafeUrlError):
                raise
            # A host name: its addresses are checked at each delivery.
    return parts


def _refuse_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    mapped = getattr(address, "ipv4_mapped", None)
    if not address.is_global or (mapped is not None and not mapped.is_global):
        raise UnsafeUrlError(f"{address} is not a public address")


def resolve(parts: SplitResult, allow_private: bool) -> str:
    """One address of the URL's host that may be delivered to (every one is checked)."""
    assert parts.hostname is not None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeUrlError(f"{parts.hostname} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise UnsafeUrlError(f"{parts.hostname} has no address")
    if not allow_private:
        for address in addresses:
            _refuse_private(ipaddress.ip_address(address))
    return addresses[0]


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> Answer:
    """POST ``body`` to ``url`` once; never raises for what the receiver or network does."""
    allow_private = settings.webhooks_may_reach_private_networks
    started = time.monotonic()

    def answer(status: int | None, error: str | None = None) -> Answer:
        return Answer(status, int((time.monotonic() - started) * 1000), error)

    try:
        parts = check_url(url, allow_private)
        address = resolve(parts, allow_private)
    except UnsafeUrlError as exc:
        return answer(None, str(exc))
    assert parts.hostname is not None
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    pinned = parts._replace(netloc=netloc).geturl()
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    timeout = httpx.Timeout(
        settings.webhook_timeout_seconds, connect=settings.webhook_connect_timeout_seconds
    )
    request_headers = {
        **headers,
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    try:
        with _shared_client().stream(
            "POST",
            pinned,
            content=body,
            headers=request_headers,
            extensions=extensions,
            timeout=timeout,
            follow_redirects=False,
        ) as response:
            read, deadline = 0, started + settings.webhook_timeout_seconds
            for chunk in response.iter_bytes():
                read += len(chunk)
                if read >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
                    break  # the status is known; the rest of the body is not needed
            return answer(response.status_code)
    except httpx.HTTPError as exc:
        return answer(None, f"{type(exc).__name__}: {exc}"[:500])
