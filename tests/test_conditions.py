"""The spec's "Conditions" section, evaluated on INSERT and UPDATE events."""

from __future__ import annotations

from typing import Any

import pytest

import fraiseql

ORDER = {
    "id": "o1",
    "status": "shipped",
    "total": 1500,
    "is_premium": True,
    "email": "a@x.io",
    "retry_count": 0,
    "quantity": 5,
    "min_quantity": 3,
}


def row(**changes: Any) -> dict[str, Any]:
    return {**ORDER, **changes}


# (condition, new, old, expected): old=None is an INSERT.
CASES = [
    ("total > 1000", row(), None, True),
    ("total > 1000", row(total=1000), None, False),
    ("total > 1000", row(total=1000.5), row(), True),
    ("status == 'active'", row(status="active"), None, True),
    ("status == 'active'", row(), None, False),
    ("is_premium == true", row(), None, True),
    ("is_premium == true", row(is_premium=False), row(), False),
    ("status.changed() && status == 'shipped'", row(), row(status="pending"), True),
    ("status.changed() && status == 'shipped'", row(), row(), False),  # unchanged
    ("status.changed() && status == 'shipped'", row(status="cancelled"), row(status="pending"), False),
    ("status.changed() && status == 'shipped'", row(), None, False),  # INSERT: nothing changed
    ("status.old == 'pending' && status == 'approved'", row(status="approved"), row(status="pending"), True),
    ("status.old == 'pending' && status == 'approved'", row(status="approved"), row(status="new"), False),
    ("status.old == 'pending' && status == 'approved'", row(status="approved"), None, False),
    ("email.changed()", row(email="b@x.io"), row(), True),
    ("email.changed()", row(), row(), False),
    ("total > 1000 && is_premium == true", row(), None, True),
    ("total > 1000 && is_premium == true", row(is_premium=False), None, False),
    ("status == 'failed' || retry_count > 3", row(status="failed"), None, True),
    ("status == 'failed' || retry_count > 3", row(retry_count=4), row(), True),
    ("status == 'failed' || retry_count > 3", row(retry_count=3), row(), False),
    ("quantity > min_quantity", row(), None, True),
    ("quantity > min_quantity", row(quantity=3), row(), False),
    ("total>100", row(), None, True),  # no spaces needed
    ("total == 1500.0", row(), None, True),  # numbers compare numerically
    ("status.new == 'shipped'", row(), row(status="pending"), True),
    ('!(total < 10) && "shipped" == status', row(), None, True),
]


@pytest.mark.parametrize(("expr", "new", "old", "expected"), CASES)
def test_spec_conditions(expr: str, new: dict[str, Any], old: dict[str, Any] | None, expected: bool) -> None:
    assert fraiseql.Condition(expr).evaluate(new, old) is expected


def test_nested_paths_read_json_objects() -> None:
    c = fraiseql.Condition("customer.address.city == 'Lyon'")
    assert c.evaluate({"customer": {"address": {"city": "Lyon"}}})
    assert not c.evaluate({"customer": None})


def test_syntax_error_reports_line_column_and_caret() -> None:
    with pytest.raises(fraiseql.ConditionError) as info:
        fraiseql.Condition("total >\n  && x")
    err = info.value
    assert (err.line, err.column) == (2, 3)  # type: ignore[attr-defined]
    assert "line 2, column 3" in str(err)
    assert "^" in str(err)


def test_unknown_field_of_a_declared_type_suggests_the_closest(registry: fraiseql.Registry) -> None:
    @fraiseql.type
    class Order:
        id: str
        total: float

    with pytest.raises(fraiseql.ConditionError, match=r"unknown field `totl`.*did you mean `total`"):
        fraiseql.Condition("totl > 100", entity=Order)
    assert fraiseql.Condition("total > 100", entity="Order").evaluate({"total": 101})


def test_rows_must_be_dicts() -> None:
    with pytest.raises(TypeError, match="`new` must be a dict"):
        fraiseql.Condition("a == 1").evaluate([1, 2])  # type: ignore[arg-type]
