"""Declarations: entity types, observers, retry and checkpoint policies, and the registry
that collects them in definition order for the engine."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import decimal
import inspect
import re
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

from . import _native

T = TypeVar("T")
BackoffStrategy = Literal["fixed", "linear", "exponential"]
_EVENTS = {"INSERT", "UPDATE", "DELETE", "CREATE"}


def default_table(entity: str) -> str:
    """`Order` → `tb_order`, `OrderItem` → `tb_order_item` (the engine uses the same rule)."""
    return "tb_" + re.sub(r"(?<!^)(?=[A-Z])", "_", entity).lower()


@dataclasses.dataclass(frozen=True)
class Retry:
    """Per-observer retry policy (spec: max_attempts default 3, backoff with jitter)."""

    max_attempts: int = 3
    backoff_strategy: BackoffStrategy = "exponential"
    initial_delay_ms: int = 100
    max_delay_ms: int = 30_000
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"Retry.max_attempts must be at least 1, got {self.max_attempts}")
        if self.backoff_strategy not in ("fixed", "linear", "exponential"):
            raise ValueError(
                "Retry.backoff_strategy must be 'fixed', 'linear' or 'exponential', "
                f"got {self.backoff_strategy!r}"
            )
        if self.initial_delay_ms < 0 or self.max_delay_ms < self.initial_delay_ms:
            raise ValueError("Retry needs 0 <= initial_delay_ms <= max_delay_ms")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AtLeastOnce:
    """Default strategy: an event may be processed more than once after a crash."""

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": "at_least_once"}


@dataclasses.dataclass(frozen=True)
class EffectivelyOnce:
    """Deduplicates through an idempotency table: the key is recorded before the action."""

    idempotency_table: str = "fraiseql_observer_idempotency"

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": "effectively_once", "idempotency_table": self.idempotency_table}


Checkpoint = AtLeastOnce | EffectivelyOnce


@dataclasses.dataclass(frozen=True)
class Event:
    """The change a handler was called for (passed when the handler takes a second argument)."""

    id: str
    entity: str
    event: str
    table: str
    timestamp: str
    new: dict[str, Any] | None
    old: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class EntityInfo:
    name: str
    table: str
    fields: tuple[str, ...]
    converters: Mapping[str, Callable[[Any], Any]]
    kinds: Mapping[str, str]


def _converter(annotation: Any) -> Callable[[Any], Any] | None:
    """How to turn a JSON value into the annotated Python type, if it needs turning."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _converter(args[0]) if len(args) == 1 else None
    if annotation is _dt.datetime:
        return lambda v: _dt.datetime.fromisoformat(v) if isinstance(v, str) else v
    if annotation is _dt.date:
        return lambda v: _dt.date.fromisoformat(v[:10]) if isinstance(v, str) else v
    if annotation is uuid.UUID:
        return lambda v: uuid.UUID(v) if isinstance(v, str) else v
    if annotation is decimal.Decimal:
        return lambda v: decimal.Decimal(str(v)) if isinstance(v, (int, float, str)) else v
    return None


