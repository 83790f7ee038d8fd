"""celery beat: the daily cleanup on a crontab (a restart never pushes it back), its schedule
file where ``CELERY_BEAT_SCHEDULE_FILENAME`` says, and only one beat active at a time."""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.schedules import crontab

from tests.support.reliability import PROJECT_ROOT
from worker.processes import BIN_DIR, ManagedProcess

pytestmark = pytest.mark.e2e

BROKER_DB = 15


def test_the_cleanup_runs_daily_at_a_fixed_hour_whenever_beat_restarts(services):
    from worker.celery import beat_schedule
    from worker.settings import Settings

    entry = beat_schedule(Settings(app_env="development", cleanup_crontab_hour=5))["cleanup-drafts"]
    schedule = entry["schedule"]
    assert isinstance(schedule, crontab)
    assert schedule.hour == {5} and schedule.minute == {0}
    # Beat restarted at 04:50 (a release): the cleanup still runs at 05:00, not 24 h later.
    restarted = datetime(2026, 3, 2, 4, 50, tzinfo=UTC)
    schedule.nowfun = lambda: restarted
    assert schedule.remaining_estimate(restarted) == timedelta(minutes=10)
    # Beat was down at 05:00 and comes back at 07:00: the run is due at once (the schedule file
    # remembers yesterday's run).
    back = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
    schedule.nowfun = lambda: back
    assert schedule.is_due(datetime(2026, 3, 1, 5, 0, tzinfo=UTC)).is_due
    assert entry["options"]["expires"] <= 24 * 3600


def _beat(tmp_path: Path, env: dict[str, str], name: str) -> ManagedProcess:
    cmd = [str(BIN_DIR / "celery"), "-A", "worker", "beat", "--loglevel", "INFO"]
    return ManagedProcess(name, cmd, env, tmp_path, PROJECT_ROOT)


def test_a_second_beat_exits_while_the_first_runs(
    services: dict[str, Any], tmp_path: Path, guarantee: Any
) -> None:
    import os

    url = services["broker"].rsplit("/", 1)[0] + f"/{BROKER_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    schedule_file = tmp_path / "state" / "celerybeat-schedule"
    schedule_file.parent.mkdir()
    env = {
        **os.environ,
        "APP_ENV": "development",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'beat.db'}",
        "CELERY_BROKER_URL": url,
        "CELERY_BEAT_SCHEDULE_FILENAME": str(schedule_file),
    }
    first = _beat(tmp_path, env, "beat-1")
    procs = [first]
    try:
        deadline = time.monotonic() + 60
        while "beat: Starting..." not in first.log_tail():
            assert first.alive(), first.log_tail()
            assert time.monotonic() < deadline, first.log_tail()
            time.sleep(0.2)

        second = subprocess.run(
            [str(BIN_DIR / "celery"), "-A", "worker", "beat", "--loglevel", "INFO"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: another celery beat is running"), lines
        assert first.alive(), first.log_tail()
        from worker.beat_lock import BEAT_LOCK_KEY, BEAT_LOCK_TTL

        holder = client.get(BEAT_LOCK_KEY)
        assert holder is not None and 0 < client.ttl(BEAT_LOCK_KEY) <= BEAT_LOCK_TTL
        # The schedule lives where it was told to (a volume in docker-compose.yml).
        assert list(schedule_file.parent.iterdir()), "no schedule file written"

        # Stopped cleanly, the first beat hands the lock over at once.
        first.stop()
        assert client.get(BEAT_LOCK_KEY) is None
        third = _beat(tmp_path, env, "beat-3")
        procs.append(third)
        deadline = time.monotonic() + 60
        while client.get(BEAT_LOCK_KEY) in (None, holder):
            assert third.alive(), third.log_tail()
            assert time.monotonic() < deadline, third.log_tail()
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.stop()
        client.flushdb()
        client.close()
    guarantee("second celery beat started", beats_started=3, second_exited=1, lost=0)
