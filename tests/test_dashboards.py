"""The shipped Grafana dashboard and Prometheus alert rules: every expression parses as
PromQL and every metric it names is served by a live engine's `/metrics` from the start,
with 0 for every declared observer and action before anything happened."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

import fraiseql

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\bfraiseql_[a-z0-9_]+")
REASONS = [
    "timeout", "connection", "http_3xx", "http_429", "http_4xx",
    "http_5xx", "smtp_rejected", "invalid_message", "exception", "other",
]  # fmt: skip


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "fraiseql-observers.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "fraiseql-alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


@pytest.fixture
def live_metrics(
    registry: fraiseql.Registry, fraiseql_database_url: str, fraiseql_nats_url: str
) -> Iterator[str]:
    """`/metrics` of an engine that has done nothing yet — the NATS backend with the bridge
    (so the forwarder's series exist too) — with a Python observer and a webhook observer."""
    import psycopg

    suffix = uuid.uuid4().hex[:8]
    table = f"tb_dash{suffix}"
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key, total numeric)")
    fraiseql.type(table=table, name="Order")(
        type("Order", (), {"__annotations__": {"id": str, "total": float}})
    )
    fraiseql.subscription(entity_type="Order", operation="create", name="audit")(lambda o: None)
    fraiseql.observer(
        name="notify", entity="Order", event="UPDATE", actions=[fraiseql.webhook(url="http://127.0.0.1:9/")]
    )
    config = {
        "database": {"url": fraiseql_database_url},
        "observers": {
            "backend": "nats",
            "run_bridge": True,
            "bridge": {"transport_name": f"dash_{suffix}"},
            "nats": {
                "url": fraiseql_nats_url,
                "stream_name": f"dash_{suffix}",
                "subject_prefix": f"dash{suffix}.mutation",
                "consumer_name": f"dash_{suffix}",
            },
        },
    }
    try:
        with fraiseql.Engine(config, http_port=0) as engine:
            url = f"http://127.0.0.1:{engine.http_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                yield resp.read().decode()
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}")
        asyncio.run(delete_stream(fraiseql_nats_url, f"dash_{suffix}"))


async def delete_stream(url: str, name: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


def served(text: str) -> set[str]:
    """The names of the samples in a Prometheus text exposition."""
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.MULTILINE)}


def test_every_expression_parses_and_names_only_metrics_that_are_served(live_metrics: str) -> None:
    names = served(live_metrics)
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    assert len(expressions) >= 20
    for expr in expressions:
        promql_parser.parse(expr.replace("$__rate_interval", "5m"))
        used = METRIC.findall(expr)
        assert used, f"no fraiseql metric in {expr!r}"
        missing = [m for m in used if m not in names]
        assert not missing, f"{expr!r} names {missing}, which /metrics does not serve"


def test_the_alert_rules_cover_what_an_operator_needs(live_metrics: str) -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) >= {
        "FraiseqlDeadLettersGrowing",
        "FraiseqlDeadLetterOverflow",
        "FraiseqlChangeLogLag",
        "FraiseqlSourceStalled",
        "FraiseqlSlotRetainingWal",
    }
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_series_exists_from_the_start(live_metrics: str) -> None:
    text = live_metrics
    assert re.search(r'^fraiseql_build_info\{version="\d+\.\d+\.\d+[^"]*"\} 1$', text, re.MULTILINE), text
    for observer, action in [("audit", "python"), ("notify", "webhook")]:
        for family in ("actions_failed_total", "actions_retried_total"):
            for reason in REASONS:
                labels = f'observer="{observer}",action="{action}",reason="{reason}"'
                line = f"fraiseql_observer_{family}{{{labels}}} 0"
                assert line in text, f"missing {line}"
        assert (
            f'fraiseql_observer_actions_succeeded_total{{observer="{observer}",action="{action}"}} 0' in text
        )
    assert 'fraiseql_observer_events_matched_total{observer="audit"} 0' in text
    # Nine buckets and +Inf, from 1 ms to 30 s.
    buckets = re.findall(
        r'fraiseql_observer_action_duration_seconds_bucket\{le="([^"]+)",observer="audit",action="python"\}',
        text,
    )
    assert buckets == ["0.001", "0.005", "0.025", "0.1", "0.25", "1.0", "2.5", "10.0", "30.0", "+Inf"], (
        buckets
    )
