"""The fault matrix (issue 16): the promise itself, under one injected fault per cell.

Each cell writes 20,000 changes with plain SQL at a steady 1,000 a second through
`fraiseql run` with two observers of the entity's INSERTs: a webhook (AtLeastOnce) to a
real HTTP sink, and a Python handler (EffectivelyOnce) that records its effect in a table.
Each cell checks that every change reached the webhook at least once, that no effect was
recorded twice, that nothing was dead-lettered, and prints delivered / duplicates / lost.

Run it by name: `.venv/bin/pytest tests/test_faults.py -s` (`-s` shows the figures).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from fraiseql.testing.sinks import WebhookSink

CHANGES = 20_000
ROWS_PER_TRANSACTION = 20
RATE = 1_000  # changes a second
MAX_CONCURRENCY = 16
KILL_EVERY = 3.0


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


SCHEMA = """
import threading
import psycopg
import fraiseql

_local = threading.local()


def _conn():
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect({url!r}, autocommit=True)
    return conn


@fraiseql.type(table={table!r}, name={entity!r})
class Row:
    id: int


@fraiseql.subscription(
    entity_type={entity!r},
    operation="create",
    name={once!r},
    checkpoint=fraiseql.EffectivelyOnce(idempotency_table={keys!r}),
)
def record_effect(row, event):
    _conn().execute("INSERT INTO {effects} (event_id, row_id) VALUES (%s, %s)", (event.id, row.id))


fraiseql.observer(name={hook!r}, entity={entity!r}, event="INSERT", actions=[fraiseql.webhook({sink!r})])
"""


class Cell:
    """One run of the matrix: the tables, the config, the sink and the writer."""

    def __init__(self, tmp_path: Path, mode: str, url: str, sink: WebhookSink) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.url, self.dir, self.sink = url, tmp_path, sink
        self.table, self.effects = f"tb_fault{suffix}", f"fault_effects{suffix}"
        self.keys = f"fault_keys{suffix}"
        self.once, self.hook = f"once_{suffix}", f"hook_{suffix}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {self.table} (id int primary key)")
            conn.execute(f"CREATE TABLE {self.effects} (event_id text, row_id int)")
        (tmp_path / "fraiseql.toml").write_text(
            f'[database]\nurl = "{url}"\n\n[observers]\nbackend = "postgres"\nhttp_port = 0\n'
            f"max_concurrency = {MAX_CONCURRENCY}\n\n"
            f'[observers.postgres]\nlistener_id = "fault_{suffix}"\ncapture = "{mode}"\n'
        )
        (tmp_path / "schema.py").write_text(
            SCHEMA.format(
                url=url,
                table=self.table,
                entity=f"Fault{suffix}",
                once=self.once,
                keys=self.keys,
                effects=self.effects,
                hook=self.hook,
                sink=sink.url + "/hook",
            )
        )
        install = [sys.executable, "-m", "fraiseql.cli", "db", "install"]
        done = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def start_engine(self) -> subprocess.Popen[bytes]:
        run = [sys.executable, "-m", "fraiseql.cli", "run"]
        return subprocess.Popen(run, cwd=self.dir, stderr=subprocess.DEVNULL)

    def write_steadily(self) -> threading.Thread:
        """INSERTs at RATE a second, ROWS_PER_TRANSACTION per transaction, in a thread."""

        def write() -> None:
            interval = ROWS_PER_TRANSACTION / RATE
            start = time.monotonic()
            with psycopg.connect(self.url, autocommit=True) as conn:
                for n, first in enumerate(range(1, CHANGES + 1, ROWS_PER_TRANSACTION)):
                    delay = start + n * interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    last = first + ROWS_PER_TRANSACTION - 1
                    sql = f"INSERT INTO {self.table} SELECT generate_series(%s::int, %s::int)"
                    conn.execute(sql, (first, last))

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        return writer

    def webhook_rows(self) -> list[int]:
        return [json.loads(r.body)["data"]["new"]["id"] for r in self.sink.requests]

    def effect_rows(self) -> list[int]:
        with psycopg.connect(self.url) as conn:
            return [row for (row,) in conn.execute(f"SELECT row_id FROM {self.effects}")]

    def dead_letters(self) -> int:
        with psycopg.connect(self.url) as conn:
            found = conn.execute(
                "SELECT count(*) FROM fraiseql_dead_letters WHERE observer IN (%s, %s)",
                (self.once, self.hook),
            ).fetchone()
        return int(found[0]) if found else 0

    def drop(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "DELETE FROM fraiseql_dead_letters WHERE observer IN (%s, %s)", (self.once, self.hook)
            )
            for table in (self.table, self.effects, self.keys):
                conn.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.mark.timeout(600)
def test_engine_sigkilled_every_3_seconds(tmp_path: Path, capture: tuple[str, str]) -> None:
    """`fraiseql run` SIGKILLed every 3 s while the changes are written, and started again at
    once. The webhook gets every change at least once. The EffectivelyOnce handler never
    records an effect twice; a change whose key was recorded when its run was killed is not
    run again (at most once across a crash, as the README says), so at most the changes in
    flight at each kill (max_concurrency) miss their effect."""
    mode, url = capture
    with WebhookSink() as sink:
        cell = Cell(tmp_path, mode, url, sink)
        try:
            engine = cell.start_engine()
            writer = cell.write_steadily()
            kills = 0
            try:
                while writer.is_alive():
                    time.sleep(KILL_EVERY)
                    engine.kill()
                    engine.wait()
                    kills += 1
                    engine = cell.start_engine()
                want = set(range(1, CHANGES + 1))
                wait_until(lambda: set(cell.webhook_rows()) >= want, timeout=240)
            finally:
                engine.terminate()
                engine.wait(30)
            hooks, effects = Counter(cell.webhook_rows()), Counter(cell.effect_rows())
            missed = want - set(effects)
            print(
                f"\n[fault matrix] engine SIGKILL every {KILL_EVERY:g} s ({mode} capture), {kills} kills: "
                f"webhook (AtLeastOnce) delivered {len(hooks)} of {CHANGES}, "
                f"duplicates {sum(hooks.values()) - len(hooks)}, lost {len(want - set(hooks))}; "
                f"handler (EffectivelyOnce) effects {len(effects)}, twice "
                f"{sum(1 for n in effects.values() if n > 1)}, not run {len(missed)}"
            )
            assert kills >= 5, "the writer finished before the engine was killed often enough"
            assert set(hooks) == want
            assert [row for row, n in effects.items() if n > 1] == [], "an effect was recorded twice"
            assert len(missed) <= kills * MAX_CONCURRENCY, sorted(missed)[:20]
            assert cell.dead_letters() == 0
        finally:
            cell.drop()
