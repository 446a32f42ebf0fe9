"""`fraiseql.Condition`: compile a condition once, evaluate it against rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _native
from ._schema import registry


class Condition:
    """A compiled condition. With `entity` (a `@fraiseql.type` or its name), naming a field the
    type does not declare raises `fraiseql.ConditionError` with a did-you-mean."""

    __slots__ = ("_compiled",)

    def __init__(self, expr: str, entity: str | type | None = None) -> None:
        fields: list[str] | None = None
        if entity is not None:
            cls = entity if isinstance(entity, type) else registry().types.get(entity)
            info = getattr(cls, "__fraiseql_entity__", None)
            if info is None:
                raise _native.SchemaError(f"{entity!r} is not a declared @fraiseql.type")
            fields = list(info.fields)
        self._compiled = _native.Condition(expr, fields)

    def evaluate(self, new: Mapping[str, Any] | None, old: Mapping[str, Any] | None = None) -> bool:
        """True if the condition holds for this change (`old` is the previous row of an UPDATE)."""
        return self._compiled.evaluate(new, old)

    @property
    def source(self) -> str:
        return self._compiled.source

    def __repr__(self) -> str:
        return f"fraiseql.Condition({self.source!r})"
