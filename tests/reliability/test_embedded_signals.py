"""``./dev serve`` (``python -m worker.embedded serve``) is a well-behaved long-running process:
SIGTERM, SIGINT and SIGHUP stop every process it started (nothing left alive or listening), and
its output is line-buffered (a pipe sees the URLs as soon as they are printed)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.reliability import PROJECT_ROOT
from worker.processes import BIN_DIR, port_open

pytestmark = pytest.mark.e2e

START_TIMEOUT = 240.0  # three stacks start at once on a small machine
STOP_TIMEOUT = 90.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _children(pid: int) -> dict[int, int]:
    """pid -> parent pid of every process."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    parents = _children(pid)
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        nxt = {p for p, parent in parents.items() if parent in frontier and p not in found}
        found |= nxt
        frontier = nxt
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its new parent has not reaped it yet)


class Serve:
    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig
        env = {**os.environ, "WORKER_CONCURRENCY": "1"}
        env.pop("PYTHONUNBUFFERED", None)  # line buffering must come from the program itself
        # Its own env file: never the developer's var/dev.env.
        self.env_file = Path(tempfile.mkdtemp(prefix="serve-env-")) / "dev.env"
        self.proc = subprocess.Popen(
            [
                str(BIN_DIR / "python"),
                "-m",
                "worker.embedded",
                "serve",
                "--env-file",
                str(self.env_file),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if "stops everything" in line:
                self.ready.set()

    def ports(self) -> set[int]:
        text = "\n".join(self.lines)
        return {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}

    def kill_all(self) -> None:
        """Clean-up if the test failed half-way (by PID, never by name)."""
        for pid in descendants(self.proc.pid) | {self.proc.pid}:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_serve_stops_everything_it_started_on_sigterm_sigint_and_sighup(guarantee: Any) -> None:
    stacks = [Serve(sig) for sig in SIGNALS]
    try:
        for stack in stacks:
            assert stack.ready.wait(START_TIMEOUT), "\n".join(stack.lines[-40:])
        results = []
        for stack in stacks:
            started = descendants(stack.proc.pid)
            ports = stack.ports()
            assert len(started) >= 5 and len(ports) >= 4, (started, stack.lines)
            assert all(port_open(p) for p in ports)
            t0 = time.monotonic()
            os.kill(stack.proc.pid, stack.sig)
            code = stack.proc.wait(timeout=STOP_TIMEOUT)
            seconds = time.monotonic() - t0
            deadline = time.monotonic() + 10
            while any(alive(p) for p in started) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = sorted(p for p in started if alive(p))
            listening = sorted(p for p in ports if port_open(p))
            results.append((stack.sig.name, code, seconds, left, listening))
        for name, code, _, left, listening in results:
            assert (left, listening) == ([], []), (name, left, listening)
            assert code == 0, (name, code)
    finally:
        for stack in stacks:
            if stack.proc.poll() is None or descendants(stack.proc.pid):
                stack.kill_all()
            stack.proc.wait(timeout=30)
    guarantee(
        "./dev serve receives SIGTERM / SIGINT / SIGHUP",
        signals=len(results),
        processes_left=0,
        ports_left=0,
        stop_s=[round(r[2], 1) for r in results],
    )
