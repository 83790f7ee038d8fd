"""``/docs`` renders in a real browser, offline: headless Debian Chromium loads the page from a
real uvicorn server and Swagger UI lists every operation of ``/openapi.json`` with the
Authorize button, and the page asks nothing of any host but the API's own.

The page is loaded under a non-loopback host name (``docs.test``, mapped to 127.0.0.1 inside
Chromium), as a deployment would serve it: Swagger UI treats localhost specially (its online
validator badge, for one), so loading it from 127.0.0.1 could hide a call out. Everything else
Chromium would send goes to a loopback proxy that refuses it, and every other name fails to
resolve, so nothing leaves the machine; the page's own requests are read from Chromium's net
log.

Skipped when Chromium is not installed, unless ``REQUIRE_CHROMIUM`` is set (CI), where its
absence is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.api_server import uvicorn_api

DEBIAN_CHROMIUM = "/usr/bin/chromium"
DOCS_HOST = "docs.test"  # resolved to 127.0.0.1 by Chromium's own host rules
CHROMIUM_TIMEOUT_SECONDS = 120


def find_chromium() -> str | None:
    return shutil.which("chromium") or (
        DEBIAN_CHROMIUM if os.access(DEBIAN_CHROMIUM, os.X_OK) else None
    )


def chromium_required() -> bool:
    return os.environ.get("REQUIRE_CHROMIUM", "") not in ("", "0")


# Skipped before any service is started; with REQUIRE_CHROMIUM the test runs and fails.
pytestmark = pytest.mark.skipif(
    find_chromium() is None and not chromium_required(),
    reason="chromium is not installed (apt-get install chromium; REQUIRE_CHROMIUM=1 in CI)",
)


def chromium_binary() -> str:
    found = find_chromium()
    if found is None:
        pytest.fail("REQUIRE_CHROMIUM is set but chromium is missing (apt-get install chromium)")
    return found


REFUSAL = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class RefusingProxy(socketserver.ThreadingTCPServer):
    """An HTTP proxy on loopback that forwards nothing: it records each request line
    (``GET http://…`` or ``CONNECT host:443``) and answers 403."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _RefusingHandler)
        self.port: int = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


class _RefusingHandler(socketserver.StreamRequestHandler):
    server: RefusingProxy

    def handle(self) -> None:
        self.server.requests.append(self.rfile.readline(8192).decode("latin-1").strip())
        self.wfile.write(REFUSAL)


@pytest.fixture(scope="module")
def api_url(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chromium_binary()  # fail before starting the API when Chromium is required and missing
    env = {**os.environ, "S3_ENDPOINT_URL": services["moto_url"]}
    with uvicorn_api(tmp_path_factory.mktemp("docs-api"), env) as base_url:
        yield base_url


def load_page(url: str, work: Path) -> tuple[str, list[dict[str, Any]], list[str]]:
    """Load ``url`` in headless Chromium; returns (the DOM after 15 s of virtual time, the URL
    requests of the net log, the request lines the refusing proxy received)."""
    binary = chromium_binary()
    netlog = work / "netlog.json"
    args = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={work / 'profile'}",
        f"--host-resolver-rules=MAP {DOCS_HOST} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--proxy-bypass-list={DOCS_HOST}",
        f"--log-net-log={netlog}",
        "--virtual-time-budget=15000",
        "--dump-dom",
    ]
    proxy = RefusingProxy()
    try:
        args.insert(-1, f"--proxy-server=http://127.0.0.1:{proxy.port}")
        dom_path, log_path = work / "dom.html", work / "chromium.log"
        with dom_path.open("wb") as out, log_path.open("wb") as err:
            proc = subprocess.Popen(
                [*args, url],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=CHROMIUM_TIMEOUT_SECONDS)
            finally:
                # Chromium's helpers (zygote, renderers, crashpad) are in its process group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        proxy.close()
    return dom_path.read_text(), url_requests(netlog), proxy.requests


def url_requests(netlog: Path) -> list[dict[str, Any]]:
    """The parameters of every URL request Chromium started (URL_REQUEST_START_JOB events)."""
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short: Chromium documents this repair
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    events = [e for e in log["events"] if e["type"] == start_job]
    return [e["params"] for e in events if "url" in e.get("params", {})]


def rendered_operations(dom: str) -> set[tuple[str, str]]:
    """(method, path) of every operation block Swagger UI rendered."""
    found = re.findall(r'class="opblock opblock-(\w+)[^"]*".*?data-path="([^"]+)"', dom, re.S)
    return {(method, path) for method, path in found}


def test_swagger_ui_renders_every_operation_without_calling_out(api_url, tmp_path):
    spec = httpx.get(f"{api_url}/openapi.json", timeout=10).json()
    documented = {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "put", "post", "patch", "delete")
    }
    port = urlsplit(api_url).port
    origin = f"http://{DOCS_HOST}:{port}"

    dom, requests, proxied = load_page(f"{origin}/docs", tmp_path)

    # Swagger UI rendered the document: every operation, the Authorize button, no error box.
    assert "swagger-ui" in dom and "errors-wrapper" not in dom, dom[-3000:]
    assert {("get", "/widgets"), ("post", "/widgets"), ("post", "/widgets/{widget_id}/assets")} <= (
        rendered_operations(dom)
    )
    assert rendered_operations(dom) == documented
    assert re.search(r'<button class="btn authorize[^"]*"', dom), "no Authorize button"
    assert spec["info"]["title"] in dom

    # The page's own requests (those of its network isolation site) went to the API only, and
    # include what it needs, so the attribution is not vacuous.
    page = [r for r in requests if f"http://{DOCS_HOST}" in r.get("network_isolation_key", "")]
    page += [r for r in requests if r.get("initiator") == origin]
    elsewhere = sorted({r["url"] for r in page if urlsplit(r["url"]).hostname != DOCS_HOST})
    assert not elsewhere, f"/docs requested other hosts: {elsewhere} (proxy saw {proxied})"
    paths = {urlsplit(r["url"]).path for r in page}
    assert {"/docs", "/docs/assets/swagger-ui-bundle.js", "/openapi.json"} <= paths, paths
