"""A real uvicorn server in a thread of the test process (same settings and database as the
TestClient fixtures), for what only a real server shows: ``100 Continue``, stalled and chunked
bodies, connections kept alive or closed. Plus a raw-socket HTTP/1.1 exchange."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port; yields ``host:port``."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class RawResponse:
    def __init__(self, head: bytes, body: bytes, closed: bool) -> None:
        self.raw_head = head
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        self.body = body
        self.closed = closed  # the server closed the connection after this response


def connect(address: str, timeout: float = 10) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[list[bytes], RawResponse]:
    """Read interim (1xx) heads and one final response; returns (interim status lines, final)."""
    sock.settimeout(timeout)
    buf = b""
    interim: list[bytes] = []
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a full response head: {buf!r}")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 1"):
            interim.append(head.split(b"\r\n")[0])
            continue
        break
    headers = RawResponse(head, b"", False).headers
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    body, rest = buf[:length], buf[length:]
    closed = False
    if not rest:
        sock.settimeout(0.5)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return interim, RawResponse(head, body, closed)


def request_head(method: str, target: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: test",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
