"""No input causes a 500, and a refused write changes nothing: nullability, depth, size, finite
numbers, integer ranges and strict query integers are part of the schemas (400 naming the
field), on both databases."""

from __future__ import annotations

import json

import pytest

from api_stub.query import MAX_SKIP
from api_stub.schemas.common import (
    MAX_COMPONENTS_BYTES,
    MAX_JSON_DEPTH,
    MAX_METADATA_BYTES,
)

LIST_ROUTES = [
    "/widgets",
    "/metadata/purposes",
    "/preferences",
    "/widgets/deployments",
    "/widgets/archived",
    "/organizations",
]
JSON = {"content-type": "application/json"}


def bad_request(r, field: str) -> dict:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["name"] == "BadRequest", body
    assert any(k == field or k.startswith(field + ".") for k in body["errors"]), body
    return body


def send(org, method: str, path: str, raw: str | bytes):
    content = raw.encode() if isinstance(raw, str) else raw
    return org.req(method, path, content=content, headers=JSON)


def everything_still_reads(org, widget_id: str | None = None) -> None:
    for path in ("/widgets", "/metadata/purposes", "/preferences"):
        assert org.req("GET", path).status_code == 200, path
    if widget_id:
        assert org.req("GET", f"/widgets/{widget_id}").status_code == 200


NOT_NULL_WIDGET_FIELDS = [
    "name",
    "format",
    "template_id",
    "headless",
    "enabled_languages",
    "default_language",
    "selected_purposes_ids",
    "selected_preferences_ids",
    "components",
]


@pytest.mark.parametrize("field", NOT_NULL_WIDGET_FIELDS)
def test_null_where_a_widget_cannot_hold_one_is_400_and_nothing_changes(database, org, field):
    w = org.widget(components={"a": 1})
    r = org.req("PATCH", f"/widgets/{w['id']}", json={field: None, "theme_id": "changed"})
    body = bad_request(r, field)
    assert body["errors"][field] == "cannot be null"
    after = org.req("GET", f"/widgets/{w['id']}").json()
    assert after == w  # not even the valid part of the patch
    everything_still_reads(org, w["id"])


def test_null_is_fine_where_the_widget_holds_it(database, org):
    w = org.widget(domain="example.com", theme_id="t")
    r = org.req("PATCH", f"/widgets/{w['id']}", json={"domain": None, "theme_id": None})
    assert r.status_code == 200, r.text
    assert (r.json()["domain"], r.json()["theme_id"]) == (None, None)


@pytest.mark.parametrize("field", ["description", "metadata"])
def test_purpose_patch_fields_are_not_nullable(database, org, field):
    p = org.purpose()
    bad_request(org.req("PATCH", f"/metadata/purposes/{p['id']}", json={field: None}), field)


@pytest.mark.parametrize("field", ["name", "description", "type", "metadata", "values"])
def test_preference_patch_fields_are_not_nullable(database, org, field):
    p = org.preference()
    bad_request(org.req("PATCH", f"/preferences/{p['id']}", json={field: None}), field)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 500, 900])
def test_deep_json_is_400_and_never_stored(database, org, depth):
    w = org.widget()
    p = org.purpose()
    r = send(org, "PATCH", f"/widgets/{w['id']}", f'{{"components": {nested(depth)}}}')
    bad_request(r, "components")
    r = send(org, "PATCH", f"/metadata/purposes/{p['id']}", f'{{"metadata": {nested(depth)}}}')
    bad_request(r, "metadata")
    r = send(org, "POST", "/widgets", f'{{"name": "deep", "components": {nested(depth)}}}')
    bad_request(r, "components")
    everything_still_reads(org, w["id"])
    assert org.req("GET", "/widgets").json()["total"] == 1


