"""A test run to interrupt, for ``tests/reliability/test_test_run_signals.py``: never collected by
the suite (not named ``test_*.py``), only run by name in a pytest of its own.

Its one test starts what a real run does (the session's Redis and moto, the in-process Celery
worker, a ``uvicorn`` subprocess), writes their process ids and ports as JSON to the file named by
``INTERRUPTED_RUN_READY``, and waits to be stopped by a signal.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.support.api_server import uvicorn_api
from worker.processes import running


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def test_wait_for_a_stop_signal(services: dict[str, Any], celery_worker: Any, tmp_path: Path):
    with uvicorn_api(tmp_path) as api_url:
        ready = {
            "pids": [p.pid for p in running()],
            "ports": [_port(u) for u in (services["broker"], services["moto_url"], api_url)],
        }
        path = Path(os.environ["INTERRUPTED_RUN_READY"])
        path.with_suffix(".tmp").write_text(json.dumps(ready))
        path.with_suffix(".tmp").rename(path)
        time.sleep(600)
