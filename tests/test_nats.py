"""backend = "nats": the engine consumes the durable JetStream consumer, against the
harness's live NATS server; messages are published as the spec documents them."""

from __future__ import annotations

import asyncio
import json
import sys
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
        assert health["observers"] == {
            "transport": "nats",
            "connected": True,
            "stream": f"fq_{suffix}",
            "oldest_in_flight": None,
            "blocked": False,
        }
        assert "fraiseql_nats_messages_received_total 3" in metrics
    finally:
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_events_being_processed_show_in_the_in_flight_gauge(
    registry: fraiseql.Registry, fraiseql_nats_url: str
) -> None:
    @fraiseql.type
    class Order:
        id: str

    release = threading.Event()
    fraiseql.subscription(entity_type=Order, operation="create")(lambda o: release.wait(20))
    suffix = uuid.uuid4().hex[:8]
    prefix = f"fq{suffix}.mutation"

    def in_flight(metrics: str) -> int:
        line = next(x for x in metrics.splitlines() if x.startswith("fraiseql_observer_events_in_flight "))
        return int(float(line.split()[1]))

    try:
        with fraiseql.Engine(nats_config(fraiseql_nats_url, suffix)) as engine:
            for i in range(3):
                body = {"event": "INSERT", "entity": "Order", "data": {"id": str(i)}, "id": f"e{i}"}
                asyncio.run(publish(fraiseql_nats_url, f"{prefix}.order.insert", body, f"e{i}"))
            wait_until(lambda: in_flight(engine.metrics()) == 3)
            assert "fraiseql_nats_jetstream_pending 3" in engine.metrics()
            release.set()
            wait_until(lambda: in_flight(engine.metrics()) == 0)
    finally:
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


