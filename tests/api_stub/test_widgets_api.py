"""Purposes, preferences and widgets over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import col, update

from worker.db import unit_of_work
from worker.models import Deployment, Purpose, Widget

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
PAGED = ["/metadata/purposes", "/preferences", "/widgets"]
LISTS = [*PAGED, "/widgets/deployments"]


def create(org, path: str) -> dict:
    if path == "/metadata/purposes":
        return org.purpose()
    if path == "/preferences":
        return org.preference()
    if path == "/widgets":
        return org.widget()
    return org.deploy(org.widget()["id"])


def listed(org, path: str, **params) -> list[dict]:
    r = org.req("GET", path, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    return body if path == "/widgets/deployments" else body["data"]


def ids(rows: list[dict]) -> list[str]:
    return [row["id"] for row in rows]


def test_purpose_create_list_get_patch_delete(database, org):
    r = org.req("POST", "/metadata/purposes", json={"description": {"en": "Ads", "fr": "Pub"}})
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["organization_id"] == org.id
    assert (p["description"], p["metadata"]) == ({"en": "Ads", "fr": "Pub"}, {})
    assert org.req("GET", f"/metadata/purposes/{p['id']}").json() == p
    assert ids(listed(org, "/metadata/purposes")) == [p["id"]]

    r = org.req("PATCH", f"/metadata/purposes/{p['id']}", json={"metadata": {"k": [1, 2]}})
    assert r.status_code == 200, r.text
    patched = r.json()
    # An edit also says how many published widgets it reaches (none here).
    assert (patched.pop("affected_widgets"), patched.pop("redeploy_bulk_id")) == (0, None)
    assert patched["metadata"] == {"k": [1, 2]} and patched["description"] == p["description"]
    assert patched["updated_at"] > p["updated_at"] and patched["created_at"] == p["created_at"]
    assert org.req("GET", f"/metadata/purposes/{p['id']}").json() == patched

    assert org.req("DELETE", f"/metadata/purposes/{p['id']}").json()["id"] == p["id"]
    assert org.req("GET", f"/metadata/purposes/{p['id']}").status_code == 404
    assert org.req("DELETE", f"/metadata/purposes/{p['id']}").status_code == 404
    assert org.req("GET", "/metadata/purposes").json()["total"] == 0


def test_preference_with_values_create_list_get_patch_delete(database, org):
    body = {
        "name": {"en": "Topics"},
        "type": "multi",
        "metadata": {"team": "crm"},
        "values": [
            {"name": {"en": "Sport"}, "metadata": {"code": "S"}},
            {"name": {"en": "News"}, "metadata": {"code": "N"}},
        ],
    }
    r = org.req("POST", "/preferences", json=body)
    assert r.status_code == 201, r.text
    pref = r.json()
    assert (pref["name"], pref["type"], pref["metadata"]) == (
        {"en": "Topics"},
        "multi",
        body["metadata"],
    )
    assert [(v["name"]["en"], v["metadata"], v["order"]) for v in pref["values"]] == [
        ("Sport", {"code": "S"}, 0),
        ("News", {"code": "N"}, 1),
    ]
    assert {v["preference_id"] for v in pref["values"]} == {pref["id"]}
    assert org.req("GET", f"/preferences/{pref['id']}").json() == pref
    assert listed(org, "/preferences") == [pref]

    sport, news = pref["values"]
    new_values = [
        {"name": {"en": "Weather"}, "metadata": {"code": "W"}},
        {"id": sport["id"], "name": {"en": "Sports"}, "metadata": {"code": "S2"}},
    ]
    r = org.req(
        "PATCH", f"/preferences/{pref['id']}", json={"type": "single", "values": new_values}
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched.pop("affected_widgets"), patched.pop("redeploy_bulk_id")) == (0, None)
    assert patched["type"] == "single" and patched["name"] == pref["name"]
    assert [(v["name"]["en"], v["metadata"]["code"]) for v in patched["values"]] == [
        ("Weather", "W"),
        ("Sports", "S2"),
    ]
    assert patched["values"][1]["id"] == sport["id"]
    assert news["id"] not in ids(patched["values"])
    assert org.req("GET", f"/preferences/{pref['id']}").json() == patched

    r = org.req(
        "PATCH",
        f"/preferences/{pref['id']}",
        json={"values": [{"id": news["id"], "name": {"en": "x"}}]},
    )
    assert r.status_code == 400 and "values.0.id" in r.json()["errors"], r.text
    assert org.req("DELETE", f"/preferences/{pref['id']}").status_code == 200
    assert org.req("GET", f"/preferences/{pref['id']}").status_code == 404
    assert listed(org, "/preferences") == []


def test_widget_create_list_get_patch(database, org):
    pur, pref = org.purpose(), org.preference()
    w = org.widget([pur], [pref], name="Prefs", format="hosted", domain="prefs.example.com")
    assert w["organization_id"] == org.id and w["name"] == "Prefs" and w["format"] == "hosted"
    assert w["selected_purposes_ids"] == [pur["id"]]
    assert w["selected_preferences_ids"] == [pref["id"]]
    assert w["last_domain_used"] == "prefs.example.com"
    assert w["publication_status"] == "draft"
    assert org.req("GET", f"/widgets/{w['id']}").json() == w
    assert listed(org, "/widgets") == [w]

    r = org.req("PATCH", f"/widgets/{w['id']}", json={"name": "Renamed", "components": {"t": 1}})
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["name"], patched["components"], patched["format"]) == (
        "Renamed",
        {"t": 1},
        "hosted",
    )
    assert patched["updated_at"] > w["updated_at"] and patched["version"] > w["version"]
    assert patched["publication_status"] == "draft"
    assert org.req("GET", f"/widgets/{w['id']}").json() == patched

    for bad, field in (
        ({"name": None}, "name"),
        ({"format": "popup"}, "format"),
        ({"colour": "red"}, "colour"),
    ):
        r = org.req("PATCH", f"/widgets/{w['id']}", json=bad)
        assert r.status_code == 400 and field in r.json()["errors"], r.text
    assert org.req("GET", f"/widgets/{w['id']}").json() == patched
    assert org.req("PATCH", f"/widgets/{uuid.uuid4()}", json={"name": "x"}).status_code == 404


def test_patch_of_a_published_widget_makes_it_unpublished_changes(database, org, celery_worker):
    w = org.widget([org.purpose()], [org.preference()])
    done = org.wait_deployment(org.deploy(w["id"])["id"])
    assert done["status"] == "success", (done["status"], done["error"], done["attempts"])
    published = org.req("GET", f"/widgets/{w['id']}").json()
    assert published["publication_status"] == "published"

    r = org.req("PATCH", f"/widgets/{w['id']}", json={"components": {"title": {"en": "New"}}})
    assert r.status_code == 200, r.text
    assert r.json()["publication_status"] == "unpublished_changes"
    assert (
        org.req("GET", f"/widgets/{w['id']}").json()["publication_status"] == "unpublished_changes"
    )
    assert listed(org, "/widgets")[0]["publication_status"] == "unpublished_changes"


def test_concurrent_patches_all_bump_the_version(database, org):
    n = 6
    w = org.widget()
    before = org.req("GET", f"/widgets/{w['id']}").json()["version"]
    edits = [
        {"name": "concurrent"},
        {"domain": "concurrent.example.com"},
        {"headless": True},
        {"layout_shape": "square"},
        {"theme_id": "dark"},
        {"components": {"texts": {"title": "t"}}},
    ]
    assert len(edits) == n
    barrier = threading.Barrier(n)
    statuses: list[int] = []

    def patch(body: dict[str, Any]) -> None:
        barrier.wait(10)
        statuses.append(org.req("PATCH", f"/widgets/{w['id']}", json=body).status_code)

    threads = [threading.Thread(target=patch, args=(e,)) for e in edits]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * n
    after = org.req("GET", f"/widgets/{w['id']}").json()
    assert after["version"] == before + n
    for edit in edits:  # and no edit was lost either
        ((field, value),) = edit.items()
        assert after[field] == value, field


@pytest.mark.parametrize("path", PAGED)
def test_list_envelope_reports_total_limit_and_skip(database, org, path):
    rows = [create(org, path)["id"] for _ in range(3)]
    r = org.req("GET", path, params={"$limit": 2, "$skip": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"total", "limit", "skip", "data"}
    assert (body["total"], body["limit"], body["skip"]) == (3, 2, 1)
    assert ids(body["data"]) == rows[1:3]
    default = org.req("GET", path).json()
    assert (default["total"], default["limit"], default["skip"]) == (3, 100, 0)
    assert ids(default["data"]) == rows


@pytest.mark.parametrize("path", LISTS)
def test_sort_direction_really_changes_the_order(database, org, path):
    rows = [create(org, path)["id"] for _ in range(3)]
    assert ids(listed(org, path, **{"$sort[created_at]": "1"})) == rows
    assert ids(listed(org, path, **{"$sort[created_at]": "-1"})) == rows[::-1]
    assert ids(listed(org, path, **{"$sort[created_at]": "-1", "$limit": 1, "$skip": 1})) == [
        rows[1]
    ]


@pytest.mark.parametrize(
    ("path", "model"),
    [("/metadata/purposes", Purpose), ("/widgets", Widget), ("/widgets/deployments", Deployment)],
)
def test_equal_timestamps_page_stably_and_updated_at_sorts(database, org, request, path, model):
    if model is Deployment:
        # A worker (started before enqueueing: starting it purges the queues) finishes the jobs
        # first, so that no worker rewrites the timestamps set below.
        request.getfixturevalue("celery_worker")
    rows = [create(org, path)["id"] for _ in range(5)]
    if model is Deployment:
        assert {org.wait_deployment(d)["status"] for d in rows} == {"success"}
    same = datetime(2025, 1, 1, tzinfo=UTC)
    with unit_of_work() as session:
        session.exec(
            update(model).where(col(model.id).in_(rows)).values(created_at=same, updated_at=same)
        )
    for direction in ("1", "-1"):
        full = ids(listed(org, path, **{"$sort[created_at]": direction}))
        assert sorted(full) == sorted(rows)
        for _ in range(2):
            paged = [
                ids(listed(org, path, **{"$sort[created_at]": direction, "$limit": 1, "$skip": i}))[
                    0
                ]
                for i in range(5)
            ]
            assert paged == full
    with unit_of_work() as session:
        later = same + timedelta(days=1)
        session.exec(update(model).where(col(model.id) == rows[2]).values(updated_at=later))
    assert ids(listed(org, path, **{"$sort[updated_at]": "-1"}))[0] == rows[2]
    assert ids(listed(org, path, **{"$sort[updated_at]": "1"}))[-1] == rows[2]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize(
    "params",
    [
        {"$limit": "1001"},
        {"$skip": "-3"},
        {"$sort[name]": "1"},
        {"$sort[updated_at]": "0"},
        {"colour": "red"},
    ],
)
def test_lists_reject_bad_query_parameters(database, org, path, params):
    r = org.req("GET", path, params=params)
    assert r.status_code == 400, r.text
    assert r.json()["name"] == "BadRequest" and next(iter(params)) in r.json()["errors"]


def test_limit_of_exactly_1000_is_accepted(database, org):
    body = org.req("GET", "/widgets", params={"$limit": 1000}).json()
    assert body["limit"] == 1000


def test_timestamps_are_iso_8601_utc_with_microseconds(database, org):
    pur, pref = org.purpose(), org.preference()
    w = org.widget([pur], [pref])
    dep = org.deploy(w["id"])
    now = datetime.now(UTC)
    stamps = [pur["created_at"], pur["updated_at"], pref["created_at"], pref["updated_at"]]
    stamps += [pref["values"][0]["created_at"], w["created_at"], w["updated_at"]]
    stamps += [dep["created_at"], dep["updated_at"]]
    stamps += [org.req("GET", f"/widgets/{w['id']}").json()["created_at"]]
    for stamp in stamps:
        assert ISO_UTC.match(stamp), stamp
        parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs(parsed - now) < timedelta(minutes=2), (stamp, now)
    assert dep["started_at"] is None or ISO_UTC.match(dep["started_at"])


@pytest.mark.parametrize("field", ["selected_purposes_ids", "selected_preferences_ids"])
def test_selecting_an_entity_of_another_organization_is_400(database, make_org, field):
    org, other = make_org(), make_org()
    foreign = other.purpose() if field == "selected_purposes_ids" else other.preference()
    own = org.purpose() if field == "selected_purposes_ids" else org.preference()
    r = org.req("POST", "/widgets", json={"name": "w", field: [own["id"], foreign["id"]]})
    assert r.status_code == 400, r.text
    assert field in r.json()["errors"] and foreign["id"] in r.json()["message"]
    assert org.req("GET", "/widgets").json()["total"] == 0

    w = org.widget()
    r = org.req("PATCH", f"/widgets/{w['id']}", json={field: [foreign["id"]]})
    assert r.status_code == 400 and field in r.json()["errors"], r.text
    assert org.req("GET", f"/widgets/{w['id']}").json()[field] == []
    r = org.req("POST", "/widgets", json={"name": "w", field: [str(uuid.uuid4())]})
    assert r.status_code == 400 and field in r.json()["errors"], r.text


def test_body_may_repeat_its_organization_but_not_another(database, org, make_org):
    other = make_org()
    ok = org.req("POST", "/widgets", json={"name": "w", "organization_id": org.id})
    assert ok.status_code == 201, ok.text
    assert ok.json()["organization_id"] == org.id
    for path, body in (
        ("/widgets", {"name": "w"}),
        ("/metadata/purposes", {"description": {"en": "x"}}),
        ("/preferences", {"name": {"en": "x"}}),
        ("/widgets/deployments", {"widget_id": ok.json()["id"]}),
    ):
        r = org.req("POST", path, json={**body, "organization_id": other.id})
        assert r.status_code == 400, (path, r.text)
        assert "organization_id" in r.json()["errors"]
    listed = org.req("GET", "/widgets").json()
    assert [w["id"] for w in listed["data"]] == [ok.json()["id"]]
    assert org.req("GET", "/widgets/deployments").json() == []


def test_last_domain_used_follows_domain_unless_given(database, org):
    w = org.widget(domain="a.example.com")
    assert w["last_domain_used"] == "a.example.com"
    r = org.req("PATCH", f"/widgets/{w['id']}", json={"domain": "b.example.com"})
    assert r.json()["last_domain_used"] == "b.example.com"
    r = org.req(
        "PATCH",
        f"/widgets/{w['id']}",
        json={"domain": "c.example.com", "last_domain_used": "b.example.com"},
    )
    assert (r.json()["domain"], r.json()["last_domain_used"]) == ("c.example.com", "b.example.com")
