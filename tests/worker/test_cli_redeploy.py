"""``python -m worker.cli redeploy``: a real subprocess, a real in-process worker; its messages
are true (a job it could not send is sent by the reconciler, as it says)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from sqlmodel import select

from tests.conftest import PROJECT_ROOT
from tests.support.jobs import poll
from worker import producer
from worker.db import unit_of_work
from worker.models import BulkJob, utcnow
from worker.processes import free_port
from worker.services.reconcile import RESEND_AFTER
from worker.settings import get_settings
from worker.tasks.maintenance import reconcile_and_resend


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


def test_redeploy_while_the_broker_is_down_says_when_the_reconciler_sends_it(
    sqlite_database, org, celery_worker
):
    """The command's promise is kept: the job it could not send is sent by the reconciler (run
    here as beat would run it) and the command, still following, sees it finish."""
    widgets = [org.widget()["id"] for _ in range(2)]
    env = {**os.environ, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    args = ["redeploy", "--organization", org.id, "--widget", *widgets, "--timeout", "100"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def created() -> str | None:
            with unit_of_work() as s:
                return s.exec(select(BulkJob.id).where(BulkJob.organization_id == org.id)).first()

        bulk_id = poll(created, 30, "the CLI's bulk job")
        assert not producer.jobs_in_broker().has_bulk(bulk_id)
        # RESEND_AFTER later (moved back rather than waited for), the reconciler's run sends it.
        with unit_of_work() as s:
            job = s.get(BulkJob, bulk_id)
            assert job is not None
            job.enqueued_at = utcnow() - timedelta(seconds=RESEND_AFTER + 5)
            s.add(job)
        assert (org.id, bulk_id) in reconcile_and_resend().bulks
        out, err = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    bound = get_settings().reconcile_schedule_seconds + RESEND_AFTER
    assert "the broker did not take the job" in err and f"within {bound:.0f}s" in err, err
    assert "success: 2 succeeded, 0 failed of 2" in out
