"""The README's walkthrough is a test: its ``bash`` blocks run, in order, in one shell, against
``./dev serve`` (the real embedded stack), so the README cannot drift from what the service does.

The one change made to the commands: ``var/dev.env`` is this stack's own env file (so a
developer's running ``./dev serve`` is never touched)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import pytest

from tests.conftest import PROJECT_ROOT
from tests.reliability.test_embedded_signals import START_TIMEOUT, STOP_TIMEOUT, Serve

pytestmark = pytest.mark.e2e

SECTION = re.compile(r"^## Walkthrough\n(.*?)^## ", re.S | re.M)
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def walkthrough_commands() -> list[str]:
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = SECTION.search(readme)
    assert section is not None, "README has no ## Walkthrough section"
    blocks = BLOCK.findall(section.group(1))
    assert len(blocks) >= 8, blocks
    return blocks


@pytest.mark.skipif(shutil.which("jq") is None, reason="the walkthrough uses jq")
def test_the_readme_walkthrough_runs_against_dev_serve() -> None:
    blocks = walkthrough_commands()
    stack = Serve(signal.SIGTERM)
    try:
        assert stack.ready.wait(START_TIMEOUT), "\n".join(stack.lines[-40:])
        script = "set -euo pipefail\n" + "\n".join(blocks).replace(
            "var/dev.env", str(stack.env_file)
        )
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}
        for name in ("API", "DATABASE_URL", "CELERY_BROKER_URL", "APP_ENV", "ADMIN_TOKEN"):
            clean.pop(name, None)
        out = subprocess.run(
            ["bash", "-c", script],
            cwd=PROJECT_ROOT,
            env=clean,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}"
        text = out.stdout
        # What each step says it shows, shown.
        assert '"docs":"/docs"' in text  # 1: the index
        assert text.count('"status":"success"') >= 4, text  # 3, 5, 6, 7: deployments, bulk
        assert '"widget":"Preference centre"' in text  # 4: the published file
        assert "unpublished_changes" in text  # 5: after the edit
        assert '"path":"/widget/name"' in text  # 5: the diff names the edit
        assert '"result":"archived"' in text  # 8: the archive job
        assert "would be archived" in text and "re-sent" in text  # 9: the CLI
    finally:
        if stack.proc.poll() is None:
            os.kill(stack.proc.pid, signal.SIGTERM)
            try:
                stack.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                stack.kill_all()
                stack.proc.wait(timeout=30)
