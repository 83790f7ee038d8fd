"""docker-compose.yml, .env.example and the Dockerfile agree with the code: real entry points,
settings that exist, a durable Redis, health-gated start-up order and exactly one beat."""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from tests.conftest import PROJECT_ROOT
from worker.processes import BIN_DIR
from worker.settings import PLACEHOLDER_MARKER, Settings

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
ENTRY_POINTS = {
    ("uvicorn", "api_stub.app:app"),
    ("celery", "-A", "worker", "worker"),
    ("celery", "-A", "worker", "beat"),
    ("celery", "-A", "worker", "flower"),
    ("alembic", "upgrade", "head"),
}
CONDITIONS = {"service_healthy", "service_completed_successfully"}


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data["services"]


def load_env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def app_services(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services run from the project's own image."""
    return {n: s for n, s in services.items() if "build" in s}


def is_one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "")) == "no"


def depends(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on", {})
    assert isinstance(deps, dict), f"depends_on must name a condition for each service: {deps}"
    return deps


def test_app_services_run_the_projects_real_entry_points():
    apps = app_services(load_compose())
    used = set()
    for name, service in apps.items():
        cmd = command(service)
        match = [ep for ep in ENTRY_POINTS if tuple(cmd[: len(ep)]) == ep]
        assert match, f"{name}: {cmd} is not one of the project's entry points"
        used.add(match[0])
        assert "entrypoint" not in service, name
    assert used == ENTRY_POINTS

    # ... and those entry points exist and resolve.
    for exe in ("uvicorn", "celery", "alembic"):
        assert (BIN_DIR / exe).exists(), exe
    from celery.app.utils import find_app
    from fastapi import FastAPI

    from api_stub.app import app as api_app
    from worker.celery import app as celery_app

    assert isinstance(api_app, FastAPI)
    assert find_app("worker") is celery_app
    heads = subprocess.run(
        [str(BIN_DIR / "alembic"), "heads"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len([line for line in heads.stdout.splitlines() if "(head)" in line]) == 1


def test_every_setting_passed_to_the_app_exists():
    fields = {name.lower() for name in Settings.model_fields}
    env = load_env_example()
    app_keys = [k for k in env if not k.startswith(("POSTGRES_", "MINIO_"))]
    assert "FLOWER_BASIC_AUTH" in app_keys
    unknown = [k for k in app_keys if k.lower() not in fields]
    assert unknown == [], f"set in .env.example but not read by worker.settings: {unknown}"
    for name, service in app_services(load_compose()).items():
        assert service.get("env_file") == "${APP_ENV_FILE:-.env}", name
        extra = service.get("environment", {})
        keys = extra if isinstance(extra, dict) else [e.split("=")[0] for e in extra]
        assert [k for k in keys if k.lower() not in fields] == [], name
    # As it stands the example is refused in production: every placeholder must be replaced...
    example = {k.lower(): env[k] for k in app_keys}
    with pytest.raises(ValidationError) as refused:
        Settings(**example)
    placeholders = [k for k in app_keys if PLACEHOLDER_MARKER in env[k]]
    assert {"SECRET_KEY", "ADMIN_TOKEN", "FLOWER_BASIC_AUTH"} <= set(placeholders)
    [error] = refused.value.errors()
    named, _, _ = str(error["msg"]).removeprefix("Value error, ").partition(" still contain")
    assert sorted(named.split(", ")) == sorted(placeholders), error["msg"]
    # ... and with real secrets in their place it is a valid production configuration.
    real = {k: v.replace(PLACEHOLDER_MARKER, secrets.token_urlsafe(32)) for k, v in example.items()}
    settings = Settings(**real)
    assert settings.app_env == "production" and not settings.is_development
    assert settings.flower_basic_auth is not None


def test_env_example_points_at_the_compose_services():
    env, services = load_env_example(), load_compose()
    db = urlsplit(env["DATABASE_URL"])
    assert (db.username, db.password, db.path.lstrip("/")) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    for url, service in (
        (env["DATABASE_URL"], "postgres"),
        (env["CELERY_BROKER_URL"], "redis"),
        (env["S3_ENDPOINT_URL"], "s3"),
    ):
        assert urlsplit(url).hostname == service and service in services, url
    # s3-init creates the bucket with the app's key pair, so it must be the store's root pair.
    assert env["MINIO_ROOT_USER"] == env["AWS_ACCESS_KEY_ID"]
    assert env["MINIO_ROOT_PASSWORD"] == env["AWS_SECRET_ACCESS_KEY"]


def test_redis_persists_and_never_evicts_messages():
    cmd = command(load_compose()["redis"])
    pairs = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "redis-server"
    assert pairs.get("--appendonly") == "yes", cmd
    assert pairs.get("--maxmemory-policy") == "noeviction", cmd


def test_start_up_waits_for_healthy_infrastructure_and_finished_migrations():
    services = load_compose()
    apps = app_services(services)
    for name, service in services.items():
        for target, spec in depends(service).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), (name, target)
            if condition == "service_completed_successfully":
                assert is_one_shot(services[target]), (name, target)
            if target not in apps or is_one_shot(services[target]):
                # Infrastructure and one-shots: never just "started".
                assert condition in CONDITIONS, (name, target, condition)
    need = {
        "migrate": {"postgres": "service_healthy"},
        "api": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
        "worker": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
        "beat": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
        "flower": {"redis": "service_healthy"},
    }
    for name, wanted in need.items():
        got = {t: s.get("condition") for t, s in depends(services[name]).items()}
        assert wanted.items() <= got.items(), (name, got)
    for name in ("api", "worker"):  # they write to the bucket s3-init creates
        assert depends(services[name])["s3-init"]["condition"] == "service_completed_successfully"


def test_every_dependency_is_health_or_completion_gated():
    for name, service in load_compose().items():
        for target, spec in depends(service).items():
            assert spec.get("condition") in CONDITIONS, (name, target, spec)


def test_long_running_services_have_healthchecks():
    for name, service in load_compose().items():
        if is_one_shot(service) or command(service)[:4] == ["celery", "-A", "worker", "beat"]:
            continue  # one-shots exit; beat serves nothing a probe could ask
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_beat_is_a_single_service():
    services = load_compose()
    beats = [n for n, s in services.items() if "beat" in command(s)[:4]]
    assert beats == ["beat"]
    beat = services["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert beat.get("scale", 1) == 1
    for name, service in services.items():
        cmd = command(service)
        assert not ({"-B", "--beat"} & set(cmd)), f"{name} embeds a second beat: {cmd}"


def test_image_contains_what_the_entry_points_need():
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    for needed in ("COPY worker ./worker", "COPY api_stub ./api_stub", "pyproject.toml"):
        assert needed in text, needed
    assert "uv sync --frozen" in text
    assert "EXPOSE 8000 5555" in text


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file_with_the_example_env():
    out = subprocess.run(
        [
            "docker-compose",
            "-f",
            "docker-compose.yml",
            "--env-file",
            ".env.example",
            "config",
            "-q",
        ],
        cwd=PROJECT_ROOT,
        env={**os.environ, "APP_ENV_FILE": ".env.example"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
