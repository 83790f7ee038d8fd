"""``/widgets/deployments`` over HTTP, on SQLite and PostgreSQL, with the real Redis broker.

No Celery worker is requested here, so accepted deploys stay ``ready``. The messages sent are
observed with Redis ``MONITOR`` (every push onto the ``deployments`` list while a block runs),
which counts exactly what the API sent even if a worker started by another test module is
consuming the queue; ``LLEN`` is checked too where it cannot be disturbed by such a worker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

DEPLOY_QUEUE = "deployments"
ERROR_KEYS = {"code", "name", "className", "message", "errors"}
UNSAFE_IDS = ["a/b", "../etc", "..", "a..b", "a\x00b", "a\nb", "x" * 65, "", "a b", "a\\b"]


def broker() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"], socket_timeout=30)


@contextmanager
def pushed_to_queue(queue: str = DEPLOY_QUEUE) -> Iterator[list[str]]:
    """Collects the raw commands that pushed a message onto ``queue`` during the block."""
    pushes: list[str] = []
    client = broker()
    with client.monitor() as monitor:
        yield pushes
        sentinel = f"end-of-block-{uuid.uuid4().hex}"
        broker().echo(sentinel)
        for event in monitor.listen():
            command = str(event["command"])
            if sentinel in command:
                break
            parts = command.split(" ", 2)
            if len(parts) == 3 and parts[0].upper() in ("LPUSH", "RPUSH") and parts[1] == queue:
                pushes.append(parts[2])
    client.close()


def assert_error(r, code: int, field: str | None = None) -> dict:
    assert r.status_code == code, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    assert body["code"] == code
    if field is not None:
        assert field in body["errors"], body
    return body


def test_post_answers_202_ready_with_location_to_the_deployment(database, org):
    w = org.widget()
    with pushed_to_queue() as pushes:
        r = org.req("POST", "/widgets/deployments", json={"widget_id": w["id"]})
    assert r.status_code == 202, r.text
    dep = r.json()
    assert dep["status"] == "ready"
    assert dep["widget_id"] == w["id"]
    assert dep["organization_id"] == org.id
    assert dep["deployment_id"] and dep["config"] is None
    # Exactly one job message, carrying the deployment's idempotency key.
    assert len(pushes) == 1
    assert dep["deployment_id"] in pushes[0] and "widgets.deploy" in pushes[0]
    location = r.headers["location"]
    assert dep["id"] in location
    got = org.http.get(location, headers={"Authorization": f"Bearer {org.token}"})
    assert got.status_code == 200, got.text
    assert got.json()["id"] == dep["id"]
    assert got.json()["deployment_id"] == dep["deployment_id"]


def test_get_by_id_returns_the_deployment(database, org):
    dep = org.deploy(org.widget()["id"])
    r = org.req("GET", f"/widgets/deployments/{dep['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == dep["id"]
    assert r.json()["status"] in ("ready", "running", "success", "failure")
    assert_error(org.req("GET", f"/widgets/deployments/{uuid.uuid4()}"), 404)


def test_list_is_a_plain_array_filtered_paged_and_sorted(database, org):
    w1, w2 = org.widget(), org.widget()
    ids = [org.deploy(w)["id"] for w in (w1["id"], w2["id"], w1["id"], w2["id"], w1["id"])]

    r = org.req("GET", "/widgets/deployments")
    assert r.status_code == 200, r.text
    assert isinstance(r.json(), list)
    assert [d["id"] for d in r.json()] == ids  # default: creation order

    only_w1 = org.req("GET", "/widgets/deployments", params={"widget_id": w1["id"]}).json()
    assert [d["id"] for d in only_w1] == [ids[0], ids[2], ids[4]]
    assert {d["widget_id"] for d in only_w1} == {w1["id"]}

    newest_first = org.req("GET", "/widgets/deployments", params={"$sort[created_at]": "-1"})
    assert [d["id"] for d in newest_first.json()] == ids[::-1]
    oldest_first = org.req("GET", "/widgets/deployments", params={"$sort[created_at]": "1"})
    assert [d["id"] for d in oldest_first.json()] == ids

    page = org.req("GET", "/widgets/deployments", params={"$limit": 2, "$skip": 1}).json()
    assert [d["id"] for d in page] == ids[1:3]
    last = org.req(
        "GET",
        "/widgets/deployments",
        params={"$limit": 2, "$skip": 1, "$sort[created_at]": "-1", "widget_id": w1["id"]},
    ).json()
    assert [d["id"] for d in last] == [ids[2], ids[0]]
    assert org.req("GET", "/widgets/deployments", params={"$skip": 5}).json() == []


@pytest.mark.parametrize(
    "params",
    [
        {"$limit": "1001"},
        {"$skip": "-1"},
        {"$sort[name]": "1"},
        {"$sort[created_at]": "up"},
        {"status": "ready"},
        {"widget_id": "../x"},
    ],
)
def test_list_rejects_bad_query_parameters(database, org, params):
    assert_error(org.req("GET", "/widgets/deployments", params=params), 400, next(iter(params)))


def test_unknown_widget_is_404_and_nothing_is_enqueued(database, org):
    q = broker()
    before = q.llen(DEPLOY_QUEUE)
    with pushed_to_queue() as pushes:
        r = org.req("POST", "/widgets/deployments", json={"widget_id": str(uuid.uuid4())})
    assert_error(r, 404)
    assert pushes == []
    assert q.llen(DEPLOY_QUEUE) <= before
    assert org.req("GET", "/widgets/deployments").json() == []


def test_widget_of_another_organization_is_404_and_nothing_is_enqueued(database, make_org):
    owner, intruder = make_org(), make_org()
    w = owner.widget()
    q = broker()
    before = q.llen(DEPLOY_QUEUE)
    with pushed_to_queue() as pushes:
        r = intruder.req("POST", "/widgets/deployments", json={"widget_id": w["id"]})
    assert_error(r, 404)
    assert pushes == []
    assert q.llen(DEPLOY_QUEUE) <= before
    assert intruder.req("GET", "/widgets/deployments").json() == []
    assert owner.req("GET", "/widgets/deployments").json() == []


def test_missing_organization_id_is_400(database, org):
    w = org.widget()
    auth = {"Authorization": f"Bearer {org.token}"}
    with pushed_to_queue() as pushes:
        r = org.http.post("/widgets/deployments", json={"widget_id": w["id"]}, headers=auth)
    assert_error(r, 400, "organization_id")
    assert pushes == []
    assert_error(org.http.get("/widgets/deployments", headers=auth), 400, "organization_id")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "widget_id"),
        ({"widget_id": 42}, "widget_id"),
        ({"widget_id": None}, "widget_id"),
        ({"widget_id": ["a"]}, "widget_id"),
        ({"widget_id": "w-1", "priority": 9}, "priority"),
        ({"widget_id": "w-1", "organization_id": "other"}, "organization_id"),
        ({"widget_id": "w-1", "deployment_id": 7}, "deployment_id"),
    ],
)
def test_malformed_or_unknown_body_field_is_400_naming_it(database, org, body, field):
    with pushed_to_queue() as pushes:
        r = org.req("POST", "/widgets/deployments", json=body)
    err = assert_error(r, 400, field)
    assert err["name"] == "BadRequest" and err["className"] == "bad-request"
    assert pushes == []


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'"w-1"', b""])
def test_body_that_is_not_a_json_object_is_400(database, org, content):
    headers = {"Content-Type": "application/json"}
    r = org.req("POST", "/widgets/deployments", content=content, headers=headers)
    assert_error(r, 400)


@pytest.mark.parametrize("bad", UNSAFE_IDS)
def test_unsafe_ids_in_body_are_400(database, org, bad):
    w = org.widget()
    with pushed_to_queue() as pushes:
        r1 = org.req("POST", "/widgets/deployments", json={"widget_id": bad})
        r2 = org.req(
            "POST", "/widgets/deployments", json={"widget_id": w["id"], "deployment_id": bad}
        )
    assert_error(r1, 400, "widget_id")
    assert_error(r2, 400, "deployment_id")
    assert pushes == []
    assert org.req("GET", "/widgets/deployments").json() == []


@pytest.mark.parametrize("bad", ["%2E%2E", "a..b", "a%01b", "a%0Ab", "x" * 65, "a%20b"])
@pytest.mark.parametrize("prefix", ["/widgets/deployments/", "/widgets/"])
def test_unsafe_ids_in_path_are_400(database, org, prefix, bad):
    assert_error(org.req("GET", prefix + bad), 400)


@pytest.mark.parametrize("bad", ["../x", "a/b", "x" * 65, "a\x01b"])
def test_unsafe_organization_id_is_400(database, org, bad):
    assert_error(org.req("GET", "/widgets/deployments", org_id=bad), 400, "organization_id")


def test_same_deployment_id_twice_gives_one_deployment_and_one_message(database, org):
    w = org.widget()
    key = f"idem-{uuid.uuid4().hex}"
    with pushed_to_queue() as pushes:
        first = org.req(
            "POST", "/widgets/deployments", json={"widget_id": w["id"], "deployment_id": key}
        )
        second = org.req(
            "POST", "/widgets/deployments", json={"widget_id": w["id"], "deployment_id": key}
        )
    assert first.status_code == 202, first.text
    assert second.status_code == 202, second.text
    assert second.json()["id"] == first.json()["id"]
    assert first.json()["deployment_id"] == second.json()["deployment_id"] == key
    assert second.headers["location"] == first.headers["location"]
    assert len(pushes) == 1 and key in pushes[0]
    listed = org.req("GET", "/widgets/deployments", params={"widget_id": w["id"]}).json()
    assert [d["id"] for d in listed] == [first.json()["id"]]


def test_deployment_id_is_unique_per_organization_not_globally(database, make_org):
    """Another tenant's key neither collides (no 409, nothing revealed) nor blocks it."""
    a, b = make_org(), make_org()
    key = f"idem-{uuid.uuid4().hex}"
    wa, wb = a.widget(), b.widget()
    with pushed_to_queue() as pushes:
        mine = a.req(
            "POST", "/widgets/deployments", json={"widget_id": wa["id"], "deployment_id": key}
        )
        theirs = b.req(
            "POST", "/widgets/deployments", json={"widget_id": wb["id"], "deployment_id": key}
        )
    assert mine.status_code == 202, mine.text
    assert theirs.status_code == 202, theirs.text
    assert mine.json()["deployment_id"] == theirs.json()["deployment_id"] == key
    assert mine.json()["id"] != theirs.json()["id"]
    assert (theirs.json()["organization_id"], theirs.json()["widget_id"]) == (b.id, wb["id"])
    assert mine.json()["id"] not in theirs.text
    assert len(pushes) == 2
    assert any(a.id in p and wa["id"] in p for p in pushes)
    assert any(b.id in p and wb["id"] in p for p in pushes)
    # Each organization sees only its own deployment of that key.
    for org, dep in ((a, mine.json()), (b, theirs.json())):
        assert [d["id"] for d in org.req("GET", "/widgets/deployments").json()] == [dep["id"]]
    assert b.req("GET", f"/widgets/deployments/{mine.json()['id']}").status_code == 404
    assert a.req("GET", f"/widgets/deployments/{theirs.json()['id']}").status_code == 404


def test_repeating_a_key_another_organization_also_uses_returns_ones_own(database, make_org):
    a, b = make_org(), make_org()
    key = f"idem-{uuid.uuid4().hex}"
    a.deploy(a.widget()["id"], deployment_id=key)
    wb = b.widget()
    first = b.deploy(wb["id"], deployment_id=key)
    with pushed_to_queue() as pushes:
        again = b.deploy(wb["id"], deployment_id=key)
    assert again["id"] == first["id"] and again["organization_id"] == b.id
    assert pushes == []


def test_an_organization_reusing_its_own_key_for_another_widget_gets_409(database, org):
    key = f"idem-{uuid.uuid4().hex}"
    dep = org.deploy(org.widget()["id"], deployment_id=key)
    other = org.widget()
    with pushed_to_queue() as pushes:
        r = org.req(
            "POST", "/widgets/deployments", json={"widget_id": other["id"], "deployment_id": key}
        )
    assert_error(r, 409)
    assert key in r.json()["message"]
    assert pushes == []
    listed = org.req("GET", "/widgets/deployments").json()
    assert [d["id"] for d in listed] == [dep["id"]]
