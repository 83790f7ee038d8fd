"""``python -m worker.cli redeploy``: a real subprocess, a real in-process worker."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import PROJECT_ROOT


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "redeploy", *args],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_redeploy_follows_progress_and_exits_zero(sqlite_database, org, celery_worker):
    p = org.purpose()
    widgets = [org.widget([p]) for _ in range(3)]
    for w in widgets:
        assert org.wait_deployment(org.deploy(w["id"])["id"])["status"] == "success"
    out = cli("--organization", org.id, "--purpose", p["id"], "--reason", "from a shell")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "success: 3 succeeded, 0 failed of 3" in out.stdout
    deps = org.req("GET", "/widgets/deployments", params={"created_by": "admin"}).json()
    assert sorted(d["widget_id"] for d in deps) == sorted(w["id"] for w in widgets)
    assert {d["reason"] for d in deps} == {"from a shell"}


def test_redeploy_exits_non_zero_when_a_deployment_fails(
    sqlite_database, org, celery_worker, s3_faults
):
    w = org.widget()
    s3_faults.fail_next("PUT", 403)  # permanent: that deployment fails at once
    out = cli("--organization", org.id, "--widget", w["id"])
    assert s3_faults.count("PUT", 403) == 1, "the fault did not land"
    assert out.returncode == 1, out.stdout + out.stderr
    assert "failure: 0 succeeded, 1 failed of 1" in out.stdout


def test_redeploy_refuses_unknown_ids_with_one_line(sqlite_database, org):
    out = cli("--organization", org.id, "--widget", "no-such-widget")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: widget(s) not found")