async def publish_raw(url: str, subject: str, payload: bytes, msg_id: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
    finally:
        await nc.close()


def test_input_with_nul_bytes_is_dead_lettered_whole_and_one_entry_can_be_purged(
    registry: fraiseql.Registry, fraiseql_nats_url: str, fraiseql_database_url: str, tmp_path: Any
) -> None:
    """PostgreSQL text and jsonb cannot hold NUL: a valid event carrying "\\u0000" whose
    action fails, and a message of raw bytes with NULs, both reach the durable dead-letter
    queue intact and are acked; `fraiseql dlq purge ID` then removes just one of them."""
    import base64
    import subprocess

    import psycopg

    @fraiseql.type
    class Order:
        id: str
        note: str

    @fraiseql.subscription(entity_type=Order, operation="create", retry=fraiseql.Retry(max_attempts=1))
    def refuses(order: Any) -> None:
        raise ValueError("refused")

    suffix = uuid.uuid4().hex[:8]
    prefix = f"fq{suffix}.mutation"
    config = nats_config(fraiseql_nats_url, suffix)
    config["database"] = {"url": fraiseql_database_url}
    raw = b"\x00\xff\x00not an event"
    ids = {f"nul-{suffix}", f"raw-{suffix}"}
    try:
        with fraiseql.Engine(config) as engine:
            body = {"event": "INSERT", "entity": "Order", "data": {"id": "n1", "note": "a\u0000b"}}
            asyncio.run(publish(fraiseql_nats_url, f"{prefix}.order.insert", body, f"nul-{suffix}"))
            asyncio.run(publish_raw(fraiseql_nats_url, f"{prefix}.order.insert", raw, f"raw-{suffix}"))

            def mine() -> dict[str, dict[str, Any]]:
                return {e["event"]["id"]: e for e in engine.dlq() if e["event"]["id"] in ids}

            wait_until(lambda: len(mine()) == 2)
            entries = mine()
            nul = entries[f"nul-{suffix}"]
            assert nul["event"]["new"] == {"id": "n1", "note": "a\x00b"}
            assert nul["origin"] == "observer" and "refused" in nul["error"]
            bad = entries[f"raw-{suffix}"]
            assert bad["origin"] == "undecodable" and bad["action"] == "decode"
            assert bad["observer"] == f"nats:fq_{suffix}"
            assert bad["raw"] == {"encoding": "base64", "data": base64.b64encode(raw).decode()}
            info = asyncio.run(consumer_info(fraiseql_nats_url, f"fq_{suffix}", f"worker_{suffix}"))
            assert info.num_ack_pending == 0 and info.num_pending == 0
        (tmp_path / "fraiseql.toml").write_text(
            f'[database]\nurl = "{fraiseql_database_url}"\n\n[observers]\nbackend = "postgres"\n'
        )
        cli = [sys.executable, "-m", "fraiseql.cli", "dlq"]
        out = subprocess.run(
            [*cli, "purge", str(bad["id"])], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "purged 1 of 1 entries" in out.stdout
        out = subprocess.run([*cli, "list"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert f"nul-{suffix}" in out.stdout and f"raw-{suffix}" not in out.stdout
        out = subprocess.run(
            [*cli, "purge", str(bad["id"])], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1 and "no dead-letter entry" in out.stderr
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM fraiseql_dead_letters WHERE event_id LIKE %s", (f"%-{suffix}",))
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_an_event_id_the_idempotency_table_cannot_hold_is_dead_lettered_with_the_reason(
    registry: fraiseql.Registry, fraiseql_nats_url: str, fraiseql_database_url: str
) -> None:
    """A hand-made message whose "id" carries a NUL: PostgreSQL cannot store it as an
    EffectivelyOnce key (SQLSTATE 22021), so the event is dead-lettered with PostgreSQL's
    reason, never run unguarded, and the next event of the stream runs."""
    import psycopg

    @fraiseql.type
    class Order:
        id: str

    ran: list[str] = []

    @fraiseql.subscription(
        entity_type=Order,
        operation="create",
        checkpoint=fraiseql.EffectivelyOnce(idempotency_table="nul_id_keys"),
        retry=fraiseql.Retry(max_attempts=4, initial_delay_ms=100),
    )
    def charge(order: Any) -> None:
        ran.append(order.id)

    suffix = uuid.uuid4().hex[:8]
    subject = f"fq{suffix}.mutation.order.insert"
    config = nats_config(fraiseql_nats_url, suffix)
    config["database"] = {"url": fraiseql_database_url}
    hostile, fine = f"nul\u0000-{suffix}", f"fine-{suffix}"
    try:
        with fraiseql.Engine(config) as engine:
            for event_id, row in ((hostile, "h1"), (fine, "f1")):
                body = {"event": "INSERT", "entity": "Order", "id": event_id, "data": {"id": row}}
                asyncio.run(publish(fraiseql_nats_url, subject, body, event_id.replace("\u0000", "0")))
            wait_until(lambda: ran == ["f1"])

            def mine() -> list[dict[str, Any]]:
                return [e for e in engine.dlq() if e["event"]["id"] == hostile]

            wait_until(lambda: len(mine()) == 1)
            entry = mine()[0]
            assert "idempotency store" in entry["error"] and "0x00" in entry["error"], entry["error"]
            assert entry["observer"] == "charge"
            assert ran == ["f1"], "the hostile event ran without its key"
            info = asyncio.run(consumer_info(fraiseql_nats_url, f"fq_{suffix}", f"worker_{suffix}"))
            assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM fraiseql_dead_letters WHERE event_id LIKE %s", (f"%-{suffix}",))
            conn.execute("DROP TABLE IF EXISTS nul_id_keys")
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_nats_backend_without_url_names_the_setting(registry: fraiseql.Registry) -> None:
    with pytest.raises(fraiseql.ConfigError, match=r"NATS transport requires nats\.url to be set"):
        fraiseql.Engine({"observers": {"backend": "nats"}})


async def downstream_service(url: str, subject: str, want: int, timeout: float) -> list[dict[str, Any]]:
    """The spec's downstream consumer: a durable JetStream subscription with a callback."""
    received: list[dict[str, Any]] = []
    done = asyncio.Event()
    nc = await nats.connect(url)
    js = nc.jetstream()

    async def order_handler(msg: Any) -> None:
        received.append(json.loads(msg.data.decode()))
        await msg.ack()
        if len(received) >= want:
            done.set()

    await js.subscribe(subject, durable="order-processor", cb=order_handler)
    try:
        await asyncio.wait_for(done.wait(), timeout)
        await asyncio.sleep(0.3)  # anything extra would arrive now
    finally:
        await nc.close()
    return received


def test_bridge_publishes_sql_changes_and_the_engine_consumes_them(
    registry: fraiseql.Registry, fraiseql_nats_url: str, fraiseql_database_url: str
) -> None:
    import psycopg

    suffix = uuid.uuid4().hex[:8]
    entity, table = f"Order{suffix}", f"tb_order{suffix}"
    prefix = f"fq{suffix}.mutation"
    fraiseql.type(table=table, name=entity)(
        type(entity, (), {"__annotations__": {"id": str, "total": float}})
    )
    lock = threading.Lock()
    fired: list[str] = []

    @fraiseql.subscription(
        entity_type=entity,
        operation="create",
        condition="total > 100",
        checkpoint=fraiseql.EffectivelyOnce(idempotency_table="bridge_test_keys"),
    )
    def big(order: Any) -> None:
        with lock:
            fired.append(order.id)

    config = nats_config(fraiseql_nats_url, suffix)
    config["database"] = {"url": fraiseql_database_url}
    config["observers"]["run_bridge"] = True
    config["observers"]["bridge"] = {"transport_name": f"bridge_{suffix}", "notify_channel": f"chan_{suffix}"}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key, total numeric)")
    try:
        with fraiseql.Engine(config), psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {table} VALUES ('o1', 150), ('o2', 5), ('o3', 999)")
            messages = asyncio.run(
                downstream_service(fraiseql_nats_url, f"{prefix}.{entity.lower()}.insert", 3, 20)
            )
            wait_until(lambda: len(fired) >= 2)
            time.sleep(0.3)
        assert sorted(fired) == ["o1", "o3"]
        assert len(messages) == 3
        by_id = {m["data"]["id"]: m for m in messages}
        assert set(by_id) == {"o1", "o2", "o3"}
        m = by_id["o1"]
        assert m["event"] == "INSERT" and m["entity"] == entity
        assert m["subject"] == f"{prefix}.{entity.lower()}.insert"
        assert m["data"] == {"id": "o1", "total": 150}
        assert m["old"] is None and m["id"] and m["timestamp"]
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_a_bridge_without_observers_leaves_the_shared_consumer_to_the_instances_with_some(
    registry: fraiseql.Registry, fraiseql_nats_url: str, fraiseql_database_url: str
) -> None:
    """A bridge run alone (`run_bridge = true`, no observer in its schema) beside a worker on the
    same durable consumer: every change reaches the worker's observer. Pulling, the bridge would
    have acknowledged about half of them with nothing run."""
    import psycopg

    suffix = uuid.uuid4().hex[:8]
    entity, table = f"Order{suffix}", f"tb_order{suffix}"
    declare = fraiseql.type(table=table, name=entity)
    declare(type(entity, (), {"__annotations__": {"id": str}}))
    bridge_schema = fraiseql.Registry()
    fraiseql.set_registry(bridge_schema)
    declare(type(entity, (), {"__annotations__": {"id": str}}))
    fraiseql.set_registry(registry)
    lock = threading.Lock()
    seen: list[str] = []

    @fraiseql.subscription(entity_type=entity, operation="create")
    def worker(order: Any) -> None:
        with lock:
            seen.append(order.id)

    worker_config = nats_config(fraiseql_nats_url, suffix)
    worker_config["database"] = {"url": fraiseql_database_url}
    bridge_config = nats_config(fraiseql_nats_url, suffix)
    bridge_config["database"] = {"url": fraiseql_database_url}
    bridge_config["observers"]["run_bridge"] = True
    bridge_config["observers"]["bridge"] = {"transport_name": f"bridge_{suffix}"}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key)")
    try:
        with fraiseql.Engine(bridge_config, schema=bridge_schema), fraiseql.Engine(worker_config):
            with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
                for i in range(40):
                    conn.execute(f"INSERT INTO {table} VALUES (%s)", (f"o{i}",))
            wait_until(lambda: len(seen) >= 40, timeout=20)
        assert sorted(seen) == sorted(f"o{i}" for i in range(40))
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_a_change_larger_than_max_payload_is_dead_lettered_and_the_stream_goes_on(
    registry: fraiseql.Registry, fraiseql_nats_url: str, fraiseql_database_url: str
) -> None:
    """A 2 MB row against the server's 1 MB max_payload: it is dead-lettered with both sizes
    at once, the rows after it reach JetStream, the connection stays up, and a retry of it
    fails again at once instead of timing out."""
    import psycopg

    suffix = uuid.uuid4().hex[:8]
    entity, table = f"Order{suffix}", f"tb_order{suffix}"
    prefix = f"fq{suffix}.mutation"
    fraiseql.type(table=table, name=entity)(type(entity, (), {"__annotations__": {"id": str, "note": str}}))
    config = nats_config(fraiseql_nats_url, suffix)
    config["database"] = {"url": fraiseql_database_url}
    config["observers"]["run_bridge"] = True
    config["observers"]["bridge"] = {"transport_name": f"bridge_{suffix}", "notify_channel": f"chan_{suffix}"}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key, note text)")
    try:
        with (
            fraiseql.Engine(config, http_port=0) as engine,
            psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
        ):
            conn.execute(f"INSERT INTO {table} VALUES ('big', repeat('x', 2000000))")
            conn.execute(f"INSERT INTO {table} VALUES ('small', 'ok')")
            [message] = asyncio.run(
                downstream_service(fraiseql_nats_url, f"{prefix}.{entity.lower()}.insert", 1, 20)
            )
            assert message["data"] == {"id": "small", "note": "ok"}
            wait_until(lambda: len(engine.dlq()) == 1)
            [entry] = engine.dlq()
            assert entry["observer"] == f"bridge_{suffix}:{entity}:insert"
            assert "max_payload of 1048576 bytes" in entry["error"], entry["error"]
            assert "more than the NATS server's" in entry["error"]
            with urllib.request.urlopen(f"http://127.0.0.1:{engine.http_port}/health") as r:
                assert json.loads(r.read())["observers"]["connected"] is True
            assert engine.retry_dead_letter(entry["id"]) is False
            [again] = engine.dlq()
            assert "max_payload" in again["error"]
            # The forwarder's publishes are its own metrics, not the observers' actions.
            metrics = engine.metrics()
            prefix_failed = "fraiseql_forwarder_actions_failed_total{"
            failed = [x for x in metrics.splitlines() if x.startswith(prefix_failed)]
            assert any(f'observer="bridge_{suffix}:{entity}:insert"' in x for x in failed), metrics
            assert f"bridge_{suffix}" not in "".join(
                x for x in metrics.splitlines() if x.startswith("fraiseql_observer_")
            )
        publisher = fraiseql.Publisher(config)
        with pytest.raises(fraiseql.PayloadTooLargeError, match="max_payload") as refused:
            publisher.publish(entity, "INSERT", new={"id": "big2", "note": "x" * 2_000_000})
        assert refused.value.kind == "too_large"
        assert isinstance(refused.value, fraiseql.PublishError)
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"DELETE FROM fraiseql_dead_letters WHERE observer LIKE 'bridge_{suffix}:%'")
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_restarting_the_nats_server_mid_stream_loses_nothing(
    registry: fraiseql.Registry, fraiseql_database_url: str, tmp_path: Any
) -> None:
    """A private nats-server (file store) is SIGKILLed while the bridge publishes SQL changes
    and started again on the same port and store: every change reaches the handler."""
    import signal
    import subprocess

    import psycopg

    from fraiseql.testing.services import free_port, nats_has_jetstream, nats_server_binary

    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    argv = [nats_server_binary(), "-js", "-sd", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port)]

    def start_server() -> subprocess.Popen[bytes]:
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: nats_has_jetstream("127.0.0.1", port, timeout=0.5), timeout=20)
        return server

    suffix = uuid.uuid4().hex[:8]
    entity, table = f"Restart{suffix}", f"tb_restart{suffix}"
    fraiseql.type(table=table, name=entity)(type(entity, (), {"__annotations__": {"id": int}}))
    lock = threading.Lock()
    seen: set[int] = set()

    @fraiseql.subscription(entity_type=entity, operation="create")
    def record(row: Any) -> None:
        with lock:
            seen.add(row.id)

    config = nats_config(url, suffix)
    config["database"] = {"url": fraiseql_database_url}
    config["observers"]["run_bridge"] = True
    config["observers"]["bridge"] = {"transport_name": f"bridge_{suffix}", "notify_channel": f"chan_{suffix}"}
    server = start_server()
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int primary key)")
    try:
        with fraiseql.Engine(config), psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            for i in range(1, 201):
                conn.execute(f"INSERT INTO {table} VALUES ({i})")
            wait_until(lambda: len(seen) >= 50)
            server.send_signal(signal.SIGKILL)
            server.wait()
            for i in range(201, 301):  # written while NATS is down
                conn.execute(f"INSERT INTO {table} VALUES ({i})")
            time.sleep(1)
            server = start_server()
            for i in range(301, 401):
                conn.execute(f"INSERT INTO {table} VALUES ({i})")
            wait_until(lambda: len(seen) >= 400, timeout=90)
        assert seen == set(range(1, 401))
    finally:
        server.kill()
        server.wait()
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


