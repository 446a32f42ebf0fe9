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
