"""``./dev serve`` is the real stack and says how to use it: celery beat runs (with the
single-beat lease), the printed presigned URL fetches the published file without credentials,
the printed ``export`` line points ``python -m worker.cli`` at this stack, and the run's folder
under ``var/`` is removed at stop (``--keep`` keeps it)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.reliability.test_embedded_signals import START_TIMEOUT, STOP_TIMEOUT, Serve
from tests.support.reliability import PROJECT_ROOT
from worker.processes import BIN_DIR

pytestmark = pytest.mark.e2e


def _line(lines: list[str], pattern: str) -> re.Match[str]:
    found = next((m for line in lines if (m := re.search(pattern, line))), None)
    assert found is not None, (pattern, lines[-30:])
    return found


def _cli_env(lines: list[str]) -> dict[str, str]:
    words = shlex.split(_line(lines, r"^\s*export (.*)$").group(1))
    return dict(word.split("=", 1) for word in words)


def test_serve_runs_beat_and_prints_commands_that_work(tmp_path: Path) -> None:
    stack = Serve(signal.SIGTERM)
    try:
        assert stack.ready.wait(START_TIMEOUT), "\n".join(stack.lines[-40:])
        lines = stack.lines
        assert lines[0].startswith("starting Redis"), lines[:3]  # progress while it starts
        folder = Path(_line(lines, r"logs and database: (\S+) \(removed at stop").group(1))
        assert folder.is_dir() and folder.parent == PROJECT_ROOT / "var"
        # beat: started, and holding the single-beat lease on this stack's broker.
        env = _cli_env(lines)
        beat_log = (folder / "beat.log").read_text()
        assert "beat: Starting..." in beat_log, beat_log[-2000:]
        import redis

        from worker.beat_lock import BEAT_LOCK_KEY

        broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
        assert broker.get(BEAT_LOCK_KEY) is not None  # held by this stack's beat
        broker.close()
        # The published file, with no credentials.
        url = _line(lines, r"curl -s '([^']+)'").group(1)
        published = httpx.get(url, timeout=10)
        assert published.status_code == 200, published.text
        assert json.loads(published.text)["deployment_id"]
        # The operator CLI, pointed at this stack by the printed line.
        clean = {k: v for k, v in os.environ.items() if k not in env}
        out = subprocess.run(
            [str(BIN_DIR / "python"), "-m", "worker.cli", "cleanup", "--dry-run"],
            cwd=PROJECT_ROOT,
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "would be archived" in out.stdout, out.stderr[-2000:]
        os.kill(stack.proc.pid, signal.SIGTERM)
        assert stack.proc.wait(timeout=STOP_TIMEOUT) == 0
        assert not folder.exists()  # removed at stop
    finally:
        if stack.proc.poll() is None:
            stack.kill_all()
            stack.proc.wait(timeout=30)
