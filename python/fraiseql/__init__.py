"""fraiseql: database changes → reliable actions and NATS JetStream events.

Declare entity types with `@fraiseql.type`, observers with `@fraiseql.subscription` or
`fraiseql.observer(...)`, and run them with `fraiseql run` or `fraiseql.Engine`.
"""

from __future__ import annotations

from . import scalars
from ._engine import Engine
from ._native import (
    ActionError,
    AuthenticationError,
    CheckpointError,
    ConditionError,
    ConfigError,
    ConnectError,
    ConnectionSettingsError,
    DeadLetterError,
    DeadLetterNotFoundError,
    EngineError,
    FraiseQLError,
    InvalidMessageError,
    JetStreamUnavailableError,
    NoDatabaseError,
    NotSetUpError,
    ObserverGoneError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PublishError,
    PublishTimeoutError,
    RetryInProgressError,
    SchemaError,
    TlsError,
    TransportError,
    UndecodableEntryError,
    UnreachableError,
)
from ._native import __version__ as __version__
from ._publish import Publisher, publish
from ._schema import (
    AtLeastOnce,
    EffectivelyOnce,
    Event,
    Registry,
    Retry,
    observer,
    registry,
    set_registry,
    subscription,
)
from ._schema import type_ as type
from .actions import email, slack, webhook
from .condition import Condition

__all__ = [
    "ActionError",
    "AtLeastOnce",
    "AuthenticationError",
    "CheckpointError",
    "Condition",
    "ConditionError",
    "ConfigError",
    "ConnectError",
    "ConnectionSettingsError",
    "DeadLetterError",
    "DeadLetterNotFoundError",
    "EffectivelyOnce",
    "Engine",
    "EngineError",
    "Event",
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
    "Registry",
    "Retry",
    "RetryInProgressError",
    "SchemaError",
    "TlsError",
    "TransportError",
    "UndecodableEntryError",
    "UnreachableError",
    "email",
    "observer",
    "publish",
    "registry",
    "scalars",
    "set_registry",
    "slack",
    "subscription",
    "type",
    "webhook",
]
