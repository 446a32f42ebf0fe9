"""Test harness for fraiseql: real services (PostgreSQL, NATS, Redis) and sinks.

``services`` needs only the standard library to import; the sink classes are
loaded on first use so that ``import fraiseql.testing`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fraiseql.testing.services import database_url, nats_url, redis_url, shutdown

if TYPE_CHECKING:
    from fraiseql.testing.sinks import SinkResponse, SmtpSink, WebhookSink

__all__ = ["SinkResponse", "SmtpSink", "WebhookSink", "database_url", "nats_url", "redis_url", "shutdown"]

_SINKS = ("SinkResponse", "SmtpSink", "WebhookSink")


def __getattr__(name: str) -> Any:
    """Import the sinks module only when one of its classes is asked for."""
    if name in _SINKS:
        from fraiseql.testing import sinks

        return getattr(sinks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
