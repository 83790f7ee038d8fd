"""``python -m worker.cli status`` and ``deployments tail`` against a real stack: the session's
Redis, database and in-process worker, the CLI run as the operator runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from tests.conftest import PROJECT_ROOT
from tests.support.jobs import poll


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),  # the session's broker and database
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_reports_queues_workers_and_jobs_by_state(sqlite_database, org, celery_worker):
    done = org.wait_deployment(org.deploy(org.widget()["id"])["id"])
    assert done["status"] == "success", done

    def answered() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]] | None:
        # The session's worker runs a solo pool: it answers a ping only between tasks, so a
        # task another test left running can make one ping time out.
        out = cli("status", "--json")
        report = json.loads(out.stdout)
        return (out, report) if report["workers"] else None

    out, report = poll(answered, 30, "a status with the session's worker answering")
    assert set(report["queues"]) >= {"deployments", "archives", "maintenance"}
    assert report["workers"], report  # the session's worker answered the ping
    assert out.returncode == 0 and report["healthy"], out.stderr
    assert report["jobs"]["deployments"].get("success", 0) >= 1
    assert "oldest_ready_seconds" in report and "beat" in report
    text = cli("status")
    assert text.returncode == 0
    for label in ("queues", "workers", "beat", "deployments", "archive jobs", "bulk jobs"):
        assert label in text.stdout, label


def test_status_exits_1_when_the_broker_cannot_be_read(sqlite_database):
    from worker.processes import free_port

    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status", "--json"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    report = json.loads(out.stdout)
    assert report["queues"] is None and not report["healthy"]
    assert any(p.startswith("broker:") for p in report["problems"]), report


def test_deployments_tail_follows_new_deployments_live(sqlite_database, org, celery_worker):
    first = org.wait_deployment(org.deploy(org.widget()["id"])["id"])
    # Bounded: the command ends by itself after 30 s (then readline() returns at EOF).
    follow = ["--organization", org.id, "--interval", "0.2", "--for", "30"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "deployments", "tail", *follow],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        lines.append(proc.stdout.readline())  # the backlog: the first deployment
        assert first["deployment_id"] in lines[0] and " success " in lines[0], lines
        widget = org.widget()["id"]
        second = org.deploy(widget)["id"]
        done = org.wait_deployment(second)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if done["deployment_id"] in line and " success " in line:
                break
        mine = [line for line in lines if done["deployment_id"] in line]
        assert mine and f"widget {widget}" in mine[-1] and " success " in mine[-1], lines
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_deployments_tail_refuses_an_unsafe_organization_id(sqlite_database):
    out = cli("deployments", "tail", "--organization", "../x", "--for", "0")
    assert out.returncode == 2 and "--organization" in out.stderr
