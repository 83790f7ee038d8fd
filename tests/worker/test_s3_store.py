"""worker.s3: how S3 failures are classified, and what happens to an S3 call that is interrupted
(Celery's soft time limit) or takes longer than the call budget.

Real botocore exception values, a real aiobotocore client and moto behind a real HTTP proxy
that can hold requests; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
)

import worker.s3
from tests.conftest import BUCKET, reset_process_state
from tests.support.stall import StallingS3Proxy
from worker.s3 import PermanentS3Error, S3Store, TransientS3Error, classify
from worker.settings import get_settings


def client_error(code: str, status: int, kind: type[Exception]) -> Any:
    body = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    exc = ClientError(body, "PutObject")  # type: ignore[arg-type]
    return pytest.param(exc, kind, id=f"{code}-{status}")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        # S3 answers these with a 4xx status, yet they are worth retrying.
        client_error("RequestTimeout", 400, TransientS3Error),
        client_error("OperationAborted", 409, TransientS3Error),
        client_error("SlowDown", 503, TransientS3Error),
        client_error("InternalError", 500, TransientS3Error),
        client_error("AccessDenied", 403, PermanentS3Error),
        client_error("NoSuchBucket", 404, PermanentS3Error),
        client_error("InvalidArgument", 400, PermanentS3Error),
        # Client-side errors: no retry fixes missing credentials or invalid parameters.
        pytest.param(NoCredentialsError(), PermanentS3Error, id="NoCredentialsError"),
        pytest.param(ParamValidationError(report="x"), PermanentS3Error, id="ParamValidation"),
        pytest.param(
            EndpointConnectionError(endpoint_url="http://x"), TransientS3Error, id="EndpointConn"
        ),
    ],
)
def test_classify(exc: Exception, kind: type[Exception]) -> None:
    got = classify(exc, "put k")
    assert type(got) is kind, got
    assert str(got).startswith("S3 put k failed")


class HangUpAwareProxy(StallingS3Proxy):
    """A held request whose client has hung up by the time it is released is dropped.

    The stalling proxy has already read the request; holding it models a request S3 has not
    received yet. A client that cancelled its call closes the connection, and such a request
    must never reach S3; one still pending in the client (its connection open) goes through on
    release, as it would if the client resumed it later.
    """

    def __init__(self, upstream: str) -> None:
        self._conn = threading.local()
        super().__init__(upstream)
        finish = self.server.finish_request

        def remember(request: socket.socket, client_address: Any) -> None:
            self._conn.sock = request  # the per-request thread of ThreadingHTTPServer
            finish(request, client_address)

        self.server.finish_request = remember  # type: ignore[method-assign]

    def _take_fault(self, method: str) -> int | None:
        fault = super()._take_fault(method)  # waits here while the method is stalled
        try:
            data = self._conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return fault  # connection still open, nothing more sent: the client is waiting
        if data == b"":
            raise ConnectionAbortedError("client hung up while its request was held")
        return fault


class Interrupted(Exception):
    """What the SIGALRM handler raises, like billiard's soft time limit raises its exception."""


@pytest.fixture
def stalled_store(services: dict[str, Any]) -> Iterator[tuple[S3Store, HangUpAwareProxy]]:
    """An S3Store (this process's settings) whose endpoint is a stalling proxy in front of moto."""
    proxy = HangUpAwareProxy(services["moto_url"])
    saved = os.environ["S3_ENDPOINT_URL"]
    os.environ["S3_ENDPOINT_URL"] = proxy.url
    reset_process_state()
    store = S3Store(get_settings())
    try:
        yield store, proxy
    finally:
        proxy.release()
        store.close()
        proxy.close()
        os.environ["S3_ENDPOINT_URL"] = saved
        reset_process_state()


def on_s3(s3: Any, key: str) -> bool:
    try:
        s3.head_object(Bucket=BUCKET, Key=key)
    except s3.exceptions.ClientError:
        return False
    return True


