"""``uvicorn api_stub.app:app`` as a real subprocess on a free loopback port, with a fresh
migrated SQLite database of its own, stopped by PID (its whole process group) on exit."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from worker.processes import BIN_DIR, ManagedProcess, free_port, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def uvicorn_api(
    work_dir: Path, env: Mapping[str, str] | None = None, timeout: float = 60
) -> Iterator[str]:
    """Start the API (environment: ``env`` or this process's, with a new database under
    ``work_dir``); yields its base URL once ``/health`` answers 200, within ``timeout``."""
    from tests.conftest import migrate

    db_url = f"sqlite:///{work_dir / 'api.db'}"
    migrate(db_url)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN_DIR / "uvicorn"), "api_stub.app:app", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--log-level", "warning"]
    full_env = {**(env if env is not None else os.environ), "DATABASE_URL": db_url}
    proc = ManagedProcess("api", cmd, full_env, work_dir, PROJECT_ROOT)

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"the API exited:\n{proc.log_tail()}")
        return _healthy(base_url)

    try:
        try:
            wait_until(ready, timeout, "the API's /health")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- api log ---\n{proc.log_tail()}") from None
        yield base_url
    finally:
        proc.stop()
