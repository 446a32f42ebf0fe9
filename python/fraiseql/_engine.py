"""`fraiseql.Engine`: the native engine with the registered schema, usable from sync code
and from asyncio."""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _native
from ._schema import Registry, _entity_name, make_invoke, registry

ConfigSource = tuple[str, str]


def read_source(path: str | os.PathLike[str] | None) -> ConfigSource | None:
    """(label, text) of a config file, for error messages that name the file."""
    if path is None:
        return None
    p = Path(path)
    try:
        return (str(p), p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _native.ConfigError(f"{p}: config file not found") from None
    except UnicodeDecodeError as e:
        raise _native.ConfigError(f"{p}: not UTF-8 text ({e})") from None


def native_observers(reg: Registry) -> list[dict[str, Any]]:
    """The registry's observers with their Python functions adapted for the native engine."""
    out = []
    for decl in reg.observers:
        d = dict(decl)
        fn = d.get("function")
        if fn is not None:
            cls = reg.types.get(d["entity"])
            d["function"] = make_invoke(fn, cls)
            d["is_async"] = inspect.iscoroutinefunction(fn)
        out.append(d)
    return out


class _LoopThread:
    """An asyncio loop on a daemon thread, for `async def` handlers when the engine is driven
    from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fraiseql-asyncio", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Engine:
    """The observer engine.

    `config`: a path to `fraiseql.toml`, a dict of the same shape, or None for an in-memory
    engine (tests and embedding). `runtime_config`: a path to `fraiseql-observer.toml`.
    `http_port`: serve /health and /metrics (0 = a free port); None = no HTTP server.
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        *,
        runtime_config: str | os.PathLike[str] | None = None,
        schema: Registry | None = None,
        http_port: int | None = None,
    ) -> None:
        reg = schema or registry()
        main: ConfigSource | None = None
        config_dict: dict[str, Any] | None = None
        if config is None:
            config_dict = {"observers": {"backend": "in_memory"}}
        elif isinstance(config, Mapping):
            config_dict = dict(config)
        else:
            main = read_source(config)
        self._native = _native.Engine(
            main=main,
            runtime_file=read_source(runtime_config),
            config=config_dict,
            entities=reg.entities(),
            observers=native_observers(reg),
        )
        self._http_port = http_port
        self._loop_thread: _LoopThread | None = None
        self._handler_loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Engine:
        """Starts the engine; `async def` handlers run on a loop thread of its own."""
        self._loop_thread = _LoopThread()
        self._handler_loop = self._loop_thread.loop
        try:
            self._native.start(self._handler_loop, self._http_port)
        except BaseException:
            self._close_loop()
            raise
        return self

    async def start_async(self) -> Engine:
        """Starts the engine; `async def` handlers run on the calling event loop."""
        self._handler_loop = asyncio.get_running_loop()
        self._native.start(self._handler_loop, self._http_port)
        return self

    def stop(self) -> None:
        """Stops accepting events, finishes those accepted, and stops."""
        self._refuse_on_handler_loop("stop")
        self._native.stop()
        self._close_loop()

    async def stop_async(self) -> None:
        await self._native.stop_async()
        self._close_loop()

    def _close_loop(self) -> None:
        if self._loop_thread is not None:
            self._loop_thread.close()
            self._loop_thread = None

    def _refuse_on_handler_loop(self, what: str) -> None:
        # Blocking the loop that runs async handlers while waiting for them would deadlock.
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self._handler_loop:
            raise _native.EngineError(
                f"Engine.{what}() would block the event loop that runs async handlers; "
                f"use `await engine.{what}_async()`"
            )

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Engine:
        return await self.start_async()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_async()

    # -- events ----------------------------------------------------------------------------
    def emit(
        self,
        entity: str | type,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
    ) -> str:
        """Queues one change (in_memory transport); returns its event id. Blocks while the
        queue is full."""
        return self._native.emit(_entity_name(entity), event, new, old, id)

    async def emit_async(
        self,
        entity: str | type,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
    ) -> str:
        return await self._native.emit_async(_entity_name(entity), event, new, old, id)

    def drain(self) -> None:
        """Waits until every emitted event has been processed or dead-lettered."""
        self._refuse_on_handler_loop("drain")
        self._native.drain()

    async def drain_async(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._native.drain_async(), timeout)

    @property
    def pending(self) -> int:
        return self._native.pending

    # -- dead-letter queue -----------------------------------------------------------------
    def dlq(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Dead-lettered entries, oldest first: id, event, observer, action, error, attempts…"""
        return self._native.dlq_list(limit)

    def retry_dead_letter(self, entry_id: int) -> bool:
        """Re-runs the entry's action; removes it on success. False if it failed again."""
        self._refuse_on_handler_loop("retry_dead_letter")
        return self._native.dlq_retry(entry_id)

    async def retry_dead_letter_async(self, entry_id: int) -> bool:
        return await self._native.dlq_retry_async(entry_id)

    def open_dead_letters(self) -> Engine:
        """Opens the database's dead-letter queue without starting the engine (what
        `fraiseql dlq` does): `dlq()`, `retry_dead_letter()` and `purge_dead_letters()` then
        work on the durable entries of every instance."""
        self._native.open_dead_letters()
        return self

    def purge_dead_letters(self) -> int:
        """Deletes every entry; returns how many there were."""
        return self._native.dlq_purge()

    def remove_dead_letters(self, entry_ids: list[int]) -> int:
        """Deletes the entries with these ids; returns how many there were."""
        return self._native.dlq_remove(entry_ids)

    # -- introspection ---------------------------------------------------------------------
    @property
    def http_port(self) -> int | None:
        return self._native.http_port

    @property
    def backend(self) -> str:
        return self._native.backend

    @property
    def observers(self) -> list[str]:
        """Observer names in execution order."""
        return self._native.observer_names

    def metrics(self) -> str:
        """Prometheus text of /metrics."""
        return self._native.metrics_text()