def completed_puts(proxy: StallingS3Proxy, key: str) -> list[tuple[str, str, int]]:
    return [r for r in proxy.requests if r[0] == "PUT" and key in r[1]]


def test_interrupted_call_is_cancelled_not_left_pending(stalled_store, s3) -> None:
    store, proxy = stalled_store
    first = f"tests/interrupted/{uuid.uuid4().hex}.json"
    second = f"tests/interrupted/{uuid.uuid4().hex}.json"

    def on_alarm(signum: int, frame: Any) -> None:
        raise Interrupted

    proxy.stall("PUT")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.5)  # how Celery's soft time limit interrupts a task
    try:
        with pytest.raises(Interrupted):
            store.put_json(first, b'{"v":1}', metadata={})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The call was interrupted while S3 had its request in hand. (On a loaded machine botocore
    # may already have retried a first attempt whose connection failed: more than one is held.)
    assert proxy.held >= 1
    assert asyncio.all_tasks(store._loop) == set()  # nothing left to resume later

    proxy.release()
    store.put_json(second, b'{"v":2}', metadata={})  # runs the loop again
    assert on_s3(s3, second)
    deadline = time.monotonic() + 10
    while proxy.held and time.monotonic() < deadline:  # the released request is settled
        time.sleep(0.02)
    assert proxy.held == 0
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:  # and stays so for a moment
        assert not on_s3(s3, first), "the interrupted upload reached S3"
        time.sleep(0.05)
    assert completed_puts(proxy, first) == []
    assert len(completed_puts(proxy, second)) == 1


def test_call_over_budget_is_a_transient_error(stalled_store, s3) -> None:
    store, proxy = stalled_store
    key = f"tests/budget/{uuid.uuid4().hex}.json"
    budget = worker.s3.S3_CALL_BUDGET_SECONDS
    # Timing knob only: the real budget (soft time limit - 15 s) is too long for a test.
    worker.s3.S3_CALL_BUDGET_SECONDS = 1
    # Without a budget the call would wait for botocore's read timeouts: end it sooner.
    watchdog = threading.Timer(10, proxy.release)
    proxy.stall("PUT")
    watchdog.start()
    started = time.monotonic()
    try:
        with pytest.raises(TransientS3Error, match="no answer within"):
            store.put_json(key, b'{"v":1}', metadata={})
    finally:
        watchdog.cancel()
        worker.s3.S3_CALL_BUDGET_SECONDS = budget
    assert time.monotonic() - started < 5
    assert asyncio.all_tasks(store._loop) == set()
    proxy.release()
    store.put_json(f"{key}.after", b'{"v":2}', metadata={})  # the store is still usable
    assert on_s3(s3, f"{key}.after")


@pytest.mark.parametrize(
    ("stripped", "honoured"),
    [
        pytest.param(frozenset(), True, id="both-honoured"),
        pytest.param(frozenset({"If-Match"}), False, id="if-match-ignored"),
        pytest.param(frozenset({"If-None-Match"}), False, id="if-none-match-ignored"),
        pytest.param(True, False, id="both-ignored"),
    ],
)
def test_probe_refuses_a_store_that_ignores_either_condition(
    services: dict[str, Any], stripped: Any, honoured: bool
) -> None:
    """The start-up probe (issue #15, 4): a proxy that drops only ``If-Match`` used to pass it,
    and every publish after a widget's first was then unconditional."""
    from tests.support.chaos_s3 import ChaosS3Proxy

    proxy = ChaosS3Proxy(services["moto_url"])
    proxy.strip_conditional_headers = stripped or False
    store = S3Store(get_settings().model_copy(update={"s3_endpoint_url": proxy.url}))
    try:
        assert store.supports_conditional_writes() is honoured
        # The probe really sent both conditions (and the proxy really dropped what it says).
        assert proxy.count("PUT") >= (2 if not honoured else 3)
        assert bool(proxy.stripped) == bool(stripped)
    finally:
        store.close()
        proxy.close()
