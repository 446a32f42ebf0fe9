"""The engine on the in-memory transport: matching, order, retries, DLQ, effectively-once."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

import fraiseql
from fraiseql.scalars import ID, DateTime

FAST = fraiseql.Retry(max_attempts=3, backoff_strategy="fixed", initial_delay_ms=1, max_delay_ms=5)


def declare_order() -> type:
    @fraiseql.type
    class Order:
        id: ID
        status: str
        total: float
        created_at: DateTime

    return Order


def order(**kw: Any) -> dict[str, Any]:
    return {"id": "o1", "status": "new", "total": 10.0, "created_at": "2026-02-25T10:00:00+00:00", **kw}


def test_handler_receives_an_entity_instance_and_the_event(registry: fraiseql.Registry) -> None:
    Order = declare_order()
    seen: list[tuple[Any, fraiseql.Event]] = []

    @fraiseql.subscription(entity_type=Order, topic="order.created", operation="create")
    def on_created(o: Any, event: fraiseql.Event) -> None:
        seen.append((o, event))

    with fraiseql.Engine() as engine:
        event_id = engine.emit(Order, "INSERT", new=order(total=12.5))
        engine.drain()
    [(o, event)] = seen
    assert isinstance(o, Order)
    assert (o.id, o.total, o.created_at.year) == ("o1", 12.5, 2026)
    assert (event.id, event.entity, event.event, event.table) == (event_id, "Order", "INSERT", "tb_order")
    assert event.old is None


def test_observers_match_entity_event_and_condition(registry: fraiseql.Registry) -> None:
    declare_order()
    calls: list[str] = []

    @fraiseql.subscription(entity_type="Order", operation="create", condition="total > 1000")
    def big(o: Any) -> None:
        calls.append(f"big:{o.id}")

    @fraiseql.subscription(
        entity_type="Order", operation="update", condition="status.changed() && status == 'shipped'"
    )
    def shipped(o: Any) -> None:
        calls.append(f"shipped:{o.id}")

    @fraiseql.subscription(entity_type="Order", operation="delete")
    def deleted(o: Any) -> None:
        calls.append(f"deleted:{o.id}")  # DELETE: the instance is built from the old row

    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=order(id="small"))
        engine.emit("Order", "INSERT", new=order(id="large", total=5000))
        engine.emit("Order", "UPDATE", new=order(id="s1", status="shipped"), old=order(id="s1"))
        engine.emit(
            "Order", "UPDATE", new=order(id="s2", status="shipped"), old=order(id="s2", status="shipped")
        )
        engine.emit("Order", "DELETE", old=order(id="gone"))
        engine.drain()
    assert sorted(calls) == ["big:large", "deleted:gone", "shipped:s1"]


def test_observers_of_one_event_run_in_definition_order(registry: fraiseql.Registry) -> None:
    declare_order()
    calls: list[str] = []
    for name in ["third", "first", "second"]:  # definition order, not alphabetical
        fraiseql.subscription(entity_type="Order", operation="create", name=name)(
            lambda o, name=name: calls.append(name)
        )
    with fraiseql.Engine() as engine:
        assert engine.observers == ["third", "first", "second"]
        for _ in range(20):
            calls.clear()
            engine.emit("Order", "INSERT", new=order())
            engine.drain()
            assert calls == ["third", "first", "second"]


def test_a_handler_failing_twice_is_called_three_times_under_max_attempts_3(
    registry: fraiseql.Registry,
) -> None:
    declare_order()
    attempts: list[int] = []

    @fraiseql.subscription(entity_type="Order", operation="create", retry=FAST)
    def flaky(o: Any) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError(f"sink down (attempt {len(attempts)})")

    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=order())
        engine.drain()
        assert len(attempts) == 3
        assert engine.dlq() == []
        assert (
            'fraiseql_observer_actions_retried_total{observer="flaky",action="python",reason="exception"} 2'
            in engine.metrics()
        )


def test_exhausted_handler_is_dead_lettered_with_its_traceback(registry: fraiseql.Registry) -> None:
    declare_order()
    calls = 0

    @fraiseql.subscription(entity_type="Order", operation="create", retry=FAST)
    def broken(o: Any) -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"cannot charge {o.id}")

    with fraiseql.Engine() as engine:
        event_id = engine.emit("Order", "INSERT", new=order(id="o7"))
        engine.drain()
        [entry] = engine.dlq()
    assert calls == 3
    assert entry["observer"] == "broken"
    assert entry["attempts"] == 3
    assert entry["event"]["id"] == event_id
    assert entry["event"]["new"]["id"] == "o7"
    assert entry["error"].startswith("Traceback (most recent call last):")
    assert "ValueError: cannot charge o7" in entry["error"]
    assert "in broken" in entry["error"]


def test_dead_letter_retry_reruns_the_action_and_removes_the_entry(registry: fraiseql.Registry) -> None:
    declare_order()
    healthy = False
    delivered: list[str] = []

    @fraiseql.subscription(entity_type="Order", operation="create", retry=FAST)
    def sink(o: Any) -> None:
        if not healthy:
            raise ConnectionError("down")
        delivered.append(o.id)

    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=order(id="r1"))
        engine.drain()
        [entry] = engine.dlq()
        assert engine.retry_dead_letter(entry["id"]) is False  # still down: stays, attempts grow
        [again] = engine.dlq()
        assert again["attempts"] == 6
        healthy = True
        assert engine.retry_dead_letter(again["id"]) is True
        assert engine.dlq() == []
        with pytest.raises(fraiseql.DeadLetterError, match="no dead-letter entry with id 999"):
            engine.retry_dead_letter(999)
    assert delivered == ["r1"]


def test_max_dlq_size_caps_the_queue_and_counts_overflow(registry: fraiseql.Registry) -> None:
    declare_order()

    @fraiseql.subscription(entity_type="Order", operation="create", retry=fraiseql.Retry(max_attempts=1))
    def always_fails(o: Any) -> None:
        raise RuntimeError("no")

    engine = fraiseql.Engine({"observers": {"backend": "in_memory", "max_dlq_size": 3}})
    with engine:
        ids = [engine.emit("Order", "INSERT", new=order(id=f"o{i}")) for i in range(5)]
        engine.drain()
        kept = engine.dlq()
        metrics = engine.metrics()
    assert len(kept) == 3
    assert {e["event"]["id"] for e in kept} <= set(ids)
    assert "fraiseql_observer_dlq_overflow_total 2" in metrics
    assert "fraiseql_observer_dlq_size 3" in metrics


def test_effectively_once_runs_a_redelivered_event_once(registry: fraiseql.Registry) -> None:
    declare_order()
    charged: list[str] = []
    notified: list[str] = []

    @fraiseql.subscription(
        entity_type="Order",
        topic="order.created",
        operation="create",
        checkpoint=fraiseql.EffectivelyOnce(idempotency_table="billing_observer_keys"),
    )
    def charge_customer(o: Any) -> None:
        charged.append(o.id)

    @fraiseql.subscription(entity_type="Order", operation="create")  # AtLeastOnce
    def notify(o: Any) -> None:
        notified.append(o.id)

    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=order(id="o1"), id="evt-1")
        engine.emit("Order", "INSERT", new=order(id="o1"), id="evt-1")
        engine.emit("Order", "INSERT", new=order(id="o2"), id="evt-2")
        engine.drain()
        metrics = engine.metrics()
    assert sorted(charged) == ["o1", "o2"]
    assert sorted(notified) == ["o1", "o1", "o2"]
    assert 'fraiseql_observer_duplicates_skipped_total{observer="charge_customer"} 1' in metrics


def test_effectively_once_holds_under_concurrent_duplicates(registry: fraiseql.Registry) -> None:
    declare_order()
    lock = threading.Lock()
    runs: dict[str, int] = {}

    @fraiseql.subscription(entity_type="Order", operation="create", checkpoint=fraiseql.EffectivelyOnce())
    def once(o: Any, event: fraiseql.Event) -> None:
        with lock:
            runs[event.id] = runs.get(event.id, 0) + 1

    with fraiseql.Engine() as engine:
        for i in range(200):
            engine.emit("Order", "INSERT", new=order(), id=f"evt-{i % 50}")
        engine.drain()
    assert runs == {f"evt-{i}": 1 for i in range(50)}


def test_async_handlers_run_on_the_engine_loop_from_sync_code(registry: fraiseql.Registry) -> None:
    declare_order()
    seen: list[str] = []

    @fraiseql.subscription(entity_type="Order", operation="create")
    async def on_created(o: Any) -> None:
        await asyncio.sleep(0.001)
        seen.append(o.id)

    with fraiseql.Engine() as engine:
        for i in range(10):
            engine.emit("Order", "INSERT", new=order(id=f"o{i}"))
        engine.drain()
    assert sorted(seen) == sorted(f"o{i}" for i in range(10))


def test_engine_from_asyncio_runs_async_handlers_on_the_callers_loop(registry: fraiseql.Registry) -> None:
    declare_order()
    loops: list[asyncio.AbstractEventLoop] = []
    attempts = 0

    @fraiseql.subscription(entity_type="Order", operation="create", retry=FAST)
    async def on_created(o: Any) -> None:
        nonlocal attempts
        attempts += 1
        loops.append(asyncio.get_running_loop())
        if attempts < 2:
            raise TimeoutError("slow sink")

    async def main() -> asyncio.AbstractEventLoop:
        async with fraiseql.Engine() as engine:
            await engine.emit_async("Order", "INSERT", new=order())
            await engine.drain_async(timeout=10)
            with pytest.raises(fraiseql.EngineError, match="drain_async"):
                engine.drain()  # would deadlock the loop that runs the handler
            assert engine.dlq() == []
        return asyncio.get_running_loop()

    caller_loop = asyncio.run(main())
    assert attempts == 2
    assert all(lp is caller_loop for lp in loops)


def test_bad_emits_are_rejected_without_harming_the_engine(registry: fraiseql.Registry) -> None:
    declare_order()
    seen: list[str] = []
    fraiseql.subscription(entity_type="Order", operation="create")(lambda o: seen.append(o.id))
    with fraiseql.Engine() as engine:
        with pytest.raises(ValueError, match="unknown event `UPSERT`"):
            engine.emit("Order", "UPSERT", new=order())
        with pytest.raises(ValueError, match="an INSERT needs `new`"):
            engine.emit("Order", "INSERT")
        with pytest.raises(TypeError, match="`new` must be a dict"):
            engine.emit("Order", "INSERT", new=[1, 2])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="cannot send a value of type object"):
            engine.emit("Order", "INSERT", new={"id": object()})
        engine.emit("Order", "INSERT", new=order(id="fine"))
        engine.drain()
    assert seen == ["fine"]
    with pytest.raises(fraiseql.EngineError, match="not running"):
        engine.emit("Order", "INSERT", new=order())


def test_declaration_errors_are_clear(registry: fraiseql.Registry) -> None:
    declare_order()
    fraiseql.subscription(entity_type="Ordr", operation="create")(lambda o: None)
    with pytest.raises(fraiseql.SchemaError, match=r"`Ordr`.*did you mean `Order`"):
        fraiseql.Engine()
    registry.observers.clear()
    fraiseql.subscription(entity_type="Order", operation="create", condition="totl > 1")(lambda o: None)
    with pytest.raises(fraiseql.ConditionError, match=r"did you mean `total`") as info:
        fraiseql.Engine()
    assert "test_engine.py" in str(info.value)
    with pytest.raises(ValueError, match="operation must be INSERT"):
        fraiseql.subscription(entity_type="Order", operation="upsert")
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        fraiseql.Retry(max_attempts=0)


def test_hostile_idempotency_table_is_a_config_error(registry: fraiseql.Registry) -> None:
    declare_order()
    fraiseql.subscription(
        entity_type="Order",
        operation="create",
        checkpoint=fraiseql.EffectivelyOnce(idempotency_table="x; DROP TABLE y"),
    )(lambda o: None)
    with pytest.raises(fraiseql.ConfigError, match="idempotency_table"):
        fraiseql.Engine()


def test_builtin_actions_validate_their_arguments(registry: fraiseql.Registry) -> None:
    with pytest.raises(ValueError, match="exactly one of url or url_env"):
        fraiseql.webhook()
    with pytest.raises(ValueError, match="must start with # or @"):
        fraiseql.slack(webhook_url_env="SLACK", channel="sales", message="hi")
    with pytest.raises(ValueError, match="is not an email address"):
        fraiseql.email(from_="nobody", to="a@b.c", subject="s", body_template="b", smtp_host="h")
    assert fraiseql.webhook(url_env="HOOK", headers={"Authorization": "${TOKEN}"}) == {
        "type": "webhook",
        "url_env": "HOOK",
        "headers": {"Authorization": "${TOKEN}"},
    }


def test_health_and_metrics_are_served_over_http(registry: fraiseql.Registry) -> None:
    declare_order()
    fraiseql.subscription(entity_type="Order", operation="create")(lambda o: None)
    with fraiseql.Engine(http_port=0) as engine:
        engine.emit("Order", "INSERT", new=order())
        engine.drain()
        base = f"http://127.0.0.1:{engine.http_port}"
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            assert resp.status == 200
            assert json.load(resp) == {
                "status": "ok",
                "observers": {
                    "transport": "in_memory",
                    "connected": True,
                    "oldest_in_flight": None,
                    "blocked": False,
                },
            }
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    assert "fraiseql_observer_events_received_total 1" in text
    assert 'fraiseql_observer_events_matched_total{observer="<lambda>"} 1' in text
    assert "fraiseql_observer_action_duration_seconds_bucket" in text


def test_blocking_sync_handlers_run_concurrently(registry: fraiseql.Registry) -> None:
    declare_order()
    lock = threading.Lock()
    running = 0
    peak = 0

    @fraiseql.subscription(entity_type="Order", operation="create")
    def slow(o: Any) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.2)  # blocking I/O releases the GIL
        with lock:
            running -= 1

    with fraiseql.Engine() as engine:
        for i in range(8):
            engine.emit("Order", "INSERT", new=order(id=f"o{i}"))
        engine.drain()
    assert peak >= 4, f"blocking handlers ran {peak} at a time"


def test_a_sync_handler_past_its_timeout_is_retried_and_its_thread_replaced(
    registry: fraiseql.Registry,
) -> None:
    """The first call sleeps far past `timeout_ms`: the attempt fails with reason `timeout`,
    the retry succeeds, the sleeping thread is abandoned (counted) and replaced, and the
    other events never wait for it."""
    declare_order()
    calls: list[str] = []
    finished = threading.Event()

    @fraiseql.subscription(
        entity_type="Order",
        operation="create",
        timeout_ms=200,
        retry=fraiseql.Retry(max_attempts=2, backoff_strategy="fixed", initial_delay_ms=10),
    )
    def slow_once(o: Any) -> None:
        calls.append(o.id)
        if o.id == "stuck" and calls.count("stuck") == 1:
            time.sleep(3)
            finished.set()

    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=order(id="stuck"))
        for i in range(20):
            engine.emit("Order", "INSERT", new=order(id=f"o{i}"))
        engine.drain()
        assert not finished.is_set(), "the engine did not wait for the stuck call"
        assert engine.dlq() == []
        metrics = engine.metrics()
    assert calls.count("stuck") == 2 and all(f"o{i}" in calls for i in range(20))
    assert (
        'fraiseql_observer_actions_retried_total{observer="slow_once",action="python",reason="timeout"} 1'
        in metrics
    )
    assert "fraiseql_observer_handler_threads_abandoned_total" in metrics
    abandoned = re.search(r"^fraiseql_observer_handler_threads_abandoned_total (\d+)", metrics, re.MULTILINE)
    assert abandoned is not None and int(abandoned.group(1)) >= 1


def test_an_async_handler_past_its_timeout_is_cancelled_and_dead_lettered(
    registry: fraiseql.Registry,
) -> None:
    declare_order()
    cancelled: list[str] = []

    @fraiseql.subscription(
        entity_type="Order", operation="create", timeout_ms=100, retry=fraiseql.Retry(max_attempts=1)
    )
    async def never_done(o: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(o.id)
            raise

    with fraiseql.Engine() as engine:
        engine.emit("Order", "INSERT", new=order(id="a1"))
        engine.drain()
        [dead] = engine.dlq()
        metrics = engine.metrics()
    assert cancelled == ["a1"], "the coroutine was cancelled at its timeout"
    assert "did not finish within its timeout of 100 ms" in dead["error"]
    assert (
        'fraiseql_observer_actions_failed_total{observer="never_done",action="python",reason="timeout"} 1'
        in metrics
    )


def test_health_names_the_observer_event_and_key_that_block(registry: fraiseql.Registry) -> None:
    declare_order()
    release = threading.Event()

    @fraiseql.subscription(entity_type="Order", operation="create", timeout_ms=20_000)
    def waits(o: Any) -> None:
        release.wait(15)

    config = {"observers": {"backend": "in_memory", "blocked_after_secs": 1}}
    with fraiseql.Engine(config, http_port=0) as engine:
        engine.emit("Order", "INSERT", new=order(id="k-42"))

        def health() -> tuple[int, dict[str, Any]]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{engine.http_port}/health", timeout=5) as r:
                    return r.status, json.load(r)
            except urllib.error.HTTPError as e:
                return e.code, json.load(e)

        deadline = time.monotonic() + 10
        while health()[0] != 503:
            assert time.monotonic() < deadline, health()
            time.sleep(0.1)
        body = health()[1]["observers"]
        assert body["blocked"] is True
        oldest = body["oldest_in_flight"]
        assert (oldest["observer"], oldest["key"], oldest["entity"]) == ("waits", "k-42", "Order")
        assert oldest["for_secs"] >= 1
        release.set()
        engine.drain()
        assert health()[0] == 200


def test_changes_of_one_key_run_one_at_a_time_in_order_and_keys_in_parallel(
    registry: fraiseql.Registry,
) -> None:
    declare_order()
    lock = threading.Lock()
    seen: dict[str, list[int]] = {}
    running: set[str] = set()
    peak = 0
    overlaps: list[str] = []

    @fraiseql.subscription(entity_type="Order", operation="update")
    def record(o: Any) -> None:
        nonlocal peak
        with lock:
            if o.id in running:
                overlaps.append(o.id)
            running.add(o.id)
            peak = max(peak, len(running))
        time.sleep(0.002 if o.total % 3 else 0.006)
        with lock:
            running.discard(o.id)
            seen.setdefault(o.id, []).append(int(o.total))

    with fraiseql.Engine() as engine:
        for n in range(20):
            for key in range(10):
                engine.emit(
                    "Order", "UPDATE", new=order(id=f"k{key}", total=float(n)), old=order(id=f"k{key}")
                )
        engine.drain()
    assert overlaps == [], "two changes of one key ran at once"
    assert all(seen[f"k{key}"] == list(range(20)) for key in range(10)), seen
    assert peak > 1, "different keys ran in parallel"


def test_a_retrying_change_holds_back_only_its_own_key(registry: fraiseql.Registry) -> None:
    declare_order()
    lock = threading.Lock()
    done: list[str] = []
    failures = {"a-1": 2}

    @fraiseql.subscription(
        entity_type="Order",
        operation="update",
        retry=fraiseql.Retry(max_attempts=3, backoff_strategy="fixed", initial_delay_ms=200),
    )
    def flaky(o: Any) -> None:
        tag = f"{o.id}-{int(o.total)}"
        with lock:
            if failures.get(tag, 0) > 0:
                failures[tag] -= 1
                raise RuntimeError(f"{tag} fails for now")
            done.append(tag)

    with fraiseql.Engine() as engine:
        engine.emit("Order", "UPDATE", new=order(id="a", total=1.0), old=order(id="a"))
        engine.emit("Order", "UPDATE", new=order(id="a", total=2.0), old=order(id="a"))
        for n in range(5):
            engine.emit("Order", "UPDATE", new=order(id="b", total=float(n)), old=order(id="b"))
        engine.drain()
        assert engine.dlq() == []
    assert done.index("a-1") < done.index("a-2"), "a's second change waited for its first"
    assert all(done.index(f"b-{n}") < done.index("a-1") for n in range(5)), "b did not wait for a"
    assert [d for d in done if d.startswith("b")] == [f"b-{n}" for n in range(5)]