def _json_kind(annotation: Any) -> str | None:
    """The JSON kind a field of this type holds in a captured row, when there is one:
    `text`, `number` or `boolean` (`Optional[X]` is X's; dates and UUIDs are text)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _json_kind(args[0]) if len(args) == 1 else None
    annotation = getattr(annotation, "__supertype__", annotation)  # NewType("ID", str) is str
    if annotation is bool:
        return "boolean"
    if annotation in (int, float, decimal.Decimal):
        return "number"
    if annotation in (str, _dt.datetime, _dt.date, _dt.time, uuid.UUID):
        return "text"
    return None


def _entity_from_row(cls: type[T], row: Mapping[str, Any] | None) -> T:
    info: EntityInfo = cls.__fraiseql_entity__  # type: ignore[attr-defined]
    obj = cls.__new__(cls)
    row = row or {}
    for name in info.fields:
        value = row.get(name)
        conv = info.converters.get(name)
        if conv is not None and value is not None:
            # On a format quirk keep the raw value rather than fail the handler.
            with contextlib.suppress(ValueError, TypeError, decimal.InvalidOperation):
                value = conv(value)
        object.__setattr__(obj, name, value)
    return obj


class Registry:
    """Types and observers in definition order. `fraiseql.registry()` is the default one."""

    def __init__(self) -> None:
        self.types: dict[str, type] = {}
        self.observers: list[dict[str, Any]] = []

    def add_type(self, cls: type) -> None:
        info: EntityInfo = cls.__fraiseql_entity__  # type: ignore[attr-defined]
        if info.name in self.types and self.types[info.name] is not cls:
            raise _native.SchemaError(f"type `{info.name}` is declared twice")
        self.types[info.name] = cls

    def add_observer(self, decl: dict[str, Any]) -> None:
        if any(o["name"] == decl["name"] for o in self.observers):
            raise _native.SchemaError(
                f"observer `{decl['name']}` is declared twice ({decl['origin']}); names must be unique"
            )
        self.observers.append(decl)

    def entities(self) -> list[tuple[str, str, list[str], list[tuple[str, str]]]]:
        """Each type as the engine takes it: name, table, fields, and the JSON kind of the
        fields whose type has one (conditions comparing them with a literal are checked)."""
        out = []
        for cls in self.types.values():
            info: EntityInfo = cls.__fraiseql_entity__  # type: ignore[attr-defined]
            out.append((info.name, info.table, list(info.fields), list(info.kinds.items())))
        return out

    def clear(self) -> None:
        self.types.clear()
        self.observers.clear()


_default = Registry()


def registry() -> Registry:
    """The registry that decorators write to."""
    return _default


def set_registry(reg: Registry) -> Registry:
    """Swaps the default registry (tests isolate themselves this way); returns the old one."""
    global _default
    old, _default = _default, reg
    return old


def _init(self: Any, **values: Any) -> None:
    info: EntityInfo = type(self).__fraiseql_entity__
    unknown = set(values) - set(info.fields)
    if unknown:
        raise TypeError(f"{info.name} has no field(s) {', '.join(sorted(unknown))}")
    for name in info.fields:
        object.__setattr__(self, name, values.get(name))


def _repr(self: Any) -> str:
    info: EntityInfo = type(self).__fraiseql_entity__
    body = ", ".join(f"{f}={getattr(self, f, None)!r}" for f in info.fields)
    return f"{info.name}({body})"


def _eq(self: object, other: object) -> bool:
    """Entities are equal when they are of the same type with equal fields."""
    info: EntityInfo = getattr(self, "__fraiseql_entity__")  # noqa: B009
    return type(self) is type(other) and all(getattr(self, f) == getattr(other, f) for f in info.fields)


@typing.overload
def type_(cls: type[T], /) -> type[T]: ...
@typing.overload
def type_(*, table: str | None = None, name: str | None = None) -> Callable[[type[T]], type[T]]: ...


def type_(
    cls: type[T] | None = None, /, *, table: str | None = None, name: str | None = None
) -> type[T] | Callable[[type[T]], type[T]]:
    """Declares an entity: `@fraiseql.type` or `@fraiseql.type(table="orders")`."""

    def wrap(c: type[T]) -> type[T]:
        hints = typing.get_type_hints(c)
        fields = tuple(n for n in inspect.get_annotations(c) if not n.startswith("_"))
        entity = name or c.__name__
        converters = {f: conv for f in fields if (conv := _converter(hints.get(f))) is not None}
        kinds = {f: kind for f in fields if (kind := _json_kind(hints.get(f))) is not None}
        info = EntityInfo(entity, table or default_table(entity), fields, converters, kinds)
        c.__fraiseql_entity__ = info  # type: ignore[attr-defined]
        if "__init__" not in c.__dict__:
            c.__init__ = _init  # type: ignore[method-assign]
        if "__repr__" not in c.__dict__:
            c.__repr__ = _repr  # type: ignore[method-assign]
        if "__eq__" not in c.__dict__:
            c.__eq__ = _eq  # type: ignore[method-assign]
        _default.add_type(c)
        return c

    return wrap(cls) if cls is not None else wrap


def _entity_name(entity: str | type) -> str:
    if isinstance(entity, str):
        return entity
    info = getattr(entity, "__fraiseql_entity__", None)
    if info is None:
        raise TypeError(f"{entity!r} is not a @fraiseql.type")
    return str(info.name)


def _origin(depth: int = 2) -> str:
    frame = inspect.stack()[depth]
    return f"{frame.filename}:{frame.lineno}"


def _event(value: str, what: str) -> str:
    if value.upper() not in _EVENTS:
        raise ValueError(
            f"{what} must be INSERT, UPDATE or DELETE (or create, update, delete), got {value!r}"
        )
    return value.upper()


def _checkpoint(value: Checkpoint | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, (AtLeastOnce, EffectivelyOnce)):
        raise TypeError("checkpoint must be fraiseql.AtLeastOnce() or fraiseql.EffectivelyOnce(...)")
    return value.to_dict()


def _retry(value: Retry | None) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Retry):
        raise TypeError("retry must be a fraiseql.Retry(...)")
    return value.to_dict()


def subscription(
    entity_type: str | type,
    topic: str | None = None,
    operation: str = "create",
    *,
    condition: str | None = None,
    checkpoint: Checkpoint | None = None,
    retry: Retry | None = None,
    name: str | None = None,
    timeout_ms: int | None = None,
    ordering: Literal["per_key", "none"] | None = None,
    order_key: list[str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Runs the decorated function (sync or `async def`) for each matching change.

    The function receives an instance of the entity type; if it takes a second parameter it
    also receives the `fraiseql.Event`. `topic` is informational (the NATS subject suffix).
    A call that takes longer than `timeout_ms` (default 30 s) fails with reason `timeout`
    and is retried under `retry`. `ordering="per_key"` (the default, `[observers] ordering`)
    runs the changes of one key (`order_key`, default `["id"]`) one at a time in commit order.
    """
    entity = _entity_name(entity_type)
    event = _event(operation, "operation")
    origin = _origin()

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError("@fraiseql.subscription decorates a function")
        _default.add_observer(
            {
                "name": name or fn.__name__,
                "entity": entity,
                "event": event,
                "condition": condition,
                "retry": _retry(retry),
                "checkpoint": _checkpoint(checkpoint),
                "function": fn,
                "topic": topic,
                "timeout_ms": timeout_ms,
                "ordering": ordering,
                "order_key": order_key,
                "origin": origin,
            }
        )
        return fn

    return wrap