async def stream_messages(url: str, name: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(name)
        return int(info.state.messages)
    finally:
        await nc.close()


def test_publish_from_python_is_the_bridge_format_and_deduplicated_by_id(
    registry: fraiseql.Registry, fraiseql_nats_url: str
) -> None:
    @fraiseql.type(table="tb_orders_x")
    class Order:
        id: str
        status: str

    suffix = uuid.uuid4().hex[:8]
    prefix = f"fq{suffix}.mutation"
    config = nats_config(fraiseql_nats_url, suffix)
    try:
        publisher = fraiseql.Publisher(config)
        first = publisher.publish(
            Order,
            "UPDATE",
            new={"id": "o1", "status": "shipped"},
            old={"id": "o1", "status": "new"},
            id="evt-7",
        )
        again = publisher.publish("Order", "UPDATE", new={"id": "o1", "status": "shipped"}, id="evt-7")
        assert first == again == "evt-7"
        minted = asyncio.run(publisher.publish_async(Order, "INSERT", new={"id": "o2", "status": "new"}))
        assert minted and minted != "evt-7"
        assert asyncio.run(stream_messages(fraiseql_nats_url, f"fq_{suffix}")) == 2, (
            "the repeat of evt-7 is dropped"
        )
        [update] = asyncio.run(downstream_service(fraiseql_nats_url, f"{prefix}.order.update", 1, 20))
        assert update["id"] == "evt-7" and update["event"] == "UPDATE" and update["entity"] == "Order"
        assert update["table"] == "tb_orders_x" and update["subject"] == f"{prefix}.order.update"
        assert update["data"] == {"id": "o1", "status": "shipped"} and update["old"] == {
            "id": "o1",
            "status": "new",
        }
        with pytest.raises(ValueError, match="needs `old`"):
            publisher.publish(Order, "DELETE", new={"id": "o1"})
        with pytest.raises(fraiseql.TransportError, match="NATS server"):
            fraiseql.Publisher({"observers": {"backend": "in_memory"}})
    finally:
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def test_the_spec_restricted_account_gets_a_clear_error_and_the_minimal_set_works(
    registry: fraiseql.Registry, tmp_path: Any
) -> None:
    """A server that enforces authorization: the spec's restricted user (publish and subscribe
    on fraiseql.mutation.> and _INBOX.> only) is refused at start with the missing permission
    named; a user with exactly the README's minimal set consumes and publishes."""
    import subprocess

    from fraiseql.testing.services import free_port, nats_server_binary

    @fraiseql.type
    class Order:
        id: str

    seen: list[str] = []
    fraiseql.subscription(entity_type=Order, operation="create")(lambda o: seen.append(o.id))
    suffix = uuid.uuid4().hex[:8]
    prefix = f"fq{suffix}.mutation"
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "accounts {\n  APP {\n    jetstream: enabled\n    users = [\n"
        '      { user: restricted, password: pw1, permissions: { publish: ["fraiseql.mutation.>"],'
        ' subscribe: ["fraiseql.mutation.>", "_INBOX.>"] } }\n'
        "      { user: minimal, password: pw2, permissions: {"
        f' publish: ["$JS.API.>", "$JS.ACK.>", "{prefix}.>"],'
        ' subscribe: ["_INBOX.>"] } }\n'
        "    ]\n  }\n}\n"
    )
    server = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: _port_open(port))
        restricted = nats_config(f"nats://restricted:pw1@127.0.0.1:{port}", suffix)
        started = time.monotonic()
        with pytest.raises(fraiseql.TransportError) as refused:
            fraiseql.Engine(restricted).start()
        message = str(refused.value)
        assert "Permissions Violation for Publish to" in message and "$JS.API" in message, message
        assert f'publish ["$JS.API.>", "$JS.ACK.>", "{prefix}.>"], subscribe ["_INBOX.>"]' in message
        assert "pw1" not in message
        assert time.monotonic() - started < 8, "named at once, not after a request timeout"

        minimal = nats_config(f"nats://minimal:pw2@127.0.0.1:{port}", suffix)
        with fraiseql.Engine(minimal):
            publisher = fraiseql.Publisher(minimal)
            publisher.publish(Order, "INSERT", new={"id": "o1"})
            wait_until(lambda: seen == ["o1"])
    finally:
        server.terminate()
        server.wait(10)


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_tls_with_a_private_ca_and_a_client_certificate(registry: fraiseql.Registry, tmp_path: Any) -> None:
    """A nats-server that requires TLS and verifies client certificates: with
    `tls_ca_file`, `tls_cert_file` and `tls_key_file` the engine connects, consumes and
    publishes."""
    import subprocess

    import trustme

    from fraiseql.testing.services import free_port, nats_server_binary

    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("fraiseql-client")
    paths = {
        name: tmp_path / f"{name}.pem" for name in ("ca", "server", "server_key", "client", "client_key")
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["server"]))
    server_cert.private_key_pem.write_to_path(str(paths["server_key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(paths["client"]))
    client_cert.private_key_pem.write_to_path(str(paths["client_key"]))
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f'tls {{ cert_file: "{paths["server"]}", key_file: "{paths["server_key"]}",'
        f' ca_file: "{paths["ca"]}", verify: true }}\n'
    )

    @fraiseql.type
    class Order:
        id: str

    seen: list[str] = []
    fraiseql.subscription(entity_type=Order, operation="create")(lambda o: seen.append(o.id))
    server = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: _port_open(port))
        config = nats_config(f"tls://127.0.0.1:{port}", uuid.uuid4().hex[:8])
        config["observers"]["nats"] |= {
            "tls_ca_file": str(paths["ca"]),
            "tls_cert_file": str(paths["client"]),
            "tls_key_file": str(paths["client_key"]),
        }
        with fraiseql.Engine(config):
            fraiseql.Publisher(config).publish(Order, "INSERT", new={"id": "o1"})
            wait_until(lambda: seen == ["o1"])
        missing = dict(config["observers"]["nats"], tls_key_file=None)
        del missing["tls_key_file"]
        with pytest.raises(fraiseql.ConfigError, match="tls_key_file is missing"):
            fraiseql.Engine({"observers": {"backend": "nats", "nats": missing}})
    finally:
        server.terminate()
        server.wait(10)


def test_three_instances_share_the_consumer_and_a_killed_one_loses_nothing(
    tmp_path: Any, fraiseql_nats_url: str, fraiseql_database_url: str
) -> None:
    """Three `fraiseql run` processes on one durable consumer; one is SIGKILLed mid-stream.
    An AtLeastOnce handler sees every event; an EffectivelyOnce handler (keys in PostgreSQL)
    never runs twice for one event, across the three."""
    import subprocess

    suffix = uuid.uuid4().hex[:8]
    at_least, effectively = tmp_path / "at_least.txt", tmp_path / "effectively.txt"
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{fraiseql_database_url}"\n\n'
        '[observers]\nbackend = "nats"\nhttp_port = 0\nmax_concurrency = 8\n\n'
        f'[observers.nats]\nurl = "{fraiseql_nats_url}"\nstream_name = "fq_{suffix}"\n'
        f'subject_prefix = "fq{suffix}.mutation"\nconsumer_name = "worker_{suffix}"\n\n'
        "[observers.nats.jetstream]\nack_wait_secs = 5\n"
    )
    (tmp_path / "schema.py").write_text(
        "import os, time\nimport fraiseql\n"
        "@fraiseql.type\nclass Order:\n    id: str\n"
        "def append(path, line):\n"
        "    with open(path, 'a') as f:\n"
        "        f.write(line + '\\n')\n"
        "@fraiseql.subscription(entity_type=Order, operation='create')\n"
        "def every(o):\n"
        "    time.sleep(0.002)\n"
        f"    append({str(at_least)!r}, o.id)\n"
        "@fraiseql.subscription(entity_type=Order, operation='create',"
        f" checkpoint=fraiseql.EffectivelyOnce(idempotency_table='nats_three_{suffix}'))\n"
        "def once(o):\n"
        f"    append({str(effectively)!r}, f'{{o.id}} {{os.getpid()}}')\n"
    )

    def lines(path: Any) -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    run = [sys.executable, "-m", "fraiseql.cli", "run"]
    procs = [subprocess.Popen(run, cwd=tmp_path, stderr=subprocess.DEVNULL) for _ in range(3)]
    try:
        time.sleep(2)  # all three attached to the consumer
        publisher = fraiseql.Publisher(nats_config(fraiseql_nats_url, suffix))
        for i in range(600):
            publisher.publish("Order", "INSERT", new={"id": f"o{i}"}, id=f"evt-{i}")
        wait_until(lambda: len(lines(at_least)) >= 150, timeout=60)
        procs[0].kill()
        want = {f"o{i}" for i in range(600)}
        wait_until(lambda: set(lines(at_least)) >= want, timeout=90)
        time.sleep(1)
    finally:
        for p in procs[1:]:
            p.terminate()
        for p in procs:
            p.wait(30)
    assert set(lines(at_least)) == want
    ran = [line.split()[0] for line in lines(effectively)]
    assert len(ran) == len(set(ran)), "an EffectivelyOnce handler ran twice for one event"
    pids = {line.split()[1] for line in lines(effectively)}
    assert len(pids) >= 2, "the work was shared"
    asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


