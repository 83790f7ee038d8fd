"""What a newcomer meets first: ``/`` says what the server is and links to its docs, a path no
route serves is a 404 (not "authentication required"), and a malformed JSON body names the line
and column of the mistake."""

from __future__ import annotations

from typing import Any

import pytest


def test_the_root_is_a_public_index_whose_links_answer(sqlite_database: str, api: Any) -> None:
    r = api.get("/")
    assert r.status_code == 200, r.text
    index = r.json()
    assert index["name"] and index["docs"] == "/docs" and index["health"] == "/health"
    for link in ("docs", "openapi", "health"):
        assert api.get(index[link]).status_code in (200, 503), link  # health: 503 when degraded


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/widgetz"),
        ("POST", "/widgets/w1/deployments/extra/segments"),
        ("DELETE", "/organizations-and-more"),
    ],
)
def test_a_path_no_route_serves_is_a_404_with_or_without_a_token(
    sqlite_database: str, api: Any, org: Any, method: str, path: str
) -> None:
    anonymous = api.request(method, path)
    assert anonymous.status_code == 404, anonymous.text
    assert anonymous.json()["code"] == 404 and "Not Found" in anonymous.json()["message"]
    assert org.req(method, path).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/widgets"), ("PUT", "/widgets"), ("GET", "/widgets/w1"), ("GET", "/organizations")],
)
def test_a_path_a_route_serves_still_asks_for_credentials_first(
    sqlite_database: str, api: Any, method: str, path: str
) -> None:
    r = api.request(method, path)
    assert r.status_code == 401, (method, path, r.text)


@pytest.mark.parametrize(
    ("body", "line", "column"),
    [
        (b'{"name": }', 1, 10),
        (b'{\n  "name": "w",\n  "format": ,\n}', 3, 13),
        (b'{\n  "name": "w"\n  "format": "popin"\n}', 3, 3),
    ],
    ids=["first-line", "third-line-value", "missing-comma"],
)
def test_malformed_json_names_the_line_and_column(
    sqlite_database: str, org: Any, body: bytes, line: int, column: int
) -> None:
    r = org.req("POST", "/widgets", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["errors"]
    assert list(error) == ["body"], error  # not a character offset posing as a field
    assert f"line {line}, column {column}" in error["body"], error
    assert f"line {line}, column {column}" in r.json()["message"]
