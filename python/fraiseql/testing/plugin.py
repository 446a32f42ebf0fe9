"""pytest plugin giving fraiseql tests real services and sinks.

Session fixtures resolve PostgreSQL, NATS (JetStream) and Redis through
:mod:`fraiseql.testing.services`; function fixtures give a fresh HTTP and
SMTP sink per test.  Everything heavy is imported inside the fixtures so that
loading the plugin (which pytest does for every run) costs next to nothing.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fraiseql.testing.sinks import SmtpSink, WebhookSink

_SERVICES_MODULE = "fraiseql.testing.services"

# Filled at session finish, before shutdown forgets them, for the summary line.
_USED_SOURCES: dict[str, str] = {}


@pytest.fixture(scope="session")
def fraiseql_database_url() -> str:
    """URL of a fresh PostgreSQL database for this test session."""
    from fraiseql.testing import services

    return services.database_url()


@pytest.fixture(scope="session")
def fraiseql_logical_database_url() -> str:
    """URL of a fresh database on a PostgreSQL with ``wal_level = logical``."""
    from fraiseql.testing import services

    return services.logical_database_url()


@pytest.fixture(scope="session")
def fraiseql_nats_url() -> str:
    """URL of a NATS server with JetStream enabled."""
    from fraiseql.testing import services

    return services.nats_url()


@pytest.fixture(scope="session")
def fraiseql_redis_url() -> str:
    """URL of a Redis server."""
    from fraiseql.testing import services

    return services.redis_url()


@pytest.fixture
def webhook_sink() -> Iterator[WebhookSink]:
    """A fresh recording HTTP server on 127.0.0.1 (replies 200 unless scripted)."""
    from fraiseql.testing.sinks import WebhookSink

    with WebhookSink() as sink:
        yield sink


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh recording SMTP server on 127.0.0.1 without AUTH."""
    from fraiseql.testing.sinks import SmtpSink

    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def smtp_sink_factory() -> Iterator[Callable[..., SmtpSink]]:
    """Make SMTP sinks with options (e.g. username/password); all closed after the test."""
    from fraiseql.testing.sinks import SmtpSink

    made: list[SmtpSink] = []

    def make(
        username: str | None = None, password: str | None = None, tls_context: ssl.SSLContext | None = None
    ) -> SmtpSink:
        sink = SmtpSink(username=username, password=password, tls_context=tls_context).start()
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop the session database and stop started servers after session teardown."""
    services = sys.modules.get(_SERVICES_MODULE)
    if services is not None:
        _USED_SOURCES.update(services.sources())
        services.shutdown()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which services were used and where they came from, to ease debugging."""
    if _USED_SOURCES:
        line = ", ".join(f"{name}={source}" for name, source in sorted(_USED_SOURCES.items()))
        terminalreporter.write_line(f"fraiseql services: {line}")