def _engine_consumes_and_publishes(config: dict[str, Any]) -> None:
    """The engine on `config` consumes an event that a Publisher on `config` published."""

    @fraiseql.type
    class Order:
        id: str

    seen: list[str] = []
    fraiseql.subscription(entity_type=Order, operation="create")(lambda o: seen.append(o.id))
    with fraiseql.Engine(config):
        fraiseql.Publisher(config).publish(Order, "INSERT", new={"id": "o1"})
        wait_until(lambda: seen == ["o1"])


def test_nkey_file_authenticates_and_a_wrong_seed_is_refused_at_once(
    registry: fraiseql.Registry, tmp_path: Any
) -> None:
    """A nats-server that lists the user's public nkey: with `nkey_file` the engine connects,
    consumes and publishes; another user's seed is refused at start, at once, with the file
    named and the seed never shown."""
    from fraiseql.testing.nats_auth import KeyPair
    from fraiseql.testing.services import start_nats_server

    user, stranger = KeyPair.create("user"), KeyPair.create("user")
    (tmp_path / "user.nk").write_text(user.seed + "\n")
    (tmp_path / "stranger.nk").write_text(stranger.seed + "\n")
    server = start_nats_server(config=f'authorization {{ users = [ {{ nkey: "{user.public_key}" }} ] }}\n')
    try:
        config = nats_config(server.url, uuid.uuid4().hex[:8])
        config["observers"]["nats"]["nkey_file"] = str(tmp_path / "user.nk")
        _engine_consumes_and_publishes(config)

        config["observers"]["nats"]["nkey_file"] = str(tmp_path / "stranger.nk")
        started = time.monotonic()
        with pytest.raises(fraiseql.TransportError) as refused:
            fraiseql.Engine(config).start()
        message = str(refused.value)
        assert "authorization violation" in message, message
        assert f'nkey_file "{tmp_path / "stranger.nk"}", public key {stranger.public_key}' in message
        assert stranger.seed not in message
        assert time.monotonic() - started < 5, "refused at once, not retried"
    finally:
        server.stop()


