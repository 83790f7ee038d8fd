"""Unit tests of the Didomi list-query parser (no services needed)."""

from __future__ import annotations

import pytest

from api_stub.errors import ApiError
from api_stub.query import DEFAULT_LIMIT, MAX_LIMIT, ListQuery, parse_list_query


def parse(*params: tuple[str, str], filters: tuple[str, ...] = ()) -> ListQuery:
    return parse_list_query(list(params), filters)


def rejected(*params: tuple[str, str], filters: tuple[str, ...] = ()) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(*params, filters=filters)
    assert info.value.code == 400, info.value.message
    return info.value


def test_defaults_when_no_parameters():
    q = parse()
    assert (q.limit, q.skip, q.sort, dict(q.filters)) == (100, 0, (), {})
    assert DEFAULT_LIMIT == 100
    assert MAX_LIMIT == 1000


def test_organization_id_is_a_routing_parameter_not_a_filter():
    q = parse(("organization_id", "0b7c1f4e-aaaa-bbbb-cccc-000000000000"))
    assert dict(q.filters) == {}
    assert q.limit == DEFAULT_LIMIT


@pytest.mark.parametrize("value", ["0", "1", "37", "1000"])
def test_limit_up_to_the_maximum_is_accepted(value):
    assert parse(("$limit", value)).limit == int(value)


@pytest.mark.parametrize("value", ["1001", "5000", "-1", "ten", "", "1.5"])
def test_limit_above_maximum_negative_or_not_an_integer_is_400(value):
    err = rejected(("$limit", value))
    assert "$limit" in err.errors


def test_skip_is_parsed():
    assert parse(("$skip", "250")).skip == 250
    assert parse(("$skip", "0")).skip == 0


@pytest.mark.parametrize("value", ["-1", "-100", "abc", ""])
def test_negative_or_non_integer_skip_is_400(value):
    err = rejected(("$skip", value))
    assert "$skip" in err.errors


@pytest.mark.parametrize("field", ["created_at", "updated_at"])
@pytest.mark.parametrize("direction", ["1", "-1"])
def test_sort_on_timestamps_in_both_directions(field, direction):
    q = parse((f"$sort[{field}]", direction))
    assert q.sort == ((field, int(direction)),)


def test_several_sort_keys_keep_their_order():
    q = parse(("$sort[updated_at]", "-1"), ("$sort[created_at]", "1"))
    assert q.sort == (("updated_at", -1), ("created_at", 1))


@pytest.mark.parametrize("field", ["name", "id", "organization_id", "", "created_at]["])
def test_sort_on_other_fields_is_400(field):
    name = f"$sort[{field}]"
    err = rejected((name, "1"))
    assert name in err.errors


@pytest.mark.parametrize("direction", ["0", "2", "-2", "asc", "desc", "", "+1", " 1"])
def test_sort_direction_other_than_1_or_minus_1_is_400(direction):
    err = rejected(("$sort[created_at]", direction))
    assert "$sort[created_at]" in err.errors


@pytest.mark.parametrize("name", ["name", "$select", "$sort", "$limit[x]", "widget_id"])
def test_unknown_parameter_is_400_naming_it(name):
    # widget_id is unknown here because the route declares no filters.
    err = rejected((name, "x"))
    assert name in err.errors
    assert name in err.message


def test_declared_equality_filter_is_collected():
    wid = "3f1a7c0e-5d2b-4c61-9e8f-0123456789ab"
    q = parse(("widget_id", wid), ("$limit", "5"), filters=("widget_id",))
    assert dict(q.filters) == {"widget_id": wid}
    assert q.limit == 5


@pytest.mark.parametrize(
    "value",
    ["../etc", "a/b", "a..b", "..", "", "a\x00b", "a\nb", "x" * 65, "-leading-dash", "a b"],
)
def test_filter_value_that_is_not_a_safe_id_is_400(value):
    err = rejected(("widget_id", value), filters=("widget_id",))
    assert "widget_id" in err.errors


def test_filter_value_of_exactly_64_characters_is_accepted():
    value = "a" * 64
    assert dict(parse(("widget_id", value), filters=("widget_id",)).filters) == {"widget_id": value}


def test_error_message_names_sortable_fields():
    err = rejected(("$sort[name]", "1"))
    assert "created_at" in err.message
    assert "updated_at" in err.message
