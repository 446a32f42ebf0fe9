"""`fraiseql.publish(...)`: an application publishes a change to JetStream itself.

The message is exactly what the bridge publishes for a captured row (subject
`{subject_prefix}.{entity}.{event}`, the spec's JSON body plus `id` and `old`, header
`Nats-Msg-Id` = the event id), so observers and downstream services cannot tell the two
apart. Each call returns once the server acknowledged the message.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _native
from ._engine import read_source
from ._schema import EntityInfo, registry

_ConfigArg = str | os.PathLike[str] | Mapping[str, Any] | None


def _entity_name(entity: str | type) -> str:
    if isinstance(entity, str):
        return entity
    info: EntityInfo | None = getattr(entity, "__fraiseql_entity__", None)
    if info is None:
        raise TypeError(f"{entity!r} is neither an entity name nor a @fraiseql.type class")
    return info.name


class Publisher:
    """A connection to the NATS server of `[observers.nats]` (from `fraiseql.toml`, another
    file, or a dict of the same shape); the stream is created or updated on connect."""

    def __init__(
        self, config: _ConfigArg = None, *, runtime_config: str | os.PathLike[str] | None = None
    ) -> None:
        main = None
        config_dict = None
        if isinstance(config, Mapping):
            config_dict = dict(config)
        else:
            main = read_source(config if config is not None else Path("fraiseql.toml"))
        self._native = _native.Publisher(
            main=main,
            runtime_file=read_source(runtime_config),
            config=config_dict,
            entities=registry().entities(),
        )

    def publish(
        self,
        entity: str | type,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
    ) -> str:
        """Publishes one change (`event` is INSERT, UPDATE or DELETE); returns its event id.
        Pass `id` to make a retry of the same change a duplicate the stream drops."""
        return self._native.publish(_entity_name(entity), event, new, old, id)

    async def publish_async(
        self,
        entity: str | type,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
    ) -> str:
        result: str = await self._native.publish_async(_entity_name(entity), event, new, old, id)
        return result


_default: Publisher | None = None
_default_lock = threading.Lock()


def publish(
    entity: str | type,
    event: str,
    new: Mapping[str, Any] | None = None,
    old: Mapping[str, Any] | None = None,
    *,
    id: str | None = None,
) -> str:
    """Publishes one change with the publisher of `./fraiseql.toml` (connected on first use
    and kept); returns the event id. Use `fraiseql.Publisher(config)` for another config."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Publisher()
        publisher = _default
    return publisher.publish(entity, event, new, old, id=id)