def test_nkey_file_errors_name_the_file_and_the_key(registry: fraiseql.Registry, tmp_path: Any) -> None:
    """Checked when the config is read: a file without a valid user seed, both files, or a
    file together with credentials in the URL."""
    from fraiseql.testing.nats_auth import KeyPair, OperatorMode

    seed = KeyPair.create("user").seed
    broken = tmp_path / "broken.nk"
    broken.write_text(seed[:20] + ("A" if seed[20] != "A" else "B") + seed[21:] + "\n")
    creds = tmp_path / "user.creds"
    creds.write_text(OperatorMode.create().creds())

    def load(url: str = "nats://127.0.0.1:4222", **auth: str) -> str:
        config = {"observers": {"backend": "nats", "nats": {"url": url, **auth}}}
        with pytest.raises(fraiseql.ConfigError) as failed:
            fraiseql.Engine(config)
        return str(failed.value)

    message = load(nkey_file=str(broken))
    assert f'observers.nats.nkey_file: "{broken}" does not hold a valid nkey seed' in message
    assert seed[2:] not in message
    message = load(credentials_file=str(creds), nkey_file=str(tmp_path / "user.nk"))
    assert "observers.nats.nkey_file: cannot read" in message
    (tmp_path / "user.nk").write_text(seed)
    message = load(credentials_file=str(creds), nkey_file=str(tmp_path / "user.nk"))
    assert "set only one of credentials_file and nkey_file" in message
    message = load("nats://app:s3cret@127.0.0.1:4222", credentials_file=str(creds))
    assert "observers.nats.credentials_file: cannot be combined with a user, password or token" in message
    assert "s3cret" not in message


