"""backend = "postgres": rows written with plain SQL fire observers, through the native
change capture, against the harness's live PostgreSQL."""

from __future__ import annotations

import json
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

import fraiseql


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def table(fraiseql_database_url: str) -> Iterator[tuple[str, str]]:
    """A fresh entity (and its tb_ table) per test: `(entity, table)`."""
    suffix = uuid.uuid4().hex[:8]
    entity, name = f"Order{suffix}", f"tb_order{suffix}"
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id text primary key, status text, total numeric, email text)")
    yield entity, name
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def pg_config(url: str) -> dict[str, Any]:
    return {"database": {"url": url}, "observers": {"backend": "postgres"}}


def declare(entity: str, table: str) -> type:
    return fraiseql.type(table=table, name=entity)(
        type(entity, (), {"__annotations__": {"id": str, "status": str, "total": float, "email": str}})
    )


def test_sql_writes_fire_observers_with_old_and_new(
    registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    entity, name = table
    declare(entity, name)
    lock = threading.Lock()
    seen: list[tuple[str, Any, Any]] = []

    def record(tag: str) -> Callable[[Any, fraiseql.Event], None]:
        def handler(o: Any, event: fraiseql.Event) -> None:
            with lock:
                seen.append((tag, event.new, event.old))

        return handler

    fraiseql.subscription(entity_type=entity, operation="create", condition="total > 1000", name="big")(
        record("big")
    )
    fraiseql.subscription(
        entity_type=entity,
        operation="update",
        name="shipped",
        condition="status.changed() && status == 'shipped'",
    )(record("shipped"))
    fraiseql.subscription(entity_type=entity, operation="delete", name="gone")(record("gone"))
    with (
        fraiseql.Engine(pg_config(fraiseql_database_url)) as engine,
        psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
    ):
        conn.execute(f"INSERT INTO {name} VALUES ('o1', 'new', 1500, 'a@x.io'), ('o2', 'new', 5, 'b@x.io')")
        conn.execute(f"UPDATE {name} SET status = 'shipped' WHERE id = 'o1'")
        conn.execute(f"UPDATE {name} SET total = 6 WHERE id = 'o2'")
        conn.execute(f"DELETE FROM {name} WHERE id = 'o2'")
        wait_until(lambda: len(seen) >= 3)
        time.sleep(0.3)  # nothing else may arrive
        assert engine.dlq() == []
    tags = sorted(t for t, _, _ in seen)
    assert tags == ["big", "gone", "shipped"]
    shipped = next(s for s in seen if s[0] == "shipped")
    assert shipped[1]["status"] == "shipped" and shipped[2]["status"] == "new"
    gone = next(s for s in seen if s[0] == "gone")
    assert gone[1] is None and gone[2]["id"] == "o2"


def test_changes_made_while_stopped_are_processed_after_start(
    registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    entity, name = table
    declare(entity, name)
    seen: list[str] = []
    lock = threading.Lock()

    def handler(o: Any) -> None:
        with lock:
            seen.append(o.id)

    fraiseql.subscription(
        entity_type=entity,
        operation="create",
        checkpoint=fraiseql.EffectivelyOnce(idempotency_table="test_pg_keys"),
    )(handler)
    with fraiseql.Engine(pg_config(fraiseql_database_url)):  # installs the trigger
        pass
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {name} (id, status, total) VALUES (%s, 'new', 1)",
            [(f"o{i}",) for i in range(500)],
        )
    with fraiseql.Engine(pg_config(fraiseql_database_url)):
        wait_until(lambda: len(seen) >= 500)
    with fraiseql.Engine(pg_config(fraiseql_database_url)):  # a restart redelivers nothing
        time.sleep(0.5)
    assert sorted(seen) == sorted(f"o{i}" for i in range(500))
    with psycopg.connect(fraiseql_database_url) as conn:
        (keys,) = conn.execute("SELECT count(*) FROM test_pg_keys").fetchone()  # type: ignore[misc]
    assert keys >= 500


def test_an_idempotency_store_that_fails_for_a_while_is_retried_not_dead_lettered(
    registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    """EffectivelyOnce's key cannot be recorded for a while (its table renamed away, as a
    restarting database fails): the claim is tried again under the observer's retry policy,
    and the handler runs once it succeeds, with nothing dead-lettered. (It was dead-lettered at
    the first failure: the fault matrix's PostgreSQL restart found it.)"""
    entity, name = table
    declare(entity, name)
    keys = f"keys_{name}"
    seen: list[str] = []
    fraiseql.subscription(
        entity_type=entity,
        operation="create",
        name=f"once_{name}",
        checkpoint=fraiseql.EffectivelyOnce(idempotency_table=keys),
        retry=fraiseql.Retry(
            max_attempts=30, backoff_strategy="fixed", initial_delay_ms=100, max_delay_ms=100
        ),
    )(lambda o: seen.append(o.id))
    with (
        fraiseql.Engine(pg_config(fraiseql_database_url)) as engine,
        psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
    ):
        conn.execute(f"ALTER TABLE {keys} RENAME TO {keys}_away")
        conn.execute(f"INSERT INTO {name} (id, status, total) VALUES ('o1', 'new', 1)")
        time.sleep(1.0)
        mine = lambda: [e for e in engine.dlq() if e["observer"] == f"once_{name}"]  # noqa: E731
        assert seen == [] and mine() == []
        conn.execute(f"ALTER TABLE {keys}_away RENAME TO {keys}")
        wait_until(lambda: seen == ["o1"])
        assert mine() == []
        conn.execute(f"DROP TABLE {keys}")


def test_emit_is_refused_on_the_postgres_backend(
    registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    entity, name = table
    declare(entity, name)
    fraiseql.subscription(entity_type=entity, operation="create")(lambda o: None)
    with (
        fraiseql.Engine(pg_config(fraiseql_database_url)) as engine,
        pytest.raises(fraiseql.EngineError, match="write rows to the database"),
    ):
        engine.emit(entity, "INSERT", new={"id": "x"})


def test_missing_database_url_is_a_clear_error(registry: fraiseql.Registry) -> None:
    engine = fraiseql.Engine({"observers": {"backend": "postgres"}})
    with pytest.raises(fraiseql.TransportError, match=r"\[database\] url"):
        engine.start()


def test_db_install_prints_and_runs_the_capture_sql(tmp_path: Path, capture: tuple[str, str]) -> None:
    mode, url = capture
    suffix = uuid.uuid4().hex[:8]
    entity, name = f"Inst{suffix}", f"tb_inst{suffix}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id text primary key)")
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{url}"\n\n[observers]\nbackend = "postgres"\n\n'
        f'[observers.postgres]\ncapture = "{mode}"\nlistener_id = "inst_{suffix}"\n'
    )
    (tmp_path / "schema.py").write_text(
        f"import fraiseql\n@fraiseql.type(table={name!r}, name={entity!r})\nclass T:\n    id: str\n"
    )
    cli = [sys.executable, "-m", "fraiseql.cli", "db", "install"]
    out = subprocess.run([*cli, "--print"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert name in out.stdout
    slot = f"fraiseql_inst_{suffix}"
    if mode == "trigger":
        assert "fraiseql_change_log" in out.stdout and "PUBLICATION" not in out.stdout
    else:
        assert "REPLICA IDENTITY FULL" in out.stdout and "fraiseql_change_log" not in out.stdout
        assert f"pg_create_logical_replication_slot('{slot}', 'pgoutput')" in out.stdout
    for _ in range(2):  # idempotent
        out = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{mode} capture installed on {name}"), out.stdout
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass", (name,))
        triggers = found.fetchall()
        published = conn.execute("SELECT count(*) FROM pg_publication_tables WHERE tablename = %s", (name,))
        slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        state = (published.fetchone(), slots.fetchone())
    prefix = f"fraiseql_capture_{entity}"
    if mode == "trigger":
        assert sorted(r[0] for r in triggers) == [prefix, f"{prefix}_del", f"{prefix}_ins"]
        assert state == ((0,), (0,))
    else:
        assert triggers == [] and state == ((1,), (1,))
    out = subprocess.run([*cli, "--uninstall"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with psycopg.connect(url, autocommit=True) as conn:
        slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        assert slots.fetchone() == (0,)
        conn.execute(f"DROP TABLE {name}")


def test_dead_letters_persist_in_postgres_and_the_cli_retries_them(
    tmp_path: Path, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    from fraiseql.testing.sinks import WebhookSink

    entity, name = table
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fraiseql_dead_letters")  # recreated on open, empty
    with WebhookSink() as sink:
        sink.script(503, 503)
        (tmp_path / "fraiseql.toml").write_text(
            f'[database]\nurl = "{fraiseql_database_url}"\n\n[observers]\nbackend = "postgres"\n\n'
            f'[[observers.handlers]]\nname = "hook_{name}"\nentity = "{entity}"\ntable = "{name}"\n'
            'event = "INSERT"\n'
            'retry = { max_attempts = 2, backoff_strategy = "fixed", '
            "initial_delay_ms = 1, max_delay_ms = 1 }\n"
            f'actions = [{{ type = "webhook", url = "{sink.url}" }}]\n'
        )
        cli = [sys.executable, "-m", "fraiseql.cli"]
        with (
            fraiseql.Engine(tmp_path / "fraiseql.toml", schema=fraiseql.Registry()) as engine,
            psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
        ):
            conn.execute(f"INSERT INTO {name} (id, status, total) VALUES ('o1', 'new', 1)")
            wait_until(lambda: len(engine.dlq()) == 1)
        # Another process sees the entry, and retries it once the sink answers 200 again.
        out = subprocess.run([*cli, "dlq", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"hook_{name}" in out.stdout and "attempts=2" in out.stdout and "503" in out.stdout
        entry_id = out.stdout.split("\t", 1)[0]
        out = subprocess.run(
            [*cli, "dlq", "show", entry_id], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert json.loads(out.stdout)["event"]["new"]["id"] == "o1"
        out = subprocess.run(
            [*cli, "dlq", "retry", entry_id], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert f"{entry_id}: delivered" in out.stdout
        assert [r.status for r in sink.requests] == [503, 503, 200]
        out = subprocess.run([*cli, "dlq", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert "0 entries" in out.stderr
        # `--all` on an empty queue (a scheduled replay with nothing to do) is not an error.
        out = subprocess.run(
            [*cli, "dlq", "retry", "--all"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert (out.returncode, out.stderr.strip()) == (0, "0 entries: nothing to retry")


def test_idempotency_prune_deletes_only_old_keys(tmp_path: Path, fraiseql_database_url: str) -> None:
    table = f"prune_keys_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (listener_id TEXT NOT NULL, event_key TEXT NOT NULL, "
            "processed_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (listener_id, event_key))"
        )
        conn.execute(
            f"INSERT INTO {table} SELECT 'l', 'old' || g, now() - interval '8 days' "
            "FROM generate_series(1, 2500) g"
        )
        conn.execute(f"INSERT INTO {table} SELECT 'l', 'new' || g, now() FROM generate_series(1, 10) g")
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{fraiseql_database_url}"\n\n[observers]\nbackend = "postgres"\n\n'
        f'[[observers.handlers]]\nname = "h"\nentity = "Order"\nevent = "INSERT"\n'
        f'checkpoint = {{ strategy = "effectively_once", idempotency_table = "{table}" }}\n'
        'actions = [{ type = "webhook", url = "http://127.0.0.1:9/x" }]\n'
    )
    cli = [sys.executable, "-m", "fraiseql.cli", "idempotency", "prune", "--batch", "1000"]
    out = subprocess.run(
        [*cli, "--older-than", "7d"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert f"{table}: deleted 2500 key(s) older than 7d" in out.stdout
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        (left,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # type: ignore[misc]
        conn.execute(f"DROP TABLE {table}")
    assert left == 10
    out = subprocess.run(
        [*cli, "--older-than", "7 days"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "expected a number and a unit" in out.stderr


def test_poll_only_listener_with_its_own_cursor_dead_letters_malformed_rows(
    registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    """[observers.postgres] listen = false: the triggers send no NOTIFY and the reader polls;
    a change-log row that cannot become an event goes to the DLQ with the reason, the rows
    after it still arrive, and the lag metrics are exported."""
    entity, name = table
    declare(entity, name)
    seen: list[str] = []
    fraiseql.subscription(entity_type=entity, operation="create", name=f"poll_{name}")(
        lambda o: seen.append(o.id)
    )
    listener = f"poll_{uuid.uuid4().hex[:8]}"
    config = pg_config(fraiseql_database_url)
    config["observers"]["postgres"] = {"listener_id": listener, "listen": False, "poll_interval_ms": 50}
    with (
        fraiseql.Engine(config, http_port=0) as engine,
        psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
    ):
        [args] = conn.execute(
            "SELECT tgargs FROM pg_trigger WHERE tgname = %s", (f"fraiseql_capture_{entity}",)
        ).fetchone()  # type: ignore[misc]
        assert bytes(args).split(b"\x00")[:3] == [entity.encode(), b"", b"skip_unchanged"]
        [bad_id] = conn.execute(
            "INSERT INTO fraiseql_change_log (entity, event, table_name, new) "
            "VALUES (%s, 'MERGE', %s, '{}') RETURNING id",
            (entity, name),
        ).fetchone()  # type: ignore[misc]
        conn.execute(f"INSERT INTO {name} (id, status, total) VALUES ('after_bad', 'new', 1)")
        try:
            wait_until(lambda: seen == ["after_bad"])

            def dead_letters() -> list[dict[str, Any]]:
                return [e for e in engine.dlq() if e["event"]["id"] == str(bad_id)]

            # The row after it may be delivered before its dead letter is stored: they are
            # processed side by side.
            wait_until(lambda: len(dead_letters()) == 1)
            [entry] = dead_letters()
            assert entry["observer"] == f"postgres:{listener}"
            assert entry["action"] == "decode"
            assert "MERGE" in entry["error"]
            assert entry["event"]["new"]["event"] == "MERGE"
            with pytest.raises(fraiseql.DeadLetterError, match="nothing to re-run"):
                engine.retry_dead_letter(entry["id"])
            metrics = engine.metrics()
            assert "fraiseql_observer_source_undecodable_total 1" in metrics
            assert "fraiseql_observer_changelog_lag_rows " in metrics
            assert "fraiseql_observer_changelog_lag_seconds " in metrics
        finally:  # other tests' listeners must not meet the hand-made row
            conn.execute("DELETE FROM fraiseql_change_log WHERE id = %s", (bad_id,))
            conn.execute("DELETE FROM fraiseql_dead_letters WHERE event_id = %s", (str(bad_id),))


def test_change_log_rows_without_a_row_object_are_dead_lettered_not_delivered(
    registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    """Hand-written change-log rows whose `new` is NULL, JSON null, an array or a string
    never reach an observer as `data.new`: each is dead-lettered with what is wrong."""
    entity, name = table
    declare(entity, name)
    seen: list[Any] = []
    fraiseql.subscription(entity_type=entity, operation="create", name=f"shape_{name}")(
        lambda o, event: seen.append(event.new)
    )
    listener = f"shape_{uuid.uuid4().hex[:8]}"
    config = pg_config(fraiseql_database_url)
    config["observers"]["postgres"] = {"listener_id": listener, "poll_interval_ms": 50}
    bad = {
        "NULL": "is NULL",
        "'null'": "found null",
        "'[1, 2]'": "found an array",
        "'\"str\"'": "found a string",
    }
    ids: dict[int, str] = {}
    with (
        fraiseql.Engine(config) as engine,
        psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
    ):
        try:
            for new, why in bad.items():
                [row_id] = conn.execute(
                    "INSERT INTO fraiseql_change_log (entity, event, table_name, new) "
                    f"VALUES (%s, 'INSERT', %s, {new}) RETURNING id",
                    (entity, name),
                ).fetchone()  # type: ignore[misc]
                ids[row_id] = why
            conn.execute(f"INSERT INTO {name} (id, status, total) VALUES ('real', 'new', 1)")
            wait_until(lambda: len(seen) == 1)
            wait_until(lambda: len([e for e in engine.dlq() if int(e["event"]["id"]) in ids]) == len(ids))
            for e in engine.dlq():
                if int(e["event"]["id"]) in ids:
                    assert e["action"] == "decode" and e["observer"] == f"postgres:{listener}"
                    assert ids[int(e["event"]["id"])] in e["error"], e["error"]
                    assert "column new" in e["error"]
            assert seen == [{"id": "real", "status": "new", "total": 1, "email": None}]
        finally:
            for row_id in ids:
                conn.execute("DELETE FROM fraiseql_change_log WHERE id = %s", (row_id,))
                conn.execute("DELETE FROM fraiseql_dead_letters WHERE event_id = %s", (str(row_id),))


def test_sigkill_mid_stream_then_restart_loses_nothing(tmp_path: Path, capture: tuple[str, str]) -> None:
    """10,000 rows written while `fraiseql run` is down; the engine is SIGKILLed while it
    works through them and started again: every row reaches the handler (AtLeastOnce may
    repeat a few around the kill; nothing is missing). With either capture."""
    mode, fraiseql_database_url = capture
    suffix = uuid.uuid4().hex[:8]
    entity, name = f"Kill{suffix}", f"tb_kill{suffix}"
    seen = tmp_path / "seen.txt"
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{fraiseql_database_url}"\n\n[observers]\nbackend = "postgres"\n'
        f'http_port = 0\n\n[observers.postgres]\nlistener_id = "kill_{suffix}"\nbatch_size = 100\n'
        f'capture = "{mode}"\n'
    )
    (tmp_path / "schema.py").write_text(
        "import time\nimport fraiseql\n"
        f"@fraiseql.type(table={name!r}, name={entity!r})\nclass T:\n    id: int\n"
        f"@fraiseql.subscription(entity_type={entity!r}, operation='create')\n"
        "def record(t):\n"
        "    time.sleep(0.0005)\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(f'{t.id}\\n')\n"
    )
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int primary key)")
    cli = [sys.executable, "-m", "fraiseql.cli", "db", "install"]
    installed = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.startswith(f"{mode} capture installed on {name}"), installed.stdout
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {name} SELECT g FROM generate_series(1, 10000) g")

    def lines() -> list[str]:
        return seen.read_text().split() if seen.exists() else []

    run = [sys.executable, "-m", "fraiseql.cli", "run"]
    with subprocess.Popen(run, cwd=tmp_path, stderr=subprocess.DEVNULL) as first:
        wait_until(lambda: len(lines()) >= 2000, timeout=60)
        first.kill()
    killed_at = len(lines())
    assert killed_at < 10_000, "the kill came too late to test anything"
    with subprocess.Popen(run, cwd=tmp_path, stderr=subprocess.DEVNULL) as second:
        try:
            wait_until(lambda: set(lines()) >= {str(i) for i in range(1, 10_001)}, timeout=120)
        finally:
            second.terminate()
            assert second.wait(30) == 0
    got = lines()
    assert set(got) == {str(i) for i in range(1, 10_001)}
    if mode == "trigger":
        assert len(got) - 10_000 <= 2 * 100, "at most the batches in flight at the kill run again"
    else:
        # What was not confirmed when the process died: at most a status interval's worth.
        assert len(got) - 10_000 <= killed_at, "only what came before the kill runs again"
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {name}")


def test_installing_again_while_the_application_writes_locks_nothing(
    tmp_path: Path, capture: tuple[str, str]
) -> None:
    """Every `fraiseql run` installs capture again. With a writer's transaction open on the
    captured table, that install returns at once: it locks neither the table nor the change
    log. It used to drop and create the triggers and alter the change log each time, which
    waited for every open writer and, under a steady write load with the engine restarting,
    deadlocked with them (found by tests/test_faults.py). With either capture."""
    mode, url = capture
    suffix = uuid.uuid4().hex[:8]
    name = f"tb_lock{suffix}"
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{url}"\n\n[observers]\nbackend = "postgres"\n\n'
        f'[observers.postgres]\nlistener_id = "lock_{suffix}"\ncapture = "{mode}"\n'
    )
    (tmp_path / "schema.py").write_text(
        f"import fraiseql\n@fraiseql.type(table={name!r}, name='Lock{suffix}')\nclass T:\n    id: int\n"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int primary key)")
    install = [sys.executable, "-m", "fraiseql.cli", "db", "install"]
    try:
        first = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        with psycopg.connect(url) as writer:
            writer.execute(f"INSERT INTO {name} VALUES (1)")  # left open: holds its row locks
            started = time.monotonic()
            again = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=30)
            assert again.returncode == 0, again.stderr
            assert time.monotonic() - started < 20
            writer.commit()
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_a_postgresql_restart_mid_stream_loses_nothing(registry: fraiseql.Registry, mode: str) -> None:
    """A private PostgreSQL is SIGKILLed (crash, then recovery from its WAL) while the engine
    works, and started again on the same data and port: every committed row is delivered.
    With either capture."""
    import signal

    from fraiseql.testing.services import LOGICAL_SETTINGS, start_postgres_server

    server = start_postgres_server(settings=LOGICAL_SETTINGS if mode == "logical" else ())
    entity = "Crash"
    declare(entity, "tb_crash")
    seen: set[str] = set()
    lock = threading.Lock()

    def record(o: Any) -> None:
        with lock:
            seen.add(o.id)

    fraiseql.subscription(entity_type=entity, operation="create", name="crash_rec")(record)
    # The harness's server runs with synchronous_commit = off, which may lose the last commits
    # in a crash by design; this test's writes ask for the guarantee. (fsync=off is safe here:
    # a killed process loses nothing the OS has.)
    durable = {"options": "-c synchronous_commit=on"}
    with psycopg.connect(server.url, autocommit=True, **durable) as conn:
        conn.execute("CREATE TABLE tb_crash (id text primary key, status text, total numeric, email text)")
    config = pg_config(server.url)
    config["observers"]["postgres"] = {"capture": mode}
    try:
        with fraiseql.Engine(config):
            with psycopg.connect(server.url, autocommit=True, **durable) as conn:
                for i in range(200):
                    conn.execute("INSERT INTO tb_crash (id) VALUES (%s)", (f"a{i}",))
            wait_until(lambda: len(seen) >= 20)
            server.restart(signal.SIGKILL, timeout=90)
            with psycopg.connect(server.url, autocommit=True, **durable) as conn:
                for i in range(100):
                    conn.execute("INSERT INTO tb_crash (id) VALUES (%s)", (f"b{i}",))
            wait_until(lambda: len(seen) >= 300, timeout=60)
        assert seen == {f"a{i}" for i in range(200)} | {f"b{i}" for i in range(100)}
    finally:
        server.stop()


def test_a_fast_shutdown_of_postgresql_is_not_held_up_by_an_event_in_flight(
    registry: fraiseql.Registry,
) -> None:
    """Logical capture. PostgreSQL's fast shutdown (`pg_ctl stop -m fast`, what a service
    manager's restart does) keeps a walsender until its client has confirmed all the WAL it
    was sent; a handler still running keeps the engine from confirming. The engine ends its
    replication session when the server says it is shutting down, so the server stops now,
    not when the handler is done (the fault matrix found restarts held for minutes while
    events waited for this same database). Once it is back, later changes flow."""
    from fraiseql.testing.services import LOGICAL_SETTINGS, start_postgres_server

    server = start_postgres_server(settings=LOGICAL_SETTINGS)
    declare("Held", "tb_held")
    release = threading.Event()
    ran: list[str] = []

    def held(o: Any) -> None:
        ran.append(o.id)
        release.wait(120)

    fraiseql.subscription(entity_type="Held", operation="create", name="held")(held)
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE tb_held (id text primary key, status text, total numeric, email text)")
    config = pg_config(server.url)
    config["observers"]["postgres"] = {"capture": "logical"}
    try:
        with fraiseql.Engine(config):
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute("INSERT INTO tb_held (id) VALUES ('h1')")
            wait_until(lambda: ran == ["h1"])
            server.restart(timeout=20)  # raises if the server has not stopped within 20 s
            release.set()
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute("INSERT INTO tb_held (id) VALUES ('h2')")
            wait_until(lambda: "h2" in ran, timeout=60)
    finally:
        release.set()
        server.stop()


def test_backfill_feeds_existing_rows_to_a_webhook_marked_and_resumable(
    tmp_path: Path, capture: tuple[str, str], webhook_sink: Any
) -> None:
    """`fraiseql backfill` sends the rows that already exist through change capture to the
    running engine: each once, marked (`"backfill": true`, `Fraiseql-Backfill`), filtered by
    `--where`, and a second run says it had finished."""
    from fraiseql.testing.services import free_port

    mode, url = capture
    suffix = uuid.uuid4().hex[:8]
    entity, name = f"Fill{suffix}", f"tb_fill{suffix}"
    port = free_port()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int primary key, total numeric)")
        conn.execute(f"INSERT INTO {name} SELECT g, g FROM generate_series(1, 95) g")
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{url}"\n\n[observers]\nbackend = "postgres"\nhttp_port = {port}\n\n'
        f'[observers.postgres]\ncapture = "{mode}"\nlistener_id = "fill_{suffix}"\npoll_interval_ms = 100\n\n'
        f'[[observers.handlers]]\nname = "hook_{suffix}"\nentity = "{entity}"\ntable = "{name}"\n'
        f'event = "INSERT"\nactions = [{{ type = "webhook", url = "{webhook_sink.url}/fill" }}]\n'
        f'[[observers.handlers]]\nname = "upd_{suffix}"\nentity = "{entity}"\ntable = "{name}"\n'
        f'event = "UPDATE"\nactions = [{{ type = "webhook", url = "{webhook_sink.url}/upd" }}]\n'
    )
    cli = [sys.executable, "-m", "fraiseql.cli"]
    bad = subprocess.run(
        [*cli, "backfill", entity, "--observer", f"upd_{suffix}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert f"observer `upd_{suffix}` observes UPDATE of `{entity}`" in bad.stderr, bad.stderr
    typo = subprocess.run(
        [*cli, "backfill", entity + "x"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert f"no entity `{entity}x` is declared (did you mean `{entity}`?)" in typo.stderr, typo.stderr
    with subprocess.Popen([*cli, "run"], cwd=tmp_path, stderr=subprocess.PIPE, text=True) as engine:
        try:
            wait_until(lambda: _captured(url, name, mode), timeout=60)
            out = subprocess.run(
                [*cli, "backfill", entity, "--where", "total > 5", "--chunk", "10"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            assert "backfill " in out.stdout and ": 90 rows sent" in out.stdout, out.stdout
            assert "90 of 90 rows sent (100%)" in out.stderr, out.stderr
            got = webhook_sink.wait_for(90, timeout=60)
            again = subprocess.run(
                [*cli, "backfill", entity, "--where", "total > 5"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "had already finished (90 rows)" in again.stdout, again.stdout

            def listed() -> list[dict[str, Any]]:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    backfills: list[dict[str, Any]] = json.load(resp)["observers"]["backfills"]
                    return backfills

            wait_until(lambda: any(b["rows_sent"] == 90 and b["finished_at"] for b in listed()))
        finally:
            engine.terminate()
            engine.wait(30)
    assert len(webhook_sink.requests) == 90, "each row once"
    bodies = [json.loads(r.body) for r in got]
    assert sorted(b["data"]["new"]["id"] for b in bodies) == list(range(6, 96))
    assert all(b["backfill"] is True and b["event"] == "INSERT" for b in bodies)
    backfill_ids = {r.header("Fraiseql-Backfill") for r in got}
    assert len(backfill_ids) == 1 and backfill_ids != {None}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {name}")


def _captured(url: str, table: str, mode: str) -> bool:
    """Whether the engine's install has captured `table` yet."""
    with psycopg.connect(url, autocommit=True) as conn:
        if mode == "logical":
            sql = (
                "SELECT count(*) FROM pg_publication_tables WHERE tablename = %s"
                " AND EXISTS (SELECT 1 FROM pg_replication_slots WHERE active)"
            )
        else:
            sql = "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass"
        row = conn.execute(sql, (table,)).fetchone()
    return row is not None and row[0] > 0


def test_a_stop_waits_at_most_shutdown_timeout_then_leaves_the_rest_for_redelivery(
    tmp_path: Path, registry: fraiseql.Registry, fraiseql_database_url: str, table: tuple[str, str]
) -> None:
    """A handler still running when the engine stops is given `shutdown_timeout_secs`; then
    the stop goes on without it, its change unacknowledged, and the next start runs it again."""
    entity, name = table
    declare(entity, name)
    started, done = threading.Event(), threading.Event()
    runs: list[str] = []

    def slow(o: Any) -> None:
        runs.append(o.id)
        if len(runs) == 1:
            started.set()
            time.sleep(5)
            done.set()

    fraiseql.subscription(entity_type=entity, operation="create", name="slow_stop", timeout_ms=60_000)(slow)
    config = pg_config(fraiseql_database_url)
    config["observers"]["shutdown_timeout_secs"] = 1
    config["observers"]["postgres"] = {"capture": "trigger", "listener_id": f"stop_{name}"}
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        with fraiseql.Engine(config):
            conn.execute(f"INSERT INTO {name} (id) VALUES ('s1')")
            assert started.wait(20)
        assert not done.is_set(), "the stop did not wait for the handler to finish"
        with fraiseql.Engine(config):
            wait_until(lambda: len(runs) >= 2)
    assert runs == ["s1", "s1"], "delivered again after the stop left it unacknowledged"


def test_a_renamed_column_is_reported_not_silently_never_matched(
    registry: fraiseql.Registry, capture: tuple[str, str], webhook_sink: Any
) -> None:
    """`ALTER TABLE … RENAME COLUMN total TO amount` under a running observer whose condition
    and template read `total`: logged once, counted, and listed in /health. With either
    capture."""
    mode, url = capture
    suffix = uuid.uuid4().hex[:8]
    entity, name = f"Drift{suffix}", f"tb_drift{suffix}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id text primary key, status text, total numeric, email text)")
    declare(entity, name)
    fraiseql.observer(
        name="big",
        entity=entity,
        event="INSERT",
        condition="total > 10",
        actions=[fraiseql.webhook(url=webhook_sink.url, body_template='{"total": {{total}}}')],
    )
    config = {
        "database": {"url": url},
        "observers": {
            "backend": "postgres",
            "postgres": {"capture": mode, "listener_id": f"drift_{suffix}"},
        },
    }
    try:
        with fraiseql.Engine(config, http_port=0) as engine, psycopg.connect(url, autocommit=True) as conn:
            health_url = f"http://127.0.0.1:{engine.http_port}/health"
            conn.execute(f"INSERT INTO {name} VALUES ('a', 'new', 50, 'a@x.io')")
            webhook_sink.wait_for(1)
            with urllib.request.urlopen(health_url, timeout=5) as r:
                assert "missing_fields" not in json.load(r)["observers"]
            conn.execute(f"ALTER TABLE {name} RENAME COLUMN total TO amount")
            conn.execute(f"INSERT INTO {name} VALUES ('b', 'new', 60, 'b@x.io'), ('c', 'new', 70, 'c@x.io')")
            wait_until(lambda: 'field="total"} 2' in engine.metrics())
            with urllib.request.urlopen(health_url, timeout=5) as r:
                assert r.status == 200  # a warning, not an outage
                [missing] = json.load(r)["observers"]["missing_fields"]
            metrics = engine.metrics()
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            if mode == "logical":
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name LIKE %s AND NOT active",
                    (f"%drift_{suffix}%",),
                )
    assert (missing["observer"], missing["entity"], missing["field"]) == ("big", entity, "total")
    assert 'fraiseql_observer_missing_fields_total{observer="big",field="total"} 2' in metrics
    assert len(webhook_sink.requests) == 1  # the renamed column's rows never matched


def test_a_handler_that_kills_the_engine_is_dead_lettered_after_three_runs(
    tmp_path: Path, capture: tuple[str, str]
) -> None:
    """A Python handler that calls `os._exit(7)` on one row: `fraiseql run` dies on it, and
    on each start after it runs that row alone; the third death is the last — the next start
    dead-letters the row without running it, with the reason, and every other row is
    delivered. With either capture."""
    mode, fraiseql_database_url = capture
    suffix = uuid.uuid4().hex[:8]
    entity, name, observer = f"Poison{suffix}", f"tb_poison{suffix}", f"poisoned_{suffix}"
    seen, runs = tmp_path / "seen.txt", tmp_path / "runs.txt"
    (tmp_path / "fraiseql.toml").write_text(
        f'[database]\nurl = "{fraiseql_database_url}"\n\n[observers]\nbackend = "postgres"\n'
        f'http_port = 0\n\n[observers.postgres]\nlistener_id = "poison_{suffix}"\n'
        f'capture = "{mode}"\n'
    )
    (tmp_path / "schema.py").write_text(
        "import os\nimport fraiseql\n"
        f"@fraiseql.type(table={name!r}, name={entity!r})\nclass T:\n    id: int\n"
        f"@fraiseql.subscription(entity_type={entity!r}, operation='create')\n"
        f"def {observer}(t):\n"
        "    if t.id == 13:\n"
        f"        with open({str(runs)!r}, 'a') as f:\n"
        "            f.write('ran\\n')\n"
        "        os._exit(7)\n"
        f"    with open({str(seen)!r}, 'a') as f:\n"
        "        f.write(f'{t.id}\\n')\n"
    )
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int primary key)")
    cli = [sys.executable, "-m", "fraiseql.cli"]
    installed = subprocess.run(
        [*cli, "db", "install"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert installed.returncode == 0, installed.stderr
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {name} SELECT g FROM generate_series(1, 40) g")

    def lines(path: Path) -> list[str]:
        return path.read_text().split() if path.exists() else []

    others = {str(i) for i in range(1, 41) if i != 13}

    def dead_lettered() -> bool:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('fraiseql_dead_letters')").fetchone() == (None,):
                return False
            return bool(entry_ids(conn))

    def entry_ids(conn: psycopg.Connection[Any]) -> list[int]:
        rows = conn.execute("SELECT id FROM fraiseql_dead_letters WHERE observer = %s", (observer,))
        return [row[0] for row in rows]

    # Three deaths, or four when the row was read after the last write of the range handed
    # out (written at most once a second): then the next run records it first.
    deaths: list[str] = []
    log = tmp_path / "run.log"
    while True:
        with (
            log.open("w") as stderr_file,
            subprocess.Popen([*cli, "run"], cwd=tmp_path, stderr=stderr_file) as run,
        ):
            try:
                wait_until(lambda: run.poll() is not None or dead_lettered(), timeout=60)
                if run.poll() is None:
                    wait_until(lambda: set(lines(seen)) == others, timeout=60)
            finally:
                if run.poll() is None:
                    run.terminate()
                    run.wait(30)
        if run.returncode != 7:
            break
        deaths.append(log.read_text())
        assert len(lines(runs)) == len(deaths)
        assert len(deaths) <= 4, "the poison row was run a fifth time"
    stderr = log.read_text()
    assert run.returncode == 0, stderr[-2000:]
    assert len(deaths) in (3, 4), len(deaths)
    for died in deaths[-2:]:
        assert "running it alone" in died, died[-2000:]
    assert len(lines(runs)) == len(deaths), "not run again once dead-lettered"
    assert "dead-lettered without running it again" in stderr
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        [entry_id] = entry_ids(conn)
    entry = json.loads(
        subprocess.run(
            [*cli, "dlq", "show", str(entry_id)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert entry["event"]["new"]["id"] == 13
    assert entry["error"] == (
        "the engine stopped (killed or crashed) while processing it at least 3 times; "
        "dead-lettered without running it again"
    )
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM fraiseql_deliveries WHERE source LIKE %s", (f"%poison_{suffix}",)
        ).fetchone() == (0,), "a clean stop leaves nothing suspect"
        conn.execute(f"DROP TABLE {name}")
        # The dead-letter table is shared with the other tests of this database.
        conn.execute("DELETE FROM fraiseql_dead_letters WHERE observer = %s", (observer,))
