"""backend = "redis": a Redis Stream read through one consumer group, against the harness's
live Redis (and PostgreSQL for the forwarder). Every test uses a stream and group of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

import fraiseql
from fraiseql.testing import services

FRAISEQL = [sys.executable, "-m", "fraiseql.cli"]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def names(fraiseql_redis_url: str) -> Iterator[dict[str, str]]:
    """A stream and group per test; the stream is deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    yield {"stream": f"fq:test:{suffix}", "group": f"g_{suffix}", "suffix": suffix}
    redis.Redis.from_url(fraiseql_redis_url).delete(f"fq:test:{suffix}")


def redis_config(url: str, names: dict[str, str], **redis_section: Any) -> dict[str, Any]:
    return {
        "observers": {
            "backend": "redis",
            "redis_url": url,
            "redis": {"stream": names["stream"], "group": names["group"], "block_ms": 200, **redis_section},
        }
    }


def entry(entity: str, event_id: str, row: dict[str, Any], event: str = "INSERT") -> dict[Any, Any]:
    """The fields the forwarder writes for one change."""
    body = {
        "event": event,
        "entity": entity,
        "timestamp": "2026-01-01T00:00:00Z",
        "data": row,
        "id": event_id,
    }
    return {"id": event_id, "entity": entity, "event": event, "payload": json.dumps(body)}


def pending(client: redis.Redis, names: dict[str, str]) -> int:
    return int(client.xpending(names["stream"], names["group"])["pending"])


def test_sql_rows_fire_a_python_observer_through_the_stream(
    registry: fraiseql.Registry, fraiseql_redis_url: str, fraiseql_database_url: str, names: dict[str, str]
) -> None:
    suffix = names["suffix"]
    entity, table = f"Order{suffix}", f"tb_order{suffix}"
    fraiseql.type(table=table, name=entity)(
        type(entity, (), {"__annotations__": {"id": str, "total": float}})
    )
    lock = threading.Lock()
    fired: list[tuple[str, float]] = []

    @fraiseql.subscription(entity_type=entity, operation="create", condition="total > 100")
    def big(order: Any) -> None:
        with lock:
            fired.append((order.id, order.total))

    config = redis_config(fraiseql_redis_url, names, forwarder_name=f"fwd_{suffix}")
    config["database"] = {"url": fraiseql_database_url}
    config["observers"]["bridge"] = {"notify_channel": f"chan_{suffix}"}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key, total numeric)")
    try:
        with (
            fraiseql.Engine(config, http_port=0) as engine,
            psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
        ):
            conn.execute(f"INSERT INTO {table} VALUES ('o1', 150), ('o2', 5), ('o3', 999)")
            wait_until(lambda: len(fired) >= 2)
            client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
            # o2 matches no observer: wait until it too went through the stream and was acked.
            wait_until(lambda: "fraiseql_redis_entries_received_total 3" in engine.metrics())
            wait_until(lambda: pending(client, names) == 0)
            with urllib.request.urlopen(f"http://127.0.0.1:{engine.http_port}/health", timeout=5) as resp:
                health = json.load(resp)
            metrics = engine.metrics()
        assert sorted(fired) == [("o1", 150.0), ("o3", 999.0)]
        assert health["observers"] == {
            "transport": "redis",
            "connected": True,
            "stream": names["stream"],
            "capture_gaps": [],  # the forwarder's captured tables are all captured
            "backfills": [],
            "oldest_in_flight": None,
            "blocked": False,
        }
        assert "fraiseql_redis_entries_forwarded_total 3" in metrics
        assert "fraiseql_redis_entries_received_total 3" in metrics
        assert "fraiseql_redis_entries_pending 0" in metrics
        entries: Any = client.xrange(names["stream"])
        assert len(entries) == 3
        fields = {json.loads(f["payload"])["data"]["id"]: f for _, f in entries}
        assert set(fields) == {"o1", "o2", "o3"}
        o1 = fields["o1"]
        assert o1["entity"] == entity and o1["event"] == "INSERT" and o1["id"]
        body = json.loads(o1["payload"])
        assert body["id"] == o1["id"] and body["data"] == {"id": "o1", "total": 150}
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_two_engines_on_one_group_process_each_entry_once(
    registry: fraiseql.Registry, fraiseql_redis_url: str, names: dict[str, str]
) -> None:
    @fraiseql.type
    class Order:
        id: str
        total: float

    lock = threading.Lock()
    calls: list[str] = []

    @fraiseql.subscription(entity_type=Order, operation="create")
    def count(order: Order, event: fraiseql.Event) -> None:
        with lock:
            calls.append(event.id)

    client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
    config = redis_config(fraiseql_redis_url, names)
    n = 400
    with fraiseql.Engine(config) as first, fraiseql.Engine(config) as second:
        for i in range(n):
            client.xadd(names["stream"], entry("Order", f"evt-{i}", {"id": f"o{i}", "total": i}))
        wait_until(lambda: len(calls) >= n)
        wait_until(lambda: pending(client, names) == 0)
        time.sleep(0.5)  # a duplicate would show up now
        received = [received_total(e.metrics()) for e in (first, second)]
    assert len(calls) == n
    assert sorted(calls) == sorted(f"evt-{i}" for i in range(n))
    assert sum(received) == n
    # Stopped cleanly with nothing pending: both consumers left the group.
    assert client.xinfo_consumers(names["stream"], names["group"]) == []