def test_credentials_file_in_operator_mode(registry: fraiseql.Registry, tmp_path: Any) -> None:
    """A nats-server in operator mode (JWTs, memory resolver): with the user's `.creds` file
    the engine connects, consumes and publishes; without it, or with a user signed by an
    account the server does not know, it is refused at start."""
    from fraiseql.testing.nats_auth import KeyPair, OperatorMode, creds_file_text, user_jwt
    from fraiseql.testing.services import start_nats_server

    trust = OperatorMode.create()
    (tmp_path / "user.creds").write_text(trust.creds())
    unknown = KeyPair.create("user")
    (tmp_path / "unknown.creds").write_text(
        creds_file_text(user_jwt(unknown, KeyPair.create("account")), unknown)
    )
    server = start_nats_server(config=trust.server_config())
    try:
        config = nats_config(server.url, uuid.uuid4().hex[:8])
        anonymous = dict(config["observers"]["nats"])
        config["observers"]["nats"]["credentials_file"] = str(tmp_path / "user.creds")
        _engine_consumes_and_publishes(config)

        for nats_settings in (
            anonymous,
            dict(anonymous, credentials_file=str(tmp_path / "unknown.creds")),
        ):
            started = time.monotonic()
            with pytest.raises(fraiseql.TransportError, match="authorization violation"):
                fraiseql.Engine({"observers": {"backend": "nats", "nats": nats_settings}}).start()
            assert time.monotonic() - started < 5, "refused at once, not retried"
    finally:
        server.stop()


