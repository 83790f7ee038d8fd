"""``./dev test`` (pytest) stops on a signal and stops everything it started: Ctrl-C (SIGINT to its
process group, as a terminal sends it) or SIGTERM to its PID ends the run through every fixture's
clean-up, and a second Ctrl-C during that clean-up kills what is left at once. Either way no
process of the run is left alive and none of its ports still listens.

Each case runs ``tests/support/interrupted_run.py`` (the session's Redis and moto, the in-process
Celery worker, a ``uvicorn`` subprocess) in a pytest of its own, all three at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.reliability.test_embedded_signals import alive, descendants
from tests.support.reliability import PROJECT_ROOT
from worker.processes import BIN_DIR, port_open

pytestmark = pytest.mark.e2e

START_TIMEOUT = 240.0  # three runs start their services at once on a small machine
STOP_TIMEOUT = 60.0  # well under the run's own bound (tests/conftest.py STOP_GRACE_SECONDS)
TARGET = "tests/support/interrupted_run.py"
PYTEST_ARGS = [TARGET, "-p", "no:randomly", "-p", "no:cacheprovider", "--timeout=0", "-q"]


@dataclass
class Run:
    name: str
    via_dev: bool
    signals: list[signal.Signals]
    to_group: bool
    work: Path
    proc: subprocess.Popen[bytes] | None = None
    started: set[int] = field(default_factory=set)
    ports: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.work.mkdir()
        cmd = ["./dev", "test"] if self.via_dev else [str(BIN_DIR / "python"), "-m", "pytest"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env["INTERRUPTED_RUN_READY"] = str(self.ready_file)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, *PYTEST_ARGS, "--basetemp", str(self.work / "tmp")],
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a Ctrl-C reaches it, not this run
            )

    @property
    def ready_file(self) -> Path:
        return self.work / "ready.json"

    @property
    def log(self) -> Path:
        return self.work / "pytest.log"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.to_group:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def kill_all(self) -> None:
        """Clean-up if the test failed half-way (by PID, never by name)."""
        if self.proc is None:
            return
        for pid in descendants(self.proc.pid) | self.started | {self.proc.pid}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def test_interrupted_test_runs_stop_every_process_they_started(tmp_path: Path) -> None:
    runs = [
        Run("Ctrl-C on ./dev test", True, [signal.SIGINT], True, tmp_path / "sigint"),
        Run("SIGTERM", False, [signal.SIGTERM], False, tmp_path / "sigterm"),
        Run("Ctrl-C twice", False, [signal.SIGINT] * 2, True, tmp_path / "twice"),
    ]
    try:
        for run in runs:
            run.start()
        deadline = time.monotonic() + START_TIMEOUT
        for run in runs:
            assert run.proc is not None
            while not run.ready_file.exists():
                assert run.proc.poll() is None, run.output()[-3000:]
                assert time.monotonic() < deadline, run.output()[-3000:]
                time.sleep(0.2)
            ready = json.loads(run.ready_file.read_text())
            run.started = descendants(run.proc.pid)
            run.ports = ready["ports"]
            assert set(ready["pids"]) <= run.started, (ready, run.started)
            assert len(run.ports) == 3 and all(port_open(p) for p in run.ports), ready

        results = []
        for run in runs:
            assert run.proc is not None
            t0 = time.monotonic()
            for i, sig in enumerate(run.signals):
                if i:
                    time.sleep(0.5)  # during the clean-up the first one started
                run.send(sig)
            code = run.proc.wait(timeout=STOP_TIMEOUT)
            seconds = time.monotonic() - t0
            until = time.monotonic() + 10
            while any(alive(p) for p in run.started) and time.monotonic() < until:
                time.sleep(0.2)
            left = sorted(p for p in run.started if alive(p))
            listening = sorted(p for p in run.ports if port_open(p))
            results.append((run, code, seconds, left, listening))

        problems = []
        for run, code, seconds, left, listening in results:
            out = run.output()[-3000:]
            if (left, listening) != ([], []):
                problems.append((run.name, "left alive", left, "listening", listening, out))
            if len(run.signals) == 1:  # pytest's own interruption, with every clean-up
                if code != pytest.ExitCode.INTERRUPTED or "killing every process" in out:
                    problems.append((run.name, "not a clean interruption", code, out))
            elif code not in (128 + signal.SIGINT, pytest.ExitCode.INTERRUPTED):
                # The second signal cut the clean-up short (or came after it).
                problems.append((run.name, "exit code", code, out))
            if seconds >= STOP_TIMEOUT:
                problems.append((run.name, "took", seconds))
        assert problems == []
    finally:
        for run in runs:
            run.kill_all()