def received_total(metrics: str) -> int:
    for line in metrics.splitlines():
        if line.startswith("fraiseql_redis_entries_received_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no fraiseql_redis_entries_received_total in /metrics")


def test_malformed_entries_are_dead_lettered_and_acked(
    registry: fraiseql.Registry, fraiseql_redis_url: str, names: dict[str, str]
) -> None:
    @fraiseql.type
    class Order:
        id: str

    fired: list[str] = []
    fraiseql.subscription(entity_type=Order, operation="create")(lambda o: fired.append(o.id))
    client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
    with fraiseql.Engine(redis_config(fraiseql_redis_url, names)) as engine:
        client.xadd(names["stream"], {"payload": "{not json"})
        client.xadd(names["stream"], {"something": "else"})
        client.xadd(names["stream"], entry("Order", "evt-ok", {"id": "ok"}))
        wait_until(lambda: len(engine.dlq()) >= 2 and fired == ["ok"])
        wait_until(lambda: pending(client, names) == 0)
        dlq = engine.dlq()
        bad = next(e for e in dlq if "invalid JSON" in e["error"])
        with pytest.raises(fraiseql.UndecodableEntryError, match="could not decode") as refused:
            engine.retry_dead_letter(bad["id"])
        assert "nothing to re-run" in str(refused.value) and refused.value.kind == "undecodable"
    assert len(dlq) == 2
    errors = sorted(e["error"] for e in dlq)
    assert "invalid JSON" in errors[0] or "invalid JSON" in errors[1]
    assert any('missing field "payload"' in e for e in errors)
    assert all(e["observer"] == f"redis:{names['stream']}" for e in dlq)
    # One naming for undecodable input of every source: action `decode`.
    assert all(e["action"] == "decode" for e in dlq)
    assert bad["event"]["new"]["payload"] == "{not json"
    assert bad["event"]["new"]["stream"] == names["stream"]


def test_entries_with_nul_bytes_are_dead_lettered_once_and_acked(
    registry: fraiseql.Registry,
    fraiseql_redis_url: str,
    fraiseql_database_url: str,
    names: dict[str, str],
) -> None:
    """With the durable dead-letter queue: an event carrying "\\u0000" whose action fails,
    and an entry whose payload is raw bytes with NULs, are each dead-lettered once (not
    redelivered up to max_deliver and beyond) and acknowledged."""

    suffix = names["suffix"]
    table = f"tb_nul_{suffix}"

    @fraiseql.type(table=table)
    class Order:
        id: str

    @fraiseql.subscription(entity_type=Order, operation="create", retry=fraiseql.Retry(max_attempts=1))
    def refuses(order: Any) -> None:
        raise ValueError("refused")

    client = redis.Redis.from_url(fraiseql_redis_url)
    config = redis_config(fraiseql_redis_url, names, max_deliver=3, claim_idle_secs=1)
    config["database"] = {"url": fraiseql_database_url}
    config["observers"]["redis"]["forwarder_name"] = f"fwd_{suffix}"
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key)")
    try:
        with fraiseql.Engine(config) as engine:
            client.xadd(names["stream"], entry("Order", f"nul-{suffix}", {"id": "a\u0000b"}))
            client.xadd(names["stream"], {"id": f"raw-{suffix}", "payload": b"\x00\xfe\x00"})

            def mine() -> list[dict[str, Any]]:
                return [e for e in engine.dlq() if e["event"]["id"].endswith(f"-{suffix}")]

            wait_until(lambda: len(mine()) == 2)
            wait_until(lambda: pending(client, names) == 0)
            time.sleep(2.5)  # past claim_idle_secs: nothing comes back
            entries = {e["event"]["id"]: e for e in mine()}
        assert len(entries) == 2
        assert entries[f"nul-{suffix}"]["event"]["new"] == {"id": "a\x00b"}
        assert entries[f"raw-{suffix}"]["origin"] == "undecodable"
        assert entries[f"raw-{suffix}"]["raw"] == {"encoding": "base64", "data": "AP4A"}
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM fraiseql_dead_letters WHERE event_id LIKE %s", (f"%-{suffix}",))
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def in_flight(metrics: str) -> int:
    for line in metrics.splitlines():
        if line.startswith("fraiseql_observer_events_in_flight "):
            return int(float(line.split()[1]))
    raise AssertionError("no fraiseql_observer_events_in_flight in /metrics")


