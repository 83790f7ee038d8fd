"""Webhooks through the API, beat's dispatch tick (its body run here as beat would), a real
in-process worker, and a real receiver on loopback (tests.support.webhook_receiver); every
delivery is checked with the Standard Webhooks reference verifier (``standardwebhooks``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.api_stub.test_archive_api import archive, assert_error
from tests.support.api import OrgClient
from tests.support.webhook_receiver import Received, Receiver, receiver
from worker.models import utcnow
from worker.models.webhooks import new_secret
from worker.settings import Settings, get_settings
from worker.webhook_http import post

ALL_EVENTS = ["deployment.succeeded", "deployment.failed", "deployment.scheduled",
              "archive.completed", "bulk.completed"]  # fmt: skip


def dispatch() -> None:
    """The body of beat's ``widgets.dispatch_webhooks`` (imported late: the task module
    configures the Celery app, once the test's settings are)."""
    from worker.tasks.maintenance import send_due_deployments
    from worker.tasks.webhooks import dispatch_webhooks

    dispatch_webhooks()
    send_due_deployments()


def pump(until: Callable[[], bool], timeout: float = 30, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "not delivered in time"
        dispatch()
        time.sleep(every)


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Set webhook settings for this test (read by the in-process worker too)."""

    def set_env(**env: str) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()

    yield set_env
    get_settings.cache_clear()  # before monkeypatch puts the environment back


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver() as running:
        yield running


def register(org: OrgClient, url: str, events: list[str] = ALL_EVENTS, **body: Any) -> Any:
    r = org.req("POST", "/webhooks", json={"url": url, "event_types": events, **body})
    assert r.status_code == 201, r.text
    return r.json()


def verified(secret: str, got: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(got.body, got.headers)
    return payload


def deliveries(org: OrgClient, endpoint_id: str) -> list[dict[str, Any]]:
    r = org.req("GET", f"/webhooks/{endpoint_id}/deliveries")
    assert r.status_code == 200, r.text
    return list(r.json())


def deployed(org: OrgClient, widget_id: str, **body: Any) -> dict[str, Any]:
    done = org.wait_deployment(org.deploy(widget_id, **body)["id"])
    assert done["status"] == "success", done
    return done


def test_endpoints_are_the_organization_s_and_the_secret_is_shown_once(
    database, org, make_org, hooks
):
    created = register(org, hooks.url, ["deployment.succeeded"], description="ops")
    assert created["secret"].startswith("whsec_") and created["enabled"] is True
    got = org.req("GET", f"/webhooks/{created['id']}").json()
    assert "secret" not in got and got["event_types"] == ["deployment.succeeded"]
    assert [e["id"] for e in org.req("GET", "/webhooks").json()] == [created["id"]]
    patched = org.req(
        "PATCH", f"/webhooks/{created['id']}", json={"event_types": ["archive.completed"]}
    )
    assert patched.status_code == 200 and patched.json()["event_types"] == ["archive.completed"]
    stranger = make_org()
    assert_error(stranger.req("GET", f"/webhooks/{created['id']}"), 404)
    assert stranger.req("GET", "/webhooks").json() == []
    assert org.req("DELETE", f"/webhooks/{created['id']}").status_code == 204
    assert_error(org.req("GET", f"/webhooks/{created['id']}"), 404)
    bad = org.req("POST", "/webhooks", json={"url": hooks.url, "event_types": ["nope"]})
    assert_error(bad, 400)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # not https
        "https://127.0.0.1/hook",  # loopback
        "https://10.1.2.3/hook",  # private
        "https://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "https://user:pw@example.com/hook",  # credentials
        "ftp://example.com/hook",
        "not a url",
    ],
)
def test_unsafe_urls_are_refused_unless_private_networks_are_allowed(
    database, org, settings_env, url
):
    settings_env(WEBHOOK_ALLOW_PRIVATE_NETWORKS="false")
    r = org.req("POST", "/webhooks", json={"url": url, "event_types": ALL_EVENTS})
    assert_error(r, 400)
    assert "url" in r.json()["errors"], r.text
    assert org.req("GET", "/webhooks").json() == []


def test_a_host_name_that_resolves_to_a_private_address_is_refused_at_delivery(settings_env):
    settings_env(WEBHOOK_ALLOW_PRIVATE_NETWORKS="false")
    answer = post("https://localhost:1/hook", b"{}", {}, get_settings())
    assert answer.status_code is None
    assert answer.error is not None and "not a public address" in answer.error


def test_events_are_delivered_signed_per_standard_webhooks(database, org, celery_worker, hooks):
    endpoint = register(org, hooks.url)
    w = org.widget()
    dep = deployed(org, w["id"])
    pump(lambda: len(hooks.answered(204)) >= 1)
    got = hooks.answered(204)[0]
    payload = verified(endpoint["secret"], got)
    assert payload["type"] == "deployment.succeeded"
    assert payload["data"]["id"] == dep["id"] and payload["data"]["status"] == "success"
    assert payload["data"]["live_deployment_id"] == dep["deployment_id"]
    assert got.headers["webhook-id"].startswith("msg_")
    assert int(got.headers["webhook-timestamp"]) == pytest.approx(time.time(), abs=60)
    with pytest.raises(WebhookVerificationError):  # another secret does not verify it
        Webhook(new_secret()).verify(got.body, got.headers)

    due = (utcnow() + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    org.deploy(w["id"], publish_at=due)
    archive(org, w["id"])
    pump(lambda: len(hooks.answered(204)) >= 3)
    types = [verified(endpoint["secret"], r)["type"] for r in hooks.answered(204)]
    assert sorted(types) == ["archive.completed", "deployment.scheduled", "deployment.succeeded"]
    log = deliveries(org, endpoint["id"])
    assert {d["status"] for d in log} == {"succeeded"} and len(log) == 3
    attempt = log[-1]["attempt_log"][0]
    assert attempt["status_code"] == 204 and attempt["latency_ms"] >= 0
    assert {d["id"] for d in log} == {r.headers["webhook-id"] for r in hooks.answered(204)}


def test_a_bulk_redeploy_ends_with_one_bulk_completed_event(database, org, celery_worker, hooks):
    endpoint = register(org, hooks.url, ["bulk.completed"])
    widgets = [org.widget() for _ in range(3)]
    r = org.req(
        "POST", "/widgets/deployments/bulk", json={"widget_ids": [w["id"] for w in widgets]}
    )
    assert r.status_code == 202, r.text
    pump(lambda: len(hooks.answered(204)) >= 1, timeout=60)
    for _ in range(3):  # later ticks record nothing more
        dispatch()
    time.sleep(0.5)
    [got] = hooks.requests
    payload = verified(endpoint["secret"], got)
    assert payload["type"] == "bulk.completed"
    data = payload["data"]
    assert (data["id"], data["status"], data["total"], data["success"]) == (
        r.json()["id"],
        "success",
        3,
        3,
    )
    assert data["completed_at"] is not None


def test_a_receiver_down_then_up_gets_every_event_once_per_webhook_id(
    database, org, celery_worker, hooks, settings_env
):
    settings_env(WEBHOOK_RETRY_SCHEDULE_SECONDS="[0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]")
    endpoint = register(org, hooks.url, ["deployment.succeeded"])
    hooks.mode = "down"
    widgets = [org.widget() for _ in range(4)]
    done = [deployed(org, w["id"]) for w in widgets]
    pump(lambda: len(hooks.requests) >= 8)  # each event tried (and dropped) at least once
    hooks.mode = "500"
    pump(lambda: len(hooks.answered(500)) >= 4)
    hooks.mode = "ok"
    pump(lambda: len(hooks.answered(204)) >= 4)
    # Every event arrived, each with one webhook-id on all its attempts, verified.
    by_id: dict[str, set[str]] = {}
    for got in hooks.requests:
        data = verified(endpoint["secret"], got)["data"]
        by_id.setdefault(data["id"], set()).add(got.headers["webhook-id"])
    assert set(by_id) == {d["id"] for d in done}
    assert all(len(ids) == 1 for ids in by_id.values()), by_id
    delivered = [verified(endpoint["secret"], r)["data"]["id"] for r in hooks.answered(204)]
    assert sorted(delivered) == sorted(d["id"] for d in done)  # once each
    log = deliveries(org, endpoint["id"])
    assert {d["status"] for d in log} == {"succeeded"}
    assert all(d["attempts"] >= 3 for d in log)  # down, then 500, then delivered
    codes = {a["status_code"] for d in log for a in d["attempt_log"]}
    assert {None, 500, 204} <= codes


def test_a_receiver_answering_410_disables_its_endpoint(database, org, celery_worker, hooks):
    endpoint = register(org, hooks.url, ["deployment.succeeded"])
    hooks.mode = "410"
    w = org.widget()
    deployed(org, w["id"])
    pump(lambda: org.req("GET", f"/webhooks/{endpoint['id']}").json()["enabled"] is False)
    got = org.req("GET", f"/webhooks/{endpoint['id']}").json()
    assert "410" in got["disabled_reason"]
    [failed] = deliveries(org, endpoint["id"])
    assert failed["status"] == "failed" and failed["last_status_code"] == 410
    # No new deliveries while disabled; a retry is refused until it is enabled again.
    deployed(org, w["id"])
    assert len(deliveries(org, endpoint["id"])) == 1
    retry = f"/webhooks/{endpoint['id']}/deliveries/{failed['id']}/retry"
    assert_error(org.req("POST", retry), 409)
    hooks.mode = "ok"
    enabled = org.req("PATCH", f"/webhooks/{endpoint['id']}", json={"enabled": True}).json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None
    r = org.req("POST", retry)
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text
    pump(lambda: len(hooks.answered(204)) == 1)
    assert hooks.answered(204)[0].headers["webhook-id"] == failed["id"]  # its original id


def test_a_rotated_secret_signs_with_both_during_the_overlap(
    database, org, celery_worker, hooks, settings_env
):
    endpoint = register(org, hooks.url, ["deployment.succeeded"])
    r = org.req("POST", f"/webhooks/{endpoint['id']}/rotate-secret")
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["secret"] != endpoint["secret"] and rotated["previous_secret_expires_at"]
    deployed(org, org.widget()["id"])
    pump(lambda: len(hooks.answered(204)) == 1)
    got = hooks.answered(204)[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    verified(endpoint["secret"], got)  # receivers still on the old secret
    verified(rotated["secret"], got)  # and those already on the new one

    settings_env(WEBHOOK_SECRET_OVERLAP_SECONDS="0")
    again = org.req("POST", f"/webhooks/{endpoint['id']}/rotate-secret").json()
    deployed(org, org.widget()["id"])
    pump(lambda: len(hooks.answered(204)) == 2)
    last = hooks.answered(204)[1]
    verified(again["secret"], last)
    with pytest.raises(WebhookVerificationError):
        verified(rotated["secret"], last)  # no overlap: the old secret stopped signing


def test_slow_receivers_and_redirects_are_failed_attempts(
    database, org, celery_worker, hooks, settings_env
):
    settings_env(WEBHOOK_TIMEOUT_SECONDS="1", WEBHOOK_RETRY_SCHEDULE_SECONDS="[0.2]")
    endpoint = register(org, hooks.url, ["deployment.succeeded"])
    hooks.mode, hooks.slow_seconds = "slow", 3.0
    deployed(org, org.widget()["id"])
    pump(lambda: len(hooks.requests) >= 1)
    hooks.mode = "redirect"
    pump(lambda: deliveries(org, endpoint["id"])[0]["status"] == "failed")
    [log] = deliveries(org, endpoint["id"])
    first, second = log["attempt_log"]
    assert first["status_code"] is None and "Timeout" in first["error"]
    assert first["latency_ms"] < 2900  # cut at the timeout, not the receiver's 3 s
    assert second["status_code"] == 302  # not followed
    assert log["last_error"] == "HTTP 302"


def test_a_deploy_never_waits_for_a_receiver(database, org, celery_worker, hooks):
    """The event waits in the outbox (committed with the deploy's outcome); no request is made
    while the deploy runs, however slow the receiver."""
    endpoint = register(org, hooks.url, ["deployment.succeeded"])
    hooks.mode, hooks.slow_seconds = "slow", 5.0
    w = org.widget()
    deployed(org, w["id"])
    deployed(org, w["id"])
    assert hooks.requests == []
    log = deliveries(org, endpoint["id"])
    assert [(d["status"], d["attempts"]) for d in log] == [("pending", 0)] * 2


def test_settings_default_to_a_retry_schedule_of_more_than_a_day() -> None:
    schedule = Settings(app_env="development").webhook_retry_schedule_seconds
    assert sum(schedule) >= 24 * 3600
    assert json.loads(json.dumps(schedule)) == schedule