def test_json_just_within_the_depth_limit_is_stored(database, org):
    # The body is one level, components one more: MAX_JSON_DEPTH - 2 objects inside fit.
    w = org.widget()
    r = send(org, "PATCH", f"/widgets/{w['id']}", f'{{"components": {nested(MAX_JSON_DEPTH - 1)}}}')
    assert r.status_code == 200, r.text
    everything_still_reads(org, w["id"])


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_refused(database, org, number):
    w = org.widget()
    p = org.preference()
    bad_request(
        send(org, "PATCH", f"/widgets/{w['id']}", f'{{"components": {{"max": {number}}}}}'),
        "components",
    )
    bad_request(
        send(
            org,
            "POST",
            "/metadata/purposes",
            f'{{"description": {{"en": "x"}}, "metadata": {{"score": [1, {number}]}}}}',
        ),
        "metadata",
    )
    r = send(
        org,
        "PATCH",
        f"/preferences/{p['id']}",
        f'{{"values": [{{"name": {{"en": "v"}}, "metadata": {{"x": {number}}}}}]}}',
    )
    bad_request(r, "values.0.metadata")
    assert org.req("GET", f"/widgets/{w['id']}").json()["components"] == {}
    assert org.req("GET", "/metadata/purposes").json()["total"] == 0


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (r'"a\u0000b"', "NUL"),  # PostgreSQL text and jsonb refuse NUL
        (r'"\ud800"', "surrogate"),  # not encodable as UTF-8
    ],
)
def test_unstorable_strings_are_400(database, org, raw, why):
    w = org.widget()
    bad_request(send(org, "POST", "/widgets", f'{{"name": {raw}}}'), "name")
    bad_request(send(org, "PATCH", f"/widgets/{w['id']}", f'{{"domain": {raw}}}'), "domain")
    bad_request(
        send(org, "PATCH", f"/widgets/{w['id']}", f'{{"components": {{"k": [{raw}]}}}}'),
        "components.k.0",
    )
    bad_request(
        send(org, "PATCH", f"/widgets/{w['id']}", f'{{"components": {{{raw}: 1}}}}'),
        "components",
    )
    bad_request(
        send(org, "POST", "/metadata/purposes", f'{{"description": {{"en": {raw}}}}}'),
        "description",
    )
    everything_still_reads(org, w["id"])


def test_metadata_and_components_sizes_are_bounded(database, org):
    w = org.widget()
    big_meta = {"x": "m" * MAX_METADATA_BYTES}
    bad_request(
        org.req(
            "POST", "/metadata/purposes", json={"description": {"en": "x"}, "metadata": big_meta}
        ),
        "metadata",
    )
    bad_request(
        org.req(
            "PATCH", f"/widgets/{w['id']}", json={"components": {"x": "c" * MAX_COMPONENTS_BYTES}}
        ),
        "components",
    )
    fits = {"x": "c" * (MAX_COMPONENTS_BYTES - 100)}
    r = org.req("PATCH", f"/widgets/{w['id']}", json={"components": fits})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("order", [2**31, -(2**31) - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
def test_preference_value_order_outside_32_bits_is_400(database, org, order):
    value = {"name": {"en": "v"}, "order": order}
    r = org.req("POST", "/preferences", json={"name": {"en": "p"}, "values": [value]})
    bad_request(r, "values.0.order")
    p = org.preference()
    r = org.req("PATCH", f"/preferences/{p['id']}", json={"values": [value]})
    bad_request(r, "values.0.order")
    assert org.req("GET", f"/preferences/{p['id']}").json() == p
    assert org.req("GET", "/preferences").json()["total"] == 1


def test_preference_value_order_at_the_32_bit_bounds_is_stored(database, org):
    values = [{"name": {"en": "lo"}, "order": -(2**31)}, {"name": {"en": "hi"}, "order": 2**31 - 1}]
    r = org.req("POST", "/preferences", json={"name": {"en": "p"}, "values": values})
    assert r.status_code == 201, r.text
    assert [v["order"] for v in r.json()["values"]] == [-(2**31), 2**31 - 1]


def admin_or_org(org, path: str, params: dict):
    if path == "/organizations":
        from tests.support.api import ADMIN

        return org.http.get(path, params=params, headers=ADMIN)
    return org.req("GET", path, params=params)


@pytest.mark.parametrize("path", LIST_ROUTES)
def test_huge_skip_and_limit_are_400_not_500(database, org, path):
    for name, value in (("$skip", 2**63), ("$skip", 10**40), ("$limit", 2**63), ("$limit", 2**64)):
        r = admin_or_org(org, path, {name: str(value)})
        bad_request(r, name)
    r = admin_or_org(org, path, {"$skip": str(MAX_SKIP)})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "raw", [" 5", "5 ", "+5", "5_0", "\u0665", "\uff15", "5.0", "0x5", "", "1e2"]
)
def test_query_integers_are_parsed_strictly(database, org, raw):
    for name in ("$limit", "$skip"):
        bad_request(org.req("GET", "/widgets", params={name: raw}), name)
    assert org.req("GET", "/widgets", params={"$limit": "05"}).json()["limit"] == 5


def test_malformed_json_and_wrong_types_name_the_problem(database, org):
    r = send(org, "POST", "/widgets", b'{"name": ')
    assert r.status_code == 400, r.text
    bad_request(org.req("POST", "/widgets", json={"name": "w", "headless": "maybe"}), "headless")
    bad_request(
        org.req("POST", "/widgets", json={"name": "w", "enabled_languages": ["x" * 17]}),
        "enabled_languages.0",
    )
    bad_request(org.req("POST", "/widgets", json=["not", "an", "object"]), "body")
    assert json.loads(org.req("GET", "/widgets").text)["total"] == 0
