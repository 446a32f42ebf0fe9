"""Trace context from the writer's transaction to the webhook, and the engine's spans
received over OTLP/HTTP by a real server, with either capture."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

import fraiseql
from fraiseql.testing.sinks import WebhookSink

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
WRITER_SPAN = "00f067aa0ba902b7"


class OtlpReceiver:
    """An OTLP/HTTP endpoint that keeps every span it receives."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest,
                )

                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        receiver.spans.extend(scope.spans)
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_a_writers_trace_continues_through_capture_conditions_actions_and_the_webhook(
    registry: fraiseql.Registry, capture: tuple[str, str], otlp: OtlpReceiver, webhook_sink: WebhookSink
) -> None:
    mode, url = capture
    suffix = uuid.uuid4().hex[:8]
    table = f"tb_trace{suffix}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key, total numeric)")
    fraiseql.type(table=table, name="Order")(
        type("Order", (), {"__annotations__": {"id": str, "total": float}})
    )
    fraiseql.observer(
        name="big", entity="Order", event="INSERT", condition="total > 100",
        actions=[fraiseql.webhook(url=webhook_sink.url + "/big")],
    )  # fmt: skip
    fraiseql.observer(
        name="small", entity="Order", event="INSERT", condition="total < 0",
        actions=[fraiseql.webhook(url=webhook_sink.url + "/small")],
    )  # fmt: skip
    config = {
        "database": {"url": url},
        "observers": {
            "backend": "postgres",
            "postgres": {"capture": mode, "listener_id": f"trace_{suffix}", "poll_interval_ms": 100},
            "telemetry": {"otlp_endpoint": otlp.url, "service_name": "orders-observers"},
        },
    }
    try:
        with fraiseql.Engine(config, http_port=0) as engine:
            with psycopg.connect(url) as conn:
                conn.execute("SELECT fraiseql_traceparent(%s)", (f"00-{TRACE_ID}-{WRITER_SPAN}-01",))
                conn.execute(f"INSERT INTO {table} VALUES ('o1', 500)")
            with psycopg.connect(url) as conn:
                conn.execute("SELECT fraiseql_traceparent('not-a-trace-context')")
                conn.execute(f"INSERT INTO {table} VALUES ('o2', 700)")
            got = webhook_sink.wait_for(2, timeout=30)
            with urllib.request.urlopen(f"http://127.0.0.1:{engine.http_port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
        # Stopping exported the spans of the work done.
        wait_until(lambda: any(s.trace_id.hex() == TRACE_ID for s in otlp.spans))
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")

    ours = [s for s in otlp.spans if s.trace_id.hex() == TRACE_ID]
    by_name = {s.name: s for s in ours}
    capture_span = by_name["capture Order.insert"]
    assert capture_span.parent_span_id.hex() == WRITER_SPAN, "the writer's span is the parent"
    big, small = by_name["condition big"], by_name["condition small"]
    assert big.parent_span_id == small.parent_span_id == capture_span.span_id
    attributes = {a.key: a.value for a in big.attributes}
    assert attributes["fraiseql.matched"].bool_value is True
    assert {a.key: a.value for a in small.attributes}["fraiseql.matched"].bool_value is False
    action = by_name["action webhook"]
    assert action.parent_span_id == big.span_id
    assert {a.key: a.value for a in action.attributes}["fraiseql.outcome"].string_value == "success"
    # The webhook carries the action attempt's span as its parent.
    first = next(r for r in got if b'"o1"' in r.body)
    assert first.header("traceparent") == f"00-{TRACE_ID}-{action.span_id.hex()}-01"
    # A trace context that is not one: delivered without it, counted.
    second = next(r for r in got if b'"o2"' in r.body)
    assert second.header("traceparent") is not None  # a trace of its own, started by the engine
    assert not second.header("traceparent").startswith(f"00-{TRACE_ID}")
    assert "fraiseql_observer_traceparent_invalid_total 1" in metrics


def test_the_trace_context_travels_in_nats_headers_through_the_bridge(
    registry: fraiseql.Registry, fraiseql_database_url: str, fraiseql_nats_url: str
) -> None:
    import asyncio

    import nats

    suffix = uuid.uuid4().hex[:8]
    table = f"tb_tracenats{suffix}"
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key)")
    fraiseql.type(table=table, name="Order")(type("Order", (), {"__annotations__": {"id": str}}))
    fraiseql.subscription(entity_type="Order", operation="create", name="seen")(lambda o: None)
    config = {
        "database": {"url": fraiseql_database_url},
        "observers": {
            "backend": "nats",
            "run_bridge": True,
            "bridge": {"transport_name": f"tn_{suffix}"},
            "nats": {
                "url": fraiseql_nats_url,
                "stream_name": f"tn_{suffix}",
                "subject_prefix": f"tn{suffix}.mutation",
                "consumer_name": f"tn_{suffix}",
            },
        },
    }

    async def first_message() -> Any:
        nc = await nats.connect(fraiseql_nats_url)
        try:
            sub = await nc.jetstream().subscribe(
                f"tn{suffix}.mutation.order.insert", durable=f"probe_{suffix}"
            )
            return await sub.next_msg(timeout=30)
        finally:
            await nc.close()

    try:
        with fraiseql.Engine(config):
            with psycopg.connect(fraiseql_database_url) as conn:
                conn.execute(f"SET LOCAL fraiseql.traceparent = '00-{TRACE_ID}-{WRITER_SPAN}-01'")
                conn.execute(f"INSERT INTO {table} VALUES ('o1')")
            msg = asyncio.run(first_message())
        assert msg.headers["traceparent"] == f"00-{TRACE_ID}-{WRITER_SPAN}-01"
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")

        async def drop() -> None:
            nc = await nats.connect(fraiseql_nats_url)
            try:
                await nc.jetstream().delete_stream(f"tn_{suffix}")
            finally:
                await nc.close()

        asyncio.run(drop())