def observer(
    *,
    name: str,
    entity: str | type,
    event: str,
    condition: str | None = None,
    actions: list[dict[str, Any]] | None = None,
    handler: Callable[..., Any] | None = None,
    retry: Retry | None = None,
    checkpoint: Checkpoint | None = None,
    timeout_ms: int | None = None,
    ordering: Literal["per_key", "none"] | None = None,
    order_key: list[str] | None = None,
) -> None:
    """Declares an observer made of built-in actions (`fraiseql.webhook/slack/email`) and/or a
    Python `handler`. Same fields as a `[[observers.handlers]]` table; `timeout_ms` bounds
    one call of `handler` (default 30 s)."""
    actions = list(actions or [])
    if not actions and handler is None:
        raise ValueError(f"observer {name!r} needs at least one action or a handler")
    for a in actions:
        if not isinstance(a, dict) or "type" not in a:
            raise TypeError(f"observer {name!r}: actions must be built with fraiseql.webhook/slack/email")
    _default.add_observer(
        {
            "name": name,
            "entity": _entity_name(entity),
            "event": _event(event, "event"),
            "condition": condition,
            "retry": _retry(retry),
            "checkpoint": _checkpoint(checkpoint),
            "actions": actions or None,
            "function": handler,
            "timeout_ms": timeout_ms,
            "ordering": ordering,
            "order_key": order_key,
            "origin": _origin(),
        }
    )


def make_invoke(fn: Callable[..., Any], cls: type | None) -> Callable[..., Any]:
    """Adapts a user handler to the native calling convention
    `invoke(new, old, id, entity, event, table, timestamp)`."""
    params = inspect.signature(fn).parameters
    required = [
        p
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    # The event is passed when asked for: a second required parameter, or one named `event`.
    wants_event = len(required) >= 2 or "event" in params

    def invoke(new: Any, old: Any, id: str, entity: str, event: str, table: str, ts: str) -> Any:
        row = new if new is not None else old
        obj = _entity_from_row(cls, row) if cls is not None else row
        if wants_event:
            return fn(obj, Event(id, entity, event, table, ts, new, old))
        return fn(obj)

    return invoke