async def consumer_info(url: str, stream: str, consumer: str) -> Any:
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, consumer)
    finally:
        await nc.close()


def test_an_action_longer_than_ack_wait_runs_once(
    registry: fraiseql.Registry, fraiseql_nats_url: str
) -> None:
    """With ack_wait_secs = 1, a handler that takes 3.5 s runs exactly once per event: the
    consumer sends progress acks every ack_wait/2, so JetStream never redelivers, and the
    consumer ends with everything acknowledged and nothing delivered twice."""

    @fraiseql.type
    class Order:
        id: str

    lock = threading.Lock()
    calls: dict[str, int] = {}

    @fraiseql.subscription(entity_type=Order, operation="create")
    def slow(order: Any) -> None:
        time.sleep(3.5)
        with lock:
            calls[order.id] = calls.get(order.id, 0) + 1

    suffix = uuid.uuid4().hex[:8]
    config = nats_config(fraiseql_nats_url, suffix)
    config["observers"]["nats"]["jetstream"] = {"ack_wait_secs": 1}
    ids = ["o1", "o2", "o3"]
    try:
        with fraiseql.Engine(config, http_port=0):
            publisher = fraiseql.Publisher(config)
            for order_id in ids:
                publisher.publish(Order, "INSERT", new={"id": order_id})
            wait_until(lambda: sorted(calls) == ids, timeout=30)
            # A redelivery would have come after 1 s and finished 3.5 s later: wait past that.
            time.sleep(3)
            info = asyncio.run(consumer_info(fraiseql_nats_url, f"fq_{suffix}", f"worker_{suffix}"))
        assert calls == dict.fromkeys(ids, 1)
        assert info.delivered.consumer_seq == len(ids), "no message was delivered twice"
        assert info.ack_floor.consumer_seq == len(ids)
        assert (info.num_ack_pending, info.num_redelivered, info.num_pending) == (0, 0, 0)
    finally:
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))


