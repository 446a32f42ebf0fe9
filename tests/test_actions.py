"""Built-in actions through the whole stack (Python declarations → native engine → real
HTTP and SMTP servers started by the test harness)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fraiseql
from fraiseql.testing.sinks import SinkResponse, SmtpSink, WebhookSink

FAST = fraiseql.Retry(max_attempts=3, backoff_strategy="fixed", initial_delay_ms=20, max_delay_ms=50)


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    """Sets environment variables for one test and restores the environment after."""
    saved = dict(os.environ)
    values: dict[str, str] = {}
    try:
        yield values
    finally:
        os.environ.clear()
        os.environ.update(saved)


def setenv(env: dict[str, str], **values: str) -> None:
    env.update(values)
    os.environ.update(values)


def declare_schema() -> None:
    @fraiseql.type
    class Order:
        id: str
        customer_email: str
        status: str
        total: float

    @fraiseql.type
    class Payment:
        id: str
        order_id: str
        amount: float
        status: str


ORDER = {"id": "ord_123", "customer_email": "ada@example.com", "status": "confirmed", "total": 1250.0}


def test_spec_ecommerce_observers_deliver_the_documented_payloads(
    registry: fraiseql.Registry, webhook_sink: WebhookSink, env: dict[str, str]
) -> None:
    declare_schema()
    setenv(
        env,
        ORDER_WEBHOOK_URL=webhook_sink.url + "/orders",
        SLACK_WEBHOOK_URL=webhook_sink.url + "/slack",
        PAYMENT_WEBHOOK_URL=webhook_sink.url + "/payments",
        API_TOKEN="Bearer s3cr3t-token",
    )
    fraiseql.observer(
        name="on_high_value_order",
        entity="Order",
        event="INSERT",
        condition="total > 1000",
        actions=[fraiseql.webhook(url_env="ORDER_WEBHOOK_URL", headers={"Authorization": "${API_TOKEN}"})],
    )
    fraiseql.observer(
        name="on_order_shipped",
        entity="Order",
        event="UPDATE",
        condition="status.changed() && status == 'shipped'",
        actions=[
            fraiseql.slack(
                webhook_url_env="SLACK_WEBHOOK_URL",
                channel="#shipping",
                message="Order {id} shipped to {customer_email}",
            )
        ],
    )
    fraiseql.observer(
        name="on_payment_failed",
        entity="Payment",
        event="UPDATE",
        condition="status == 'failed'",
        actions=[
            fraiseql.webhook(
                url_env="PAYMENT_WEBHOOK_URL",
                body_template='{"payment": "{{id}}", "order": "{{order_id}}", "was": "{{old.status}}"}',
            )
        ],
    )
    with fraiseql.Engine() as engine:
        insert_id = engine.emit("Order", "INSERT", new=ORDER)
        engine.emit("Order", "INSERT", new={**ORDER, "id": "ord_small", "total": 5.0})
        engine.emit("Order", "UPDATE", new={**ORDER, "status": "shipped"}, old=ORDER)
        engine.emit(
            "Payment",
            "UPDATE",
            new={"id": "pay_1", "order_id": "ord_123", "amount": 5.0, "status": "failed"},
            old={"id": "pay_1", "order_id": "ord_123", "amount": 5.0, "status": "pending"},
        )
        engine.drain()
        assert engine.dlq() == []
    by_path = {r.path: r for r in webhook_sink.wait_for(3)}
    assert set(by_path) == {"/orders", "/slack", "/payments"}

    order = by_path["/orders"]
    body = json.loads(order.body)
    assert body == {
        "event": "INSERT",
        "table": "tb_order",
        "timestamp": body["timestamp"],
        "data": {"new": ORDER, "old": None},
        "id": insert_id,
    }
    assert order.header("Authorization") == "Bearer s3cr3t-token"
    assert order.header("Idempotency-Key") == insert_id
    assert order.header("Content-Type") == "application/json"

    slack = json.loads(by_path["/slack"].body)
    assert slack == {"text": "Order ord_123 shipped to ada@example.com", "channel": "#shipping"}
    assert json.loads(by_path["/payments"].body) == {"payment": "pay_1", "order": "ord_123", "was": "pending"}


def test_webhook_retried_on_500_with_the_same_idempotency_key(
    registry: fraiseql.Registry, webhook_sink: WebhookSink
) -> None:
    declare_schema()
    webhook_sink.script(500, 500, 200)
    fraiseql.observer(
        name="hook",
        entity="Order",
        event="INSERT",
        retry=FAST,
        actions=[fraiseql.webhook(url=webhook_sink.url)],
    )
    with fraiseql.Engine() as engine:
        event_id = engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        assert engine.dlq() == []
        metrics = engine.metrics()
    assert (
        'fraiseql_observer_actions_retried_total{observer="hook",action="webhook",reason="http_5xx"} 2'
        in metrics
    )
    assert 'fraiseql_observer_actions_succeeded_total{observer="hook",action="webhook"} 1' in metrics
    calls = webhook_sink.requests
    assert [c.status for c in calls] == [500, 500, 200]
    assert {c.header("Idempotency-Key") for c in calls} == {event_id}
    gaps = [b.time - a.time for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.009 for g in gaps), gaps  # fixed 20 ms backoff; jitter keeps at least half


def test_webhook_400_is_not_retried_and_is_dead_lettered_with_status(
    registry: fraiseql.Registry, webhook_sink: WebhookSink
) -> None:
    declare_schema()
    webhook_sink.script(SinkResponse(400, body=b'{"error": "bad order"}'))
    fraiseql.observer(
        name="hook",
        entity="Order",
        event="INSERT",
        retry=FAST,
        actions=[fraiseql.webhook(url=webhook_sink.url)],
    )
    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        [entry] = engine.dlq()
        metrics = engine.metrics()
    assert (
        'fraiseql_observer_actions_failed_total{observer="hook",action="webhook",reason="http_4xx"} 1'
        in metrics
    )
    assert len(webhook_sink.requests) == 1
    assert entry["attempts"] == 1
    assert "400" in entry["error"] and "bad order" in entry["error"]


def test_sink_down_past_the_retry_budget_then_dlq_retry_delivers(
    registry: fraiseql.Registry, webhook_sink: WebhookSink
) -> None:
    declare_schema()
    webhook_sink.script(503, 503, 503)
    fraiseql.observer(
        name="hook",
        entity="Order",
        event="INSERT",
        retry=FAST,
        actions=[fraiseql.webhook(url=webhook_sink.url)],
    )
    with fraiseql.Engine() as engine:
        event_id = engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        [entry] = engine.dlq()
        assert entry["attempts"] == 3 and "503" in entry["error"]
        assert engine.retry_dead_letter(entry["id"]) is True  # the sink answers 200 again
        assert engine.dlq() == []
    assert [r.status for r in webhook_sink.requests] == [503, 503, 503, 200]
    assert webhook_sink.requests[-1].header("Idempotency-Key") == event_id


def test_signature_verifies_with_the_documented_recipe(
    registry: fraiseql.Registry, webhook_sink: WebhookSink, env: dict[str, str]
) -> None:
    declare_schema()
    setenv(env, HOOK_SECRET="whsec-very-secret")
    fraiseql.observer(
        name="hook",
        entity="Order",
        event="INSERT",
        actions=[fraiseql.webhook(url=webhook_sink.url, secret_env="HOOK_SECRET")],
    )
    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
    [req] = webhook_sink.wait_for(1)
    header = req.header("X-Fraiseql-Signature")
    assert header is not None
    parts = dict(p.split("=", 1) for p in header.split(","))
    expected = hmac.new(
        b"whsec-very-secret", parts["t"].encode() + b"." + req.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)


def test_email_arrives_with_substituted_subject_and_body(
    registry: fraiseql.Registry, smtp_sink_factory: Callable[..., SmtpSink], env: dict[str, str]
) -> None:
    declare_schema()
    plain = smtp_sink_factory()
    authed = smtp_sink_factory(username="mailer", password="smtp-pa55word")
    setenv(env, SMTP_USER="mailer", SMTP_PASSWORD="smtp-pa55word")
    for name, sink, auth in [
        ("plain", plain, {}),
        ("authed", authed, {"smtp_user_env": "SMTP_USER", "smtp_password_env": "SMTP_PASSWORD"}),
    ]:
        fraiseql.observer(
            name=f"mail_{name}",
            entity="Order",
            event="INSERT",
            actions=[
                fraiseql.email(
                    from_="shop@example.com",
                    to=["ops@example.com"],
                    subject="Order {id} received",
                    body_template="Total: {total} from {customer_email}",
                    smtp_host=sink.host,
                    smtp_port=sink.port,
                    tls="none",
                    **auth,
                )
            ],
        )
    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        assert engine.dlq() == []
    for sink, login in [(plain, None), (authed, "mailer")]:
        [mail] = sink.wait_for(1)
        assert mail.message["Subject"] == "Order ord_123 received"
        assert mail.message["From"] == "shop@example.com"
        assert mail.rcpt_tos == ["ops@example.com"]
        assert "Total: 1250" in mail.message.get_content()
        assert "ada@example.com" in mail.message.get_content()
        assert mail.login == login


def test_email_over_starttls_verifies_the_server_certificate(
    registry: fraiseql.Registry,
    smtp_sink_factory: Callable[..., SmtpSink],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    """tls = "required" (the default) against a relay that insists on STARTTLS: with the
    relay's CA trusted (SSL_CERT_FILE, as for webhooks) the mail arrives over TLS after
    AUTH; with an untrusted certificate nothing is sent and the failure is dead-lettered."""
    import trustme

    declare_schema()
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    sink = smtp_sink_factory(username="mailer", password="tls-pa55word", tls_context=server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    setenv(env, SMTP_USER="mailer", SMTP_PASSWORD="tls-pa55word")
    fraiseql.observer(
        name="mail_tls",
        entity="Order",
        event="INSERT",
        retry=fraiseql.Retry(max_attempts=1),
        actions=[
            fraiseql.email(
                from_="shop@example.com",
                to="ops@example.com",
                subject="Order {id} received",
                body_template="Total: {total}",
                smtp_host=sink.host,
                smtp_port=sink.port,
                smtp_user_env="SMTP_USER",
                smtp_password_env="SMTP_PASSWORD",
            )
        ],
    )
    with fraiseql.Engine() as engine:  # the system roots do not know the test CA
        engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        [entry] = engine.dlq()
        metrics = engine.metrics()
    assert "certificate" in entry["error"].lower(), entry["error"]
    assert "tls-pa55word" not in entry["error"]
    assert (
        'fraiseql_observer_actions_failed_total{observer="mail_tls",action="email",reason="connection"} 1'
        in metrics
    )
    assert sink.messages == []

    setenv(env, SSL_CERT_FILE=str(ca_file))
    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        assert engine.dlq() == []
    [mail] = sink.wait_for(1)
    assert mail.message["Subject"] == "Order ord_123 received"
    assert mail.login == "mailer"


def test_missing_env_and_unknown_template_fields_fail_at_start(
    registry: fraiseql.Registry, env: dict[str, str]
) -> None:
    declare_schema()
    os.environ.pop("NOT_SET_HOOK", None)
    fraiseql.observer(
        name="hook", entity="Order", event="INSERT", actions=[fraiseql.webhook(url_env="NOT_SET_HOOK")]
    )
    with pytest.raises(fraiseql.ActionError, match="NOT_SET_HOOK"):
        fraiseql.Engine()
    registry.observers.clear()
    fraiseql.observer(
        name="slack",
        entity="Order",
        event="INSERT",
        actions=[fraiseql.slack(webhook_url="http://127.0.0.1:9/x", message="{totl}")],
    )
    with pytest.raises(fraiseql.FraiseQLError, match="did you mean"):
        fraiseql.Engine()


def test_no_secret_appears_in_any_output(tmp_path: Path, webhook_sink: WebhookSink) -> None:
    """A whole `fraiseql run` with failing actions: the secrets never reach stdout, stderr,
    the DLQ or the metrics."""
    secrets = {
        "API_TOKEN": "tok-9f8e7d6c5b4a",
        "HOOK_SECRET": "sig-1a2b3c4d5e6f",
        "SMTP_PASSWORD": "pw-0f1e2d3c4b5a",
        "SMTP_USER": "user-zz",
    }
    hook_url = webhook_sink.url.replace("http://", "http://admin:pw-url-77aa66bb@") + "/hook?key=q-secret-88"
    webhook_sink.script(500, 500, 500, 500, 500, 500)
    (tmp_path / "fraiseql.toml").write_text(
        '[observers]\nbackend = "in_memory"\n\n'
        '[[observers.handlers]]\nname = "h"\nentity = "Order"\nevent = "INSERT"\n'
        'retry = { max_attempts = 2, backoff_strategy = "fixed", initial_delay_ms = 1, max_delay_ms = 1 }\n'
        "actions = [\n"
        '  { type = "webhook", url_env = "HOOK_URL", secret_env = "HOOK_SECRET",'
        ' headers = { Authorization = "${API_TOKEN}" } },\n'
        '  { type = "email", from = "a@example.com", to = "b@example.com", subject = "s",'
        ' body_template = "b", smtp_host = "127.0.0.1", smtp_port = 9, tls = "none",'
        ' smtp_user_env = "SMTP_USER", smtp_password_env = "SMTP_PASSWORD" },\n'
        "]\n"
    )
    (tmp_path / "events.jsonl").write_text(
        json.dumps({"entity": "Order", "event": "INSERT", "new": ORDER}) + "\n"
    )
    script = (
        "import fraiseql, sys\n"
        "from fraiseql.cli import load_schema\n"
        "e = fraiseql.Engine('fraiseql.toml', schema=load_schema(None))\n"
        "e.start(); e.emit('Order', 'INSERT', new={'id': 'o1'}); e.drain()\n"
        "print(e.dlq()); print(e.metrics()); e.stop()\n"
    )
    run_env = {**os.environ, **secrets, "HOOK_URL": hook_url, "RUST_LOG": "debug"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "moved event" in text  # the failures were logged and dead-lettered
    for value in [*secrets.values(), "pw-url-77aa66bb", "q-secret-88"]:
        assert value not in text, f"secret {value!r} leaked"
    assert webhook_sink.requests, "the webhook was called"


def test_standard_webhooks_signatures_verify_with_the_standardwebhooks_package(
    registry: fraiseql.Registry, webhook_sink: WebhookSink, env: dict[str, str]
) -> None:
    """Every delivery, retries included, verifies with `standardwebhooks` unchanged, under
    either secret of a rotation; `webhook-id` is the event id on every attempt; a 410 Gone
    is not retried."""
    import base64

    from standardwebhooks import Webhook

    old, new = (
        f"whsec_{base64.b64encode(k).decode()}" for k in (b"old-key-0123456789", b"new-key-9876543210")
    )
    setenv(env, HOOK_URL=webhook_sink.url, HOOK_SECRET=f"{old} {new}")
    declare_schema()
    fraiseql.observer(
        name="signed",
        entity="Order",
        event="INSERT",
        actions=[fraiseql.webhook(url_env="HOOK_URL", signing_secret_env="HOOK_SECRET")],
        retry=fraiseql.Retry(max_attempts=3, backoff_strategy="fixed", initial_delay_ms=10),
    )
    webhook_sink.script(500, 200, 410)
    with fraiseql.Engine() as engine:
        first = engine.emit("Order", "INSERT", new=ORDER)
        engine.drain()
        second = engine.emit("Order", "INSERT", new={**ORDER, "id": "ord_gone"})
        engine.drain()
        dead = engine.dlq()
    got = webhook_sink.wait_for(3)
    assert [r.status for r in got] == [500, 200, 410], "a 410 is not retried"
    assert [r.header("webhook-id") for r in got] == [first, first, second]
    for request in got:
        headers = dict(request.headers)
        assert request.header("webhook-signature").count("v1,") == 2, "one per secret"
        for secret in (old, new):
            assert Webhook(secret).verify(request.body, headers)["id"] == request.header("webhook-id")
    assert [d["event"]["id"] for d in dead] == [second]
    assert "410" in dead[0]["error"]


def test_a_standard_webhooks_secret_that_is_not_one_is_refused_at_start(
    registry: fraiseql.Registry, env: dict[str, str]
) -> None:
    declare_schema()
    for bad, why in [
        ("s3cr3t", "does not start with whsec_"),
        ("whsec_not*base64", "is not valid base64 after whsec_"),
        ("whsec_", "holds no key"),
        ("   ", "the variable is empty"),
    ]:
        setenv(env, HOOK_URL="http://127.0.0.1:9/", HOOK_SECRET=bad)
        fraiseql.observer(
            name=f"bad_{abs(hash(bad))}",
            entity="Order",
            event="INSERT",
            actions=[fraiseql.webhook(url_env="HOOK_URL", signing_secret_env="HOOK_SECRET")],
        )
        with pytest.raises(fraiseql.FraiseQLError) as err:
            fraiseql.Engine().start()
        message = str(err.value)
        assert "signing_secret_env" in message and why in message, message
        secret = bad.strip().removeprefix("whsec_")
        assert not secret or secret not in message, "the secret is never shown"
        registry.observers.clear()


def test_cloudevents_webhooks_parse_with_the_cloudevents_sdk(
    registry: fraiseql.Registry, webhook_sink: WebhookSink, env: dict[str, str]
) -> None:
    from cloudevents.v1.http import from_http

    setenv(env, HOOK_URL=webhook_sink.url)
    declare_schema()
    fraiseql.observer(
        name="as_cloudevents",
        entity="Order",
        event="UPDATE",
        actions=[
            fraiseql.webhook(url_env="HOOK_URL", format="cloudevents", source="https://shop.example/orders")
        ],
    )
    with fraiseql.Engine() as engine:
        event_id = engine.emit("Order", "UPDATE", new={**ORDER, "status": "shipped"}, old=ORDER)
        engine.drain()
    [request] = webhook_sink.wait_for(1)
    assert request.header("content-type") == "application/cloudevents+json"
    event = from_http(dict(request.headers), request.body)
    assert event["specversion"] == "1.0"
    assert event["id"] == event_id
    assert event["source"] == "https://shop.example/orders"
    assert event["type"] == "fraiseql.order.update"
    assert event["subject"] == ORDER["id"]
    assert event["time"]
    assert event.data["new"]["status"] == "shipped" and event.data["old"]["status"] == ORDER["status"]
    assert event.data["table"] == "tb_order"


def test_cloudevents_options_are_checked(registry: fraiseql.Registry, tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text(
        '[observers]\nbackend = "in_memory"\n\n[observers.cloudevents]\nsource = "not a uri"\n\n'
        '[[observers.handlers]]\nname = "h"\nentity = "Order"\nevent = "INSERT"\n'
        'actions = [{ type = "webhook", url = "http://x.test/", format = "cloudevent", '
        'body_template = "{}" }]\n'
    )
    cli = [sys.executable, "-m", "fraiseql.cli", "check", "--config", str(tmp_path / "fraiseql.toml")]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "observers.cloudevents.source: expected a URI reference" in out.stderr, out.stderr
    assert "' ' is not allowed in a URI" in out.stderr, out.stderr
    expected = (
        'format: expected one of "json", "cloudevents", found "cloudevent" (did you mean "cloudevents"?)'
    )
    assert expected in out.stderr, out.stderr