def test_events_being_processed_show_in_the_in_flight_gauge(
    registry: fraiseql.Registry, fraiseql_redis_url: str, names: dict[str, str]
) -> None:
    @fraiseql.type
    class Order:
        id: str

    release = threading.Event()
    fraiseql.subscription(entity_type=Order, operation="create")(lambda o: release.wait(20))
    client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
    with fraiseql.Engine(redis_config(fraiseql_redis_url, names)) as engine:
        for i in range(3):
            client.xadd(names["stream"], entry("Order", f"evt-{i}", {"id": str(i)}))
        wait_until(lambda: in_flight(engine.metrics()) == 3)
        release.set()
        wait_until(lambda: in_flight(engine.metrics()) == 0 and pending(client, names) == 0)


def test_an_entry_delivered_more_than_max_deliver_times_is_dead_lettered(
    registry: fraiseql.Registry, fraiseql_redis_url: str, names: dict[str, str]
) -> None:
    @fraiseql.type
    class Order:
        id: str

    fired: list[str] = []
    fraiseql.subscription(entity_type=Order, operation="create", name="never_runs")(
        lambda o: fired.append(o.id)
    )
    client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
    client.xgroup_create(names["stream"], names["group"], id="0", mkstream=True)
    entry_id = client.xadd(names["stream"], entry("Order", "evt-poison", {"id": "p"}))
    # A consumer that crashed on it three times already: delivery count 3.
    client.xreadgroup(names["group"], "ghost", {names["stream"]: ">"}, count=1)
    for _ in range(2):
        client.xclaim(names["stream"], names["group"], "ghost", 0, [entry_id])
    config = redis_config(fraiseql_redis_url, names, max_deliver=3, claim_idle_secs=1)
    with fraiseql.Engine(config) as engine:
        wait_until(lambda: len(engine.dlq()) == 1)
        wait_until(lambda: pending(client, names) == 0)
        dlq = engine.dlq()
    assert fired == []
    assert dlq[0]["observer"] == "never_runs"
    assert "delivered 4 times (max_deliver = 3)" in dlq[0]["error"]
    assert dlq[0]["event"]["id"] == "evt-poison"


SCHEMA = """
import os, time
import fraiseql
from fraiseql.testing import services

@fraiseql.type
class Order:
    id: str

@fraiseql.subscription(entity_type=Order, operation="create")
def slow(order, event):
    time.sleep(0.2)
    with open(os.environ["DONE_FILE"], "a") as f:
        f.write(event.id + "\\n")
"""


