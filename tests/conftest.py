from __future__ import annotations

from collections.abc import Iterator

import pytest

import fraiseql


@pytest.fixture
def registry() -> Iterator[fraiseql.Registry]:
    """A fresh default registry per test, so declarations never leak between tests."""
    reg = fraiseql.Registry()
    old = fraiseql.set_registry(reg)
    try:
        yield reg
    finally:
        fraiseql.set_registry(old)


@pytest.fixture(params=["trigger", "logical"])
def capture(request: pytest.FixtureRequest) -> tuple[str, str]:
    """`(capture, database url)`: each capture mode on a server that supports it."""
    mode: str = request.param
    fixture = "fraiseql_database_url" if mode == "trigger" else "fraiseql_logical_database_url"
    return mode, request.getfixturevalue(fixture)