async def raw_messages(url: str, subject: str, want: int, timeout: float) -> list[Any]:
    """Messages (headers and body) from a durable JetStream subscription."""
    received: list[Any] = []
    done = asyncio.Event()
    nc = await nats.connect(url)

    async def handler(msg: Any) -> None:
        received.append(msg)
        await msg.ack()
        if len(received) >= want:
            done.set()

    await nc.jetstream().subscribe(subject, durable=f"raw-{uuid.uuid4().hex[:6]}", cb=handler)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await nc.close()
    return received


def test_what_is_published_can_be_cloudevents_in_binary_mode(
    registry: fraiseql.Registry, fraiseql_nats_url: str
) -> None:
    """`[observers.bridge] format = "cloudevents"`: each message carries its CloudEvents
    attributes as `ce-*` headers and the spec's JSON as its data, so the cloudevents SDK
    reads it and consumers of the JSON format are unaffected."""
    from cloudevents.v1.http import from_http

    @fraiseql.type(table="tb_orders_ce")
    class Order:
        id: str
        status: str

    suffix = uuid.uuid4().hex[:8]
    config = nats_config(fraiseql_nats_url, suffix)
    config["observers"]["bridge"] = {"format": "cloudevents"}
    config["observers"]["cloudevents"] = {"source": "urn:shop:orders"}
    try:
        event_id = fraiseql.Publisher(config).publish(Order, "INSERT", new={"id": "o1", "status": "new"})
        [msg] = asyncio.run(raw_messages(fraiseql_nats_url, f"fq{suffix}.mutation.order.insert", 1, 20))
        event = from_http(dict(msg.headers), msg.data)
        assert event["id"] == event_id == msg.headers["Nats-Msg-Id"]
        assert (event["source"], event["type"], event["subject"]) == (
            "urn:shop:orders",
            "fraiseql.order.insert",
            "o1",
        )
        assert event["specversion"] == "1.0" and event["time"]
        assert event.data["data"] == {"id": "o1", "status": "new"} and event.data["entity"] == "Order"
    finally:
        asyncio.run(delete_stream(fraiseql_nats_url, f"fq_{suffix}"))