def test_a_killed_instance_loses_nothing(
    registry: fraiseql.Registry, fraiseql_redis_url: str, names: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "schema.py").write_text(SCHEMA)
    (tmp_path / "fraiseql.toml").write_text(
        "[observers]\n"
        'backend = "redis"\n'
        f'redis_url = "{fraiseql_redis_url}"\n'
        "http_port = 0\n"
        "[observers.redis]\n"
        f'stream = "{names["stream"]}"\n'
        f'group = "{names["group"]}"\n'
        "claim_idle_secs = 1\n"
    )
    done = tmp_path / "done.txt"
    done.touch()
    client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
    n = 60
    ids = {f"evt-{i}" for i in range(n)}
    env = {**os.environ, "DONE_FILE": str(done)}
    with subprocess.Popen(
        [*FRAISEQL, "run"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "ready: " in line:
                break
        for i in range(n):
            client.xadd(names["stream"], entry("Order", f"evt-{i}", {"id": f"o{i}"}))
        wait_until(lambda: len(done.read_text().split()) >= 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    by_killed = set(done.read_text().split())
    left = pending(client, names)
    assert left > 0, "the killed instance should have left entries pending"

    @fraiseql.type
    class Order:
        id: str

    lock = threading.Lock()
    rescued: list[str] = []

    @fraiseql.subscription(entity_type=Order, operation="create")
    def record(order: Order, event: fraiseql.Event) -> None:
        with lock:
            rescued.append(event.id)

    config = redis_config(fraiseql_redis_url, names, claim_idle_secs=1)
    with fraiseql.Engine(config) as engine:
        wait_until(lambda: by_killed | set(rescued) == ids)
        wait_until(lambda: pending(client, names) == 0)
        metrics = engine.metrics()
    assert by_killed | set(rescued) == ids
    assert "fraiseql_redis_entries_reclaimed_total 0" not in metrics


def start_persistent_redis(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    argv = [services.redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir)]
    argv += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: services.redis_answers("127.0.0.1", port, timeout=1.0), timeout=20)
    return proc


def test_restarting_redis_with_persistence_loses_nothing(
    registry: fraiseql.Registry, fraiseql_database_url: str, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    entity, table = f"Order{suffix}", f"tb_order{suffix}"
    fraiseql.type(table=table, name=entity)(type(entity, (), {"__annotations__": {"id": str}}))
    lock = threading.Lock()
    fired: set[str] = set()

    @fraiseql.subscription(entity_type=entity, operation="create")
    def record(order: Any) -> None:
        with lock:
            fired.add(order.id)

    port = services.free_port()
    server = start_persistent_redis(tmp_path, port)
    names = {"stream": f"fq:test:{suffix}", "group": f"g_{suffix}"}
    config = redis_config(
        f"redis://127.0.0.1:{port}", names, forwarder_name=f"fwd_{suffix}", claim_idle_secs=1
    )
    config["database"] = {"url": fraiseql_database_url}
    config["observers"]["bridge"] = {"notify_channel": f"chan_{suffix}"}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key)")
    try:
        with fraiseql.Engine(config), psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            for i in range(20):
                conn.execute(f"INSERT INTO {table} VALUES ('a{i}')")
            wait_until(lambda: len(fired) >= 20)
            server.kill()
            server.wait(timeout=10)
            for i in range(20):
                conn.execute(f"INSERT INTO {table} VALUES ('b{i}')")
            time.sleep(0.5)
            server = start_persistent_redis(tmp_path, port)
            for i in range(20):
                conn.execute(f"INSERT INTO {table} VALUES ('c{i}')")
            want = {f"{p}{i}" for p in "abc" for i in range(20)}
            wait_until(lambda: fired >= want, timeout=60)
        assert fired == want
    finally:
        server.kill()
        server.wait(timeout=10)
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


TWO_SCHEMA = """
import os
import fraiseql

fraiseql.type(table=os.environ["TABLE"], name=os.environ["ENTITY"])(
    type(os.environ["ENTITY"], (), {"__annotations__": {"id": str}})
)

@fraiseql.subscription(entity_type=os.environ["ENTITY"], operation="create")
def record(order):
    with open(os.environ["DONE_FILE"], "a") as f:
        f.write(f"{os.getpid()} {order.id}\\n")
"""


def test_two_fraiseql_runs_on_one_database_process_each_sql_change_once(
    fraiseql_redis_url: str, fraiseql_database_url: str, names: dict[str, str], tmp_path: Path
) -> None:
    suffix = names["suffix"]
    entity, table = f"Order{suffix}", f"tb_order{suffix}"
    (tmp_path / "schema.py").write_text(TWO_SCHEMA)
    (tmp_path / "fraiseql.toml").write_text(
        "[database]\n"
        f'url = "{fraiseql_database_url}"\n'
        "[observers]\n"
        'backend = "redis"\n'
        f'redis_url = "{fraiseql_redis_url}"\n'
        "http_port = 0\n"
        "[observers.bridge]\n"
        f'notify_channel = "chan_{suffix}"\n'
        "[observers.redis]\n"
        f'stream = "{names["stream"]}"\n'
        f'group = "{names["group"]}"\n'
        f'forwarder_name = "fwd_{suffix}"\n'
    )
    done = tmp_path / "done.txt"
    done.touch()
    env = {**os.environ, "DONE_FILE": str(done), "TABLE": table, "ENTITY": entity}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id text primary key)")
    procs = [
        subprocess.Popen([*FRAISEQL, "run"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "ready: " in line:
                    break
        n = 200
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            for i in range(0, n, 10):
                conn.execute(f"INSERT INTO {table} SELECT 'o' || g FROM generate_series({i}, {i + 9}) g")
        wait_until(lambda: len(done.read_text().splitlines()) >= n)
        client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
        wait_until(lambda: pending(client, names) == 0)
        time.sleep(1.0)  # a second delivery or a second forwarder would show up now
        lines = [line.split() for line in done.read_text().splitlines()]
        assert sorted(order_id for _, order_id in lines) == sorted(f"o{i}" for i in range(n))
        assert client.xlen(names["stream"]) == n  # one forwarder: each change appended once
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
            if proc.stderr is not None:
                proc.stderr.close()
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_a_handler_that_kills_the_engine_is_dead_lettered_past_max_deliver(
    fraiseql_redis_url: str, names: dict[str, str], tmp_path: Path
) -> None:
    """A Python handler that calls `os._exit(7)` on one entry: each `fraiseql run` that takes
    it dies; the next one reclaims it (`XAUTOCLAIM`, which counts a delivery) once it has been
    idle for `claim_idle_secs`. Past `max_deliver` it is dead-lettered without running, and
    the engine goes on with what comes after. (Entries taken in the same reads as the poison
    share its deaths and can be dead-lettered with it: README, "A change that kills the
    engine".)"""
    suffix = names["suffix"]
    entity = f"Order{suffix}"
    runs, seen = tmp_path / "runs.txt", tmp_path / "seen.txt"
    port = services.free_port()
    (tmp_path / "fraiseql.toml").write_text(
        "[observers]\n"
        'backend = "redis"\n'
        f'redis_url = "{fraiseql_redis_url}"\n'
        f"http_port = {port}\n"
        "[observers.redis]\n"
        f'stream = "{names["stream"]}"\n'
        f'group = "{names["group"]}"\n'
        "claim_idle_secs = 1\n"
        "max_deliver = 2\n"
    )
    (tmp_path / "schema.py").write_text(
        "import os\nimport fraiseql\n"
        f"@fraiseql.type(table='tb_order', name={entity!r})\nclass T:\n    id: str\n"
        f"@fraiseql.subscription(entity_type={entity!r}, operation='create')\n"
        "def poisoned(t):\n"
        "    if t.id == 'poison':\n"
        f"        with open({str(runs)!r}, 'a') as f:\n"
        "            f.write('ran\\n')\n"
        "        os._exit(7)\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(f'{t.id}\\n')\n"
    )
    client = redis.Redis.from_url(fraiseql_redis_url, decode_responses=True)
    client.xadd(names["stream"], entry(entity, "evt-poison", {"id": "poison"}))

    def lines(path: Path) -> list[str]:
        return path.read_text().split() if path.exists() else []

    def dead_letters() -> list[dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/dlq", timeout=2) as answer:
                return list(json.loads(answer.read())["entries"])
        except OSError:
            return []

    deaths = 0
    while True:
        log = tmp_path / f"run{deaths}.log"
        with (
            log.open("w") as stderr_file,
            subprocess.Popen([*FRAISEQL, "run"], cwd=tmp_path, stderr=stderr_file) as run,
        ):
            try:
                wait_until(lambda: run.poll() is not None or bool(dead_letters()), timeout=60)
                if run.poll() is None:
                    for event_id in ["o1", "o2", "o3"]:
                        client.xadd(names["stream"], entry(entity, f"evt-{event_id}", {"id": event_id}))
                    wait_until(lambda: sorted(lines(seen)) == ["o1", "o2", "o3"])
                    dead_lettered = dead_letters()
            finally:
                if run.poll() is None:
                    run.terminate()
                    run.wait(30)
        if run.returncode != 7:
            break
        deaths += 1
        assert deaths <= 2, "run past max_deliver"
    assert run.returncode == 0
    assert deaths == 2 and len(lines(runs)) == 2, "run on its two deliveries, not a third"
    assert len(dead_lettered) == 1, dead_lettered
    [dead] = dead_lettered
    assert dead["event_id"] == "evt-poison", dead_lettered
    assert "delivered 3 times (max_deliver = 2)" in dead["error"], dead
