"""A worker refuses to start against a store that ignores conditional writes (``If-None-Match``
dropped by the proxy: exit 2, one ``error:`` line), and starts against one that honours them.

Real ``celery -A worker worker`` subprocesses (``tests/support/publish_workers.py``) on this
module's own Redis database.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.chaos_s3 import ChaosS3Proxy
from tests.support.publish_workers import Broker, chaos_proxy, own_broker, ready, workers

pytestmark = pytest.mark.e2e

# This module's own Redis database: unique across tests/ (grep BROKER_DB; the session uses 0).
BROKER_DB = 7
REFUSAL_TIMEOUT = 60.0


@pytest.fixture
def broker(services: dict[str, Any]) -> Iterator[Broker]:
    yield from own_broker(services["broker"], BROKER_DB)


@pytest.fixture
def proxy(services: dict[str, Any]) -> Iterator[ChaosS3Proxy]:
    yield from chaos_proxy(services["moto_url"])


def test_worker_refuses_a_store_that_ignores_conditional_writes(
    sqlite_database, services, broker, proxy, tmp_path
):
    """The same command against a store that drops ``If-None-Match`` (refused: exit 2, one
    ``error:`` line) and against one that honours it (stays up). Both start at once."""
    proxy.strip_conditional_headers = True
    honest = ChaosS3Proxy(services["moto_url"])
    try:
        with (
            workers(tmp_path, broker, proxy) as start_stripped,
            workers(tmp_path, broker, honest) as start_honest,
        ):
            refused = start_stripped("--concurrency", "1", wait_ready=False)
            accepted = start_honest("--concurrency", "1", wait_ready=False)
            t0 = time.monotonic()
            try:
                # ~10 s on an idle 2-core machine (Celery's start-up); room for a loaded one.
                code = refused.proc.proc.wait(timeout=REFUSAL_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not exit within {REFUSAL_TIMEOUT}s:\n{refused.log()}")
            took = time.monotonic() - t0
            output = refused.log()
            ready(broker, accepted)  # past its start-up probe: it answers a ping
            time.sleep(1)
            assert accepted.proc.alive(), accepted.log(6000)
            assert broker.ping(accepted.name), accepted.log(6000)
            accepted_log = accepted.log()
    finally:
        honest.close()
    assert code == 2, f"exit code {code} after {took:.1f}s:\n{output}"
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "conditional writes" in errors[0], errors
    assert "Traceback" not in output, output
    # The probe's conditional writes reached the store without their condition, and were taken.
    assert proxy.stripped >= 2 and proxy.count("PUT", status=200) >= 2
    assert proxy.count("PUT", status=412) == 0
    # The honest store refused the accepted worker's second probe write, as it must.
    assert honest.stripped == 0 and honest.count("PUT", status=412) >= 1
    assert "error:" not in accepted_log, accepted_log[-6000:]
