"""Type stubs of the native module `fraiseql._native` (rust/python)."""

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, final

__all__ = [
    "ActionError",
    "AuthenticationError",
    "CheckpointError",
    "Condition",
    "ConditionError",
    "ConfigError",
    "ConnectError",
    "ConnectionSettingsError",
    "DeadLetterError",
    "DeadLetterNotFoundError",
    "Engine",
    "EngineError",
    "FraiseQLError",
    "InvalidMessageError",
    "JetStreamUnavailableError",
    "NoDatabaseError",
    "NotSetUpError",
    "ObserverGoneError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PublishError",
    "PublishTimeoutError",
    "Publisher",
    "RetryInProgressError",
    "SchemaError",
    "TlsError",
    "TransportError",
    "UndecodableEntryError",
    "UnreachableError",
    "__version__",
    "backfill",
    "check",
    "config_facts",
    "database_url",
    "db_install",
    "idempotency_prune",
]

__version__: str

class FraiseQLError(Exception): ...
class ConfigError(FraiseQLError): ...

class ConditionError(FraiseQLError):
    line: int
    column: int

class SchemaError(FraiseQLError): ...
class TransportError(FraiseQLError): ...

class ConnectError(TransportError):
    kind: str

class UnreachableError(ConnectError): ...
class ConnectionSettingsError(ConnectError): ...
class AuthenticationError(ConnectError): ...
class TlsError(ConnectError): ...
class PermissionDeniedError(ConnectError): ...
class JetStreamUnavailableError(ConnectError): ...
class NotSetUpError(ConnectError): ...

class PublishError(TransportError):
    kind: str

class PayloadTooLargeError(PublishError): ...
class PublishTimeoutError(PublishError): ...
class InvalidMessageError(PublishError): ...

class ActionError(FraiseQLError): ...
class CheckpointError(FraiseQLError): ...
class DeadLetterError(FraiseQLError):
    kind: str

class DeadLetterNotFoundError(DeadLetterError): ...
class UndecodableEntryError(DeadLetterError): ...
class ObserverGoneError(DeadLetterError): ...
class NoDatabaseError(DeadLetterError): ...
class RetryInProgressError(DeadLetterError): ...

class EngineError(FraiseQLError): ...

@final
class Condition:
    def __new__(cls, expr: str, fields: list[str] | None = None) -> Condition: ...
    def evaluate(
        self, new: Mapping[str, Any] | None = None, old: Mapping[str, Any] | None = None
    ) -> bool: ...
    @property
    def source(self) -> str: ...

_Source = tuple[str, str] | None

def check(
    main: _Source = None,
    runtime_file: _Source = None,
    entities: list[tuple[str, str, list[str], list[tuple[str, str]]]] | None = None,
    observers: list[dict[str, Any]] | None = None,
) -> dict[str, list[str]]: ...
def config_facts(main: _Source = None, runtime_file: _Source = None) -> dict[str, Any]: ...
def database_url(main: _Source = None, runtime_file: _Source = None) -> str | None: ...
def db_install(
    main: _Source = None,
    runtime_file: _Source = None,
    entities: list[tuple[str, str, list[str], list[tuple[str, str]]]] | None = None,
    uninstall: bool = False,
    print_only: bool = False,
) -> str: ...
def backfill(
    main: _Source,
    runtime_file: _Source,
    entities: list[tuple[str, str, list[str], list[tuple[str, str]]]],
    observers: list[dict[str, Any]],
    entity: str,
    filter: str | None = None,
    only: list[str] = ...,
    chunk: int = 1000,
    restart: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]: ...
def idempotency_prune(
    main: _Source,
    runtime_file: _Source,
    tables: list[str],
    older_than_secs: float,
    batch: int = 10_000,
) -> list[tuple[str, int]]: ...

@final
class Publisher:
    def __new__(
        cls,
        main: _Source = None,
        runtime_file: _Source = None,
        config: Mapping[str, Any] | None = None,
        entities: list[tuple[str, str, list[str], list[tuple[str, str]]]] | None = None,
    ) -> Publisher: ...
    def publish(
        self,
        entity: str,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> str: ...
    def publish_async(
        self,
        entity: str,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> Any: ...

@final
class Engine:
    def __new__(
        cls,
        main: _Source = None,
        runtime_file: _Source = None,
        config: Mapping[str, Any] | None = None,
        entities: list[tuple[str, str, list[str], list[tuple[str, str]]]] | None = None,
        observers: list[dict[str, Any]] | None = None,
    ) -> Engine: ...
    def start(self, event_loop: Any = None, http_port: int | None = None) -> None: ...
    @property
    def http_port(self) -> int | None: ...
    @property
    def configured_http_port(self) -> int: ...
    @property
    def backend(self) -> str: ...
    @property
    def observer_names(self) -> list[str]: ...
    @property
    def pending(self) -> int: ...
    def emit(
        self,
        entity: str,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> str: ...
    def emit_async(
        self,
        entity: str,
        event: str,
        new: Mapping[str, Any] | None = None,
        old: Mapping[str, Any] | None = None,
        id: str | None = None,
    ) -> Awaitable[str]: ...
    def drain(self) -> None: ...
    def drain_async(self) -> Awaitable[None]: ...
    def stop(self) -> None: ...
    def stop_async(self) -> Awaitable[None]: ...
    def dlq_list(self, limit: int = 1000) -> list[dict[str, Any]]: ...
    def dlq_retry(self, id: int) -> bool: ...
    def dlq_retry_async(self, id: int) -> Awaitable[bool]: ...
    def dlq_remove(self, ids: list[int]) -> int: ...
    def dlq_purge(self) -> int: ...
    def open_dead_letters(self) -> None: ...
    def metrics_text(self) -> str: ...
