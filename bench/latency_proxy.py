"""A loopback TCP proxy in front of the S3 server that delays and counts HTTP requests.

    python -m bench.latency_proxy --upstream http://127.0.0.1:PORT --port PORT [--delay-ms N]

The client-to-server stream of each connection is parsed just enough to find request
boundaries (request line, headers, ``Content-Length`` body; a chunked body ends when the server
starts answering). The first bytes of each new request are forwarded ``delay-ms`` later, so every
request, on a new or a kept-alive connection, pays one simulated round trip; responses and the
rest of a request pass straight through. Requests are counted per ``METHOD path``.

Control (answered by the proxy itself, never forwarded), on a connection of its own:
``GET /__bench__/count?method=PUT&path=/bucket/key`` → ``{"count": n}``,
``GET /__bench__/totals`` → ``{"PUT": n, "GET": n, ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import urllib.request
from collections import Counter
from urllib.parse import parse_qs, quote, unquote, urlsplit

CONTROL_PREFIX = b"GET /__bench__/"
MAX_HEADER = 64 * 1024


class RequestTracker:
    """Where the client-to-server byte stream of one connection is, request by request."""

    def __init__(self, counts: Counter[str], totals: Counter[str]) -> None:
        self.counts, self.totals = counts, totals
        self.idle = True  # the next byte starts a new request
        self.header = bytearray()
        self.body_left = 0
        self.until_response = False  # chunked body: ends when the server answers

    def take(self, data: bytes, pos: int) -> int:
        """Consume bytes of the current request from ``data[pos:]``; return the new position."""
        self.idle = False
        if self.until_response:
            return len(data)
        if self.body_left:
            take = min(self.body_left, len(data) - pos)
            self.body_left -= take
            if self.body_left == 0:
                self._reset()
            return pos + take
        # Still in the headers; the blank line may straddle two reads.
        old = len(self.header)
        self.header += data[pos:]
        end = self.header.find(b"\r\n\r\n", max(0, old - 3))
        if end == -1:
            if len(self.header) > MAX_HEADER:  # not HTTP as we know it: pass it through
                self.until_response = True
            return len(data)
        del self.header[end + 4 :]
        return self._headers_complete(pos + end + 4 - old, data)

    def _headers_complete(self, pos: int, data: bytes) -> int:
        lines = bytes(self.header).split(b"\r\n")
        parts = lines[0].split(b" ")
        method = parts[0].decode("latin-1")
        path = unquote(parts[1].decode("latin-1").split("?", 1)[0]) if len(parts) > 1 else ""
        self.counts[f"{method} {path}"] += 1
        self.totals[method] += 1
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value.strip() or 0)
            elif key == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            self.until_response = True
            return len(data)
        if length == 0:
            self._reset()
            return pos
        self.body_left = length
        return pos

    def _reset(self) -> None:
        self.idle, self.header, self.body_left, self.until_response = True, bytearray(), 0, False

    def response_started(self) -> None:
        if self.until_response:
            self._reset()


class LatencyProxy:
    def __init__(self, upstream: str, delay_ms: float) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.delay = delay_ms / 1000
        self.counts: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(65536)
            if not first:
                return
            if first.startswith(CONTROL_PREFIX):
                await self._control(first, writer)
                return
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        tracker = RequestTracker(self.counts, self.totals)
        upload = asyncio.create_task(self._client_to_server(first, reader, up_writer, tracker))
        download = asyncio.create_task(self._server_to_client(up_reader, writer, tracker))
        _, pending = await asyncio.wait({upload, download}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for w in (writer, up_writer):
            w.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await w.wait_closed()

    async def _client_to_server(
        self,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tracker: RequestTracker,
    ) -> None:
        data = first
        with contextlib.suppress(OSError):
            while data:
                pos, out = 0, bytearray()
                while pos < len(data):
                    if tracker.idle:
                        if out:  # the end of the previous request goes out first
                            writer.write(out)
                            out = bytearray()
                        if self.delay:
                            await asyncio.sleep(self.delay)
                    new_pos = tracker.take(data, pos)
                    out += data[pos:new_pos]
                    pos = new_pos
                writer.write(out)
                await writer.drain()
                data = await reader.read(65536)
            with contextlib.suppress(OSError):
                writer.write_eof()

    async def _server_to_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tracker: RequestTracker
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                tracker.response_started()
                writer.write(data)
                await writer.drain()

    async def _control(self, first: bytes, writer: asyncio.StreamWriter) -> None:
        target = first.split(b" ", 2)[1].decode("latin-1")
        url = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/__bench__/count":
            payload: object = {"count": self.counts[f"{query.get('method')} {query.get('path')}"]}
        elif url.path == "/__bench__/totals":
            payload = dict(self.totals)
        else:
            payload = {"error": "unknown control path"}
        body = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


class ProxyControl:
    """Client side of the control interface, used by the benchmark process."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str) -> dict[str, int]:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:  # loopback only
            data: dict[str, int] = json.loads(resp.read())
            return data

    def count(self, method: str, path: str) -> int:
        return self._get(f"/__bench__/count?method={method}&path={quote(path, safe='/')}")["count"]

    def totals(self) -> dict[str, int]:
        return self._get("/__bench__/totals")


async def serve(upstream: str, port: int, delay_ms: float) -> None:
    proxy = LatencyProxy(upstream, delay_ms)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.upstream, args.port, args.delay_ms))


if __name__ == "__main__":
    main()
