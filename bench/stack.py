"""The services a benchmark run starts, and stops by PID: Redis, moto S3 behind the latency
proxy, a database (SQLite file, or a fresh database on an existing PostgreSQL server), the API
and a worker with the project's own defaults."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import boto3
import httpx
import psycopg
from sqlalchemy.engine import make_url

from bench import procstat
from bench.latency_proxy import ProxyControl
from worker.processes import (
    BIN_DIR,
    ManagedProcess,
    free_port,
    port_open,
    start_moto,
    start_redis,
    wait_until,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench-widgets"
ADMIN_TOKEN = "bench-admin-token"  # APP_ENV=development only
# Variables of the caller's shell that would change what the children do.
_DROP_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")


class Stack:
    def __init__(
        self,
        postgres_admin_url: str | None,
        s3_latency_ms: float,
        worker_args: tuple[str, ...] = (),
        workers: int = 1,
    ) -> None:
        self.worker_args = worker_args
        self.workers = workers
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.postgres_admin_url = postgres_admin_url
        self.s3_latency_ms = s3_latency_ms
        self.procs: dict[str, ManagedProcess] = {}
        self.pg_database: str | None = None
        self.env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
        self.env["PATH"] = f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        self.api_url = self.bare_url = self.proxy_url = self.moto_url = ""

    @property
    def backend(self) -> str:
        return "postgresql" if self.postgres_admin_url else "sqlite"

    def _spawn(self, name: str, *cmd: str) -> ManagedProcess:
        proc = ManagedProcess(name, cmd, self.env, self.tmp, PROJECT_ROOT)
        self.procs[name] = proc
        return proc

    def start(self, bare_app: bool = False) -> None:
        """Everything up, as much as possible side by side (Python start-up is slow here)."""
        self.env.update(
            {
                "APP_ENV": "development",
                "DATABASE_URL": self._database_url(),
                "S3_BUCKET": BUCKET,
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "ADMIN_TOKEN": ADMIN_TOKEN,
            }
        )
        # The schema only needs DATABASE_URL: it is built while the services come up.
        migrate = subprocess.Popen(
            [str(BIN_DIR / "alembic"), "upgrade", "head"],
            env=self.env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            redis_proc, broker = start_redis(self.tmp, PROJECT_ROOT, self.env)
            self.procs["redis"] = redis_proc
            moto_proc, self.moto_url = start_moto(self.tmp, PROJECT_ROOT, self.env)
            self.procs["moto"] = moto_proc
            port = free_port()
            self._spawn(
                "s3proxy",
                sys.executable,
                "-m",
                "bench.latency_proxy",
                "--upstream",
                self.moto_url,
                "--port",
                str(port),
                "--delay-ms",
                str(self.s3_latency_ms),
            )
            self.proxy_url = f"http://127.0.0.1:{port}"
            self.proxy = ProxyControl(self.proxy_url)
            self.env.update(
                {
                    "CELERY_BROKER_URL": broker,
                    "CELERY_RESULT_BACKEND": broker.rsplit("/", 1)[0] + "/1",
                    "S3_ENDPOINT_URL": self.proxy_url,
                }
            )
            os.environ.clear()
            os.environ.update(self.env)  # this process reads the same settings
            boto3.client(
                "s3",
                endpoint_url=self.moto_url,
                region_name="us-east-1",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
            ).create_bucket(Bucket=BUCKET)
            wait_until(lambda: port_open(port), 20, "S3 latency proxy")
            # The API and the worker touch no table before they get a request.
            api_port = self.spawn_uvicorn("api", "api_stub.app:app")
            bare_port = self.spawn_uvicorn("bare", "bench.bare_app:app") if bare_app else None
            self.spawn_worker()
            out, _ = migrate.communicate(timeout=180)
        finally:
            if migrate.poll() is None:
                migrate.kill()
                migrate.wait()
        if migrate.returncode:
            raise RuntimeError(f"alembic upgrade head failed:\n{out.decode(errors='replace')}")
        self.api_url = self.wait_uvicorn("api", api_port)
        self.bare_url = self.wait_uvicorn("bare", bare_port) if bare_port else ""
        self.wait_worker()

    def _database_url(self) -> str:
        if not self.postgres_admin_url:
            return f"sqlite:///{self.tmp / 'bench.db'}"
        self.pg_database = f"bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.postgres_admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{self.pg_database}"')
        url = make_url(self.postgres_admin_url).set(database=self.pg_database)
        return url.render_as_string(hide_password=False)

    def spawn_uvicorn(self, name: str, app: str) -> int:
        port = free_port()
        self._spawn(name, str(BIN_DIR / "uvicorn"), app, "--port", str(port))
        return port

    def wait_uvicorn(self, name: str, port: int) -> str:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not self.procs[name].alive():
                raise RuntimeError(f"{name} exited:\n{self.procs[name].log_tail()}")
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 90, name)
        return url

    def start_uvicorn(self, name: str, app: str) -> str:
        return self.wait_uvicorn(name, self.spawn_uvicorn(name, app))

    def spawn_worker(self) -> None:
        # No --concurrency: the project's defaults are what is measured, unless the run asks for
        # an alternative (--worker-args, or WORKER_POOL=prefork in the caller's environment).
        cmd = [str(BIN_DIR / "celery"), "-A", "worker", "worker", "-l", "WARNING"]
        cmd += list(self.worker_args)
        if self.workers == 1:
            self._spawn("worker", *cmd)
            return
        # --workers N (one per core): N workers under one shell, so that the "worker" process
        # group (CPU, memory, stop) covers them all.
        line = " & ".join(
            shlex.join([*cmd, "-n", f"bench{i}@%h"]) for i in range(1, self.workers + 1)
        )
        self._spawn("worker", "/bin/sh", "-c", f"{line} & wait")

    def wait_worker(self) -> None:
        from worker.celery import app

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if not self.procs["worker"].alive():
                raise RuntimeError(f"worker exited:\n{self.procs['worker'].log_tail()}")
            if len(app.control.ping(timeout=1.0, limit=self.workers)) >= self.workers:
                return
        raise TimeoutError("worker did not answer a ping within 90s")

    def start_worker(self) -> None:
        self.spawn_worker()
        self.wait_worker()

    def stop_process(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()

    def restart_worker(self) -> None:
        self.stop_process("worker")
        self.start_worker()

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.alive() else None

    def cpu_groups(self) -> list[procstat.Group]:
        groups = [
            procstat.tree_group(name, partial(self.pid, name))
            for name in ("api", "worker", "moto", "s3proxy", "redis")
        ]
        if self.postgres_admin_url:
            groups.append(procstat.named_group("postgres", "postgres"))
        groups.append(procstat.self_group("bench"))
        return groups

    def stop(self, keep_logs: bool = False) -> None:
        from worker.db import reset_engine

        with contextlib.suppress(Exception):
            reset_engine()
        # The Python services stop side by side (each waited for below), before the broker,
        # S3 and the proxy they may still talk to while shutting down.
        for name, proc in self.procs.items():
            if name not in ("redis", "moto", "s3proxy"):
                proc.signal_group(signal.SIGTERM)
        for name in reversed(list(self.procs)):
            try:
                self.stop_process(name)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {name}: {exc}", file=sys.stderr)
        if self.pg_database and self.postgres_admin_url:
            try:
                with psycopg.connect(self.postgres_admin_url, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)')
            except psycopg.Error as exc:
                print(f"bench: could not drop {self.pg_database}: {exc}", file=sys.stderr)
            self.pg_database = None
        if not keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)
