"""backend = "nats": the engine consumes the durable JetStream consumer, against the
harness's live NATS server; messages are published as the spec documents them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import nats
import pytest

import fraiseql


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def nats_config(url: str, suffix: str) -> dict[str, Any]:
    return {
        "observers": {
            "backend": "nats",
            "nats": {
                "url": url,
                "stream_name": f"fq_{suffix}",
                "subject_prefix": f"fq{suffix}.mutation",
                "consumer_name": f"worker_{suffix}",
            },
        }
    }


async def publish(url: str, subject: str, body: dict[str, Any], msg_id: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, json.dumps(body).encode(), headers={"Nats-Msg-Id": msg_id})
    finally:
        await nc.close()


async def delete_stream(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


def test_engine_consumes_spec_messages_once_each(registry: fraiseql.Registry, fraiseql_nats_url: str) -> None:
    @fraiseql.type
    class Order:
        id: str
        total: float

    suffix = uuid.uuid4().hex[:8]
    prefix = f"fq{suffix}.mutation"
    lock = threading.Lock()
    seen: list[tuple[str, float]] = []

    @fraiseql.subscription(entity_type=Order, operation="create", condition="total > 100")
    def big(order: Any, event: fraiseql.Event) -> None:
        with lock:
            seen.append((event.id, order.total))

    try:
        with fraiseql.Engine(nats_config(fraiseql_nats_url, suffix), http_port=0) as engine:
            for i, total in enumerate([150.0, 5.0, 300.0]):
                body = {
                    "event": "INSERT",
                    "entity": "Order",
                    "subject": f"{prefix}.order.insert",
                    "timestamp": "2024-01-15T10:30:00Z",
                    "data": {"id": f"ord_{i}", "total": total},
                    "id": f"evt-{i}",
                }
                asyncio.run(publish(fraiseql_nats_url, f"{prefix}.order.insert", body, f"evt-{i}"))
            # The same event id again: the stream's duplicate window drops it.
            asyncio.run(
                publish(
                    fraiseql_nats_url,
                    f"{prefix}.order.insert",
                    {
                        "event": "INSERT",
                        "entity": "Order",
                        "timestamp": "2024-01-15T10:30:00Z",
                        "data": {"id": "ord_0", "total": 150.0},
                        "id": "evt-0",
                    },
                    "evt-0",
                )
            )
            wait_until(lambda: len(seen) >= 2)
            time.sleep(0.5)
            metrics = engine.metrics()
            with urllib.request.urlopen(f"http://127.0.0.1:{engine.http_port}/health", timeout=5) as resp:
                health = json.load(resp)
        assert sorted(seen) == [("evt-0", 150.0), ("evt-2", 300.0)]
        assert health["observers"] == {"transport": "nats", "connected": True, "stream": f"fq_{suffix}"}
        assert "fraiseql_nats_messages_received_total 3" in metrics
    finally:
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_nats_backend_without_url_names_the_setting(registry: fraiseql.Registry) -> None:
    with pytest.raises(fraiseql.ConfigError, match=r"NATS transport requires nats\.url to be set"):
        fraiseql.Engine({"observers": {"backend": "nats"}})
