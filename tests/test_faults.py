"""The fault matrix (issue 16): the promise itself, under one injected fault per cell.

Each cell writes 20,000 changes with plain SQL at a steady 1,000 a second, in a database of
its own, through `fraiseql run` with a webhook (AtLeastOnce) to a real HTTP sink on the
entity's INSERTs and UPDATEs, and a Python handler (EffectivelyOnce) that records its effect
in a table on its INSERTs. Each change is a new row, except in the per-key order cell (1,000
rows, each inserted and then updated in turn). Both observers retry for about a minute
(`Retry(max_attempts=15, initial_delay_ms=200, max_delay_ms=5000)`), longer than any fault
here lasts, as a user who expects such faults would set them. Each cell checks that every
change reached the webhook at least once, no version of a row for the first time after a
newer one, that no effect was recorded twice, that nothing was dead-lettered, and prints
delivered / duplicates / lost / out of order.

Run it by name: `.venv/bin/pytest tests/test_faults.py -s` (`-s` shows the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import psycopg
import pytest
from nats.js.errors import NotFoundError

from fraiseql.testing import services
from fraiseql.testing.proxy import TcpProxy
from fraiseql.testing.sinks import WebhookSink

CHANGES = 20_000
ROWS_PER_TRANSACTION = 20
RATE = 1_000  # changes a second
MAX_CONCURRENCY = 16
KILL_EVERY = 3.0
DELIVERY_TIMEOUT = 240.0


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
_unsure = set()
_retry = fraiseql.Retry(max_attempts=15, initial_delay_ms=200, max_delay_ms=5000)


def _conn():
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed or conn.broken:
        conn = _local.conn = psycopg.connect({url!r}, autocommit=True)
    return conn


@fraiseql.type(table={table!r}, name={entity!r})
class Row:
    id: int
    v: int


@fraiseql.subscription(
    entity_type={entity!r},
    operation="create",
    name="once",
    checkpoint=fraiseql.EffectivelyOnce(idempotency_table="fault_keys"),
    retry=_retry,
)
def record_effect(row, event):
    # A write whose connection broke (the database restarting) may have committed: the
    # engine retries the handler, which looks before it writes again, as a careful handler
    # does. Any other second run would record a second effect.
    if event.id in _unsure and _conn().execute(
        "SELECT 1 FROM fault_effects WHERE event_id = %s", (event.id,)
    ).fetchone():
        return
    try:
        _conn().execute("INSERT INTO fault_effects (event_id, row_id) VALUES (%s, %s)", (event.id, row.id))
    except psycopg.OperationalError:
        _unsure.add(event.id)
        raise


for kind in ("INSERT", "UPDATE"):
    fraiseql.observer(
        name=f"hook_{{kind.lower()}}", entity={entity!r}, event=kind, actions=[fraiseql.webhook({sink!r})],
        retry=_retry,
    )
"""


def nats_backend(nats_url: str, suffix: str, partitions: int = 0) -> str:
    """`[observers]` lines for `backend = "nats"` with the bridge, on a stream of the cell's own."""
    return (
        f'backend = "nats"\nrun_bridge = true\n\n'
        f'[observers.nats]\nurl = "{nats_url}"\nstream_name = "fault_{suffix}"\n'
        f'subject_prefix = "fault{suffix}.mutation"\nconsumer_name = "worker_{suffix}"\n'
        f"partitions = {partitions}\n\n"
        f"[observers.nats.jetstream]\nack_wait_secs = 5\n\n"
        f'[observers.bridge]\ntransport_name = "bridge_{suffix}"\n'
    )


def redis_backend(redis_url: str, suffix: str) -> str:
    """`[observers]` lines for `backend = "redis"` with the forwarder, on a stream of its own."""
    return (
        f'backend = "redis"\nredis_url = "{redis_url}"\n\n'
        f'[observers.redis]\nstream = "fault:{suffix}"\ngroup = "g_{suffix}"\n'
        f'forwarder_name = "fwd_{suffix}"\nclaim_idle_secs = 5\n'
    )


class Cell:
    """One run of the matrix in the database `url`: the tables, the config, the sink, the
    engines and the writer."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        sink: WebhookSink,
        mode: str,
        backend: Callable[[str], str] | None,
        keys: int = CHANGES,
    ) -> None:
        self.url, self.dir, self.sink, self.keys = url, tmp_path, sink, keys
        self.suffix = uuid.uuid4().hex[:8]
        self.table = f"tb_fault{self.suffix}"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {self.table} (id int primary key, v int not null)")
            conn.execute("CREATE TABLE fault_effects (event_id text, row_id int)")
        backend_lines = backend(self.suffix) if backend else 'backend = "postgres"\n'
        (tmp_path / "fraiseql.toml").write_text(
            f'[database]\nurl = "{url}"\n\n[observers]\nhttp_port = 0\n'
            f"max_concurrency = {MAX_CONCURRENCY}\n{backend_lines}\n"
            f'[observers.postgres]\nlistener_id = "fault_{self.suffix}"\ncapture = "{mode}"\n'
        )
        (tmp_path / "schema.py").write_text(
            SCHEMA.format(url=url, table=self.table, entity=f"Fault{self.suffix}", sink=sink.url + "/hook")
        )
        install = [sys.executable, "-m", "fraiseql.cli", "db", "install"]
        done = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        self.engines: list[subprocess.Popen[bytes]] = []

    def start_engine(self) -> int:
        """Start one more `fraiseql run`; its log goes to `engine-<n>.log` in the cell's dir."""
        n = len(self.engines)
        self.engines.append(self._spawn(n))
        return n

    def kill_and_restart(self, n: int) -> None:
        """SIGKILL engine `n` and start it again at once."""
        self.engines[n].kill()
        self.engines[n].wait()
        self.engines[n] = self._spawn(n)

    def _spawn(self, n: int) -> subprocess.Popen[bytes]:
        run = [sys.executable, "-m", "fraiseql.cli", "run"]
        with (self.dir / f"engine-{n}.log").open("ab") as log:
            return subprocess.Popen(run, cwd=self.dir, stderr=log)

    def stop_engines(self) -> None:
        for engine in self.engines:
            engine.terminate()
        for engine in self.engines:
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.wait(30)
            if engine.poll() is None:
                engine.kill()
                engine.wait()

    def changes(self) -> set[tuple[int, int]]:
        """Every change the writer makes, as `(row id, version)`: change `i` is version
        `i // keys` of row `i % keys + 1`, version 0 its INSERT and the others UPDATEs."""
        return {(i % self.keys + 1, i // self.keys) for i in range(CHANGES)}

    def write_steadily(self) -> threading.Thread:
        """The changes at RATE a second, ROWS_PER_TRANSACTION per transaction (one version of
        consecutive rows), in a thread. A transaction that fails with its connection (the
        server restarting) is tried again on a new one until it commits; it is written so
        that the retry of a commit that did happen changes nothing."""
        insert = (
            f"INSERT INTO {self.table} SELECT g, 0 FROM generate_series(%(first)s::int, %(last)s::int) g "
            "ON CONFLICT DO NOTHING"
        )
        update = f"UPDATE {self.table} SET v = %(v)s WHERE id BETWEEN %(first)s AND %(last)s AND v < %(v)s"

        def write() -> None:
            interval = ROWS_PER_TRANSACTION / RATE
            start = time.monotonic()
            conn: psycopg.Connection | None = None
            for n, i in enumerate(range(0, CHANGES, ROWS_PER_TRANSACTION)):
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                first, v = i % self.keys + 1, i // self.keys
                batch = {"first": first, "last": first + ROWS_PER_TRANSACTION - 1, "v": v}
                while True:
                    try:
                        if conn is None or conn.closed or conn.broken:
                            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                        conn.execute(update if v else insert, batch)
                        break
                    except psycopg.OperationalError:
                        time.sleep(0.2)
            if conn is not None:
                conn.close()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        return writer

    def webhook_changes(self) -> list[tuple[int, int]]:
        """`(row id, version)` of every webhook the sink received, in the order it got them."""
        rows = [json.loads(r.body)["data"]["new"] for r in self.sink.requests]
        return [(row["id"], row["v"]) for row in rows]

    def wait_for_every_webhook(self) -> None:
        want = self.changes()
        try:
            wait_until(lambda: set(self.webhook_changes()) >= want, timeout=DELIVERY_TIMEOUT)
        except AssertionError:
            missing = sorted(want - set(self.webhook_changes()))
            raise AssertionError(
                f"{len(missing)} changes never reached the webhook (first {missing[:10]}); "
                f"dead letters {self.dead_letters()}; engine log:\n{self.log_tail()}"
            ) from None

    def order_violations(self) -> list[tuple[int, int, int]]:
        """`(row, version, after version)` for each change whose first delivery came after
        the first delivery of a newer version of its row (a redelivery is not one)."""
        newest: dict[int, int] = {}
        seen: set[tuple[int, int]] = set()
        violations = []
        for row, v in self.webhook_changes():
            if (row, v) in seen:
                continue
            seen.add((row, v))
            if v < newest.get(row, -1):
                violations.append((row, v, newest[row]))
            newest[row] = max(v, newest.get(row, -1))
        return violations

    def effect_rows(self) -> list[int]:
        with psycopg.connect(self.url) as conn:
            return [row for (row,) in conn.execute("SELECT row_id FROM fault_effects")]

    def dead_letters(self) -> list[tuple[str, str]]:
        with psycopg.connect(self.url) as conn:
            rows = conn.execute("SELECT observer, error FROM fraiseql_dead_letters ORDER BY id LIMIT 5")
            return [(str(observer), str(error)[:200]) for observer, error in rows]

    def log_tail(self, lines: int = 30) -> str:
        text = "".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("engine-*.log")))
        return "\n".join(text.splitlines()[-lines:])

    def check(self, fault: str, may_miss_effects: int = 0) -> None:
        """Print the cell's figures and assert the promise: every change to the webhook at
        least once, no effect twice, at most `may_miss_effects` effects not run, no dead letter."""
        want = self.changes()
        hooks, effects = Counter(self.webhook_changes()), Counter(self.effect_rows())
        missed = set(range(1, self.keys + 1)) - set(effects)
        violations = self.order_violations()
        print(
            f"\n[fault matrix] {fault}: webhook (AtLeastOnce) delivered {len(hooks)} of {CHANGES}, "
            f"duplicates {sum(hooks.values()) - len(hooks)}, lost {len(want - set(hooks))}, "
            f"out of order {len(violations)}; "
            f"handler (EffectivelyOnce) effects {len(effects)}, twice "
            f"{sum(1 for n in effects.values() if n > 1)}, not run {len(missed)}"
        )
        assert set(hooks) == want
        assert violations == [], "a change reached the webhook before an older one of its row"
        assert [row for row, n in effects.items() if n > 1] == [], "an effect was recorded twice"
        assert len(missed) <= may_miss_effects, sorted(missed)[:20]
        assert self.dead_letters() == []


@contextlib.contextmanager
def cell_in(
    tmp_path: Path,
    server_url: str,
    mode: str = "trigger",
    backend: Callable[[str], str] | None = None,
    keys: int = CHANGES,
) -> Iterator[Cell]:
    """A cell in a new database on the server of `server_url`, with its own webhook sink;
    `backend` makes the cell's `[observers]` backend lines from its suffix; the changes are
    spread over `keys` rows (each its own row by default)."""
    with services.scratch_database(server_url) as url, WebhookSink() as sink:
        cell = Cell(tmp_path, url, sink, mode, backend, keys)
        try:
            yield cell
        finally:
            cell.stop_engines()
            delete_stream(tmp_path / "fraiseql.toml")


def delete_stream(config: Path) -> None:
    """Deletes the cell's JetStream stream, if it has one: each stream reserves its
    `max_bytes` (10 GB by default) of the server's storage until it is deleted."""
    section = tomllib.loads(config.read_text()).get("observers", {}).get("nats")
    if not section:
        return

    leases = f"KV_fraiseql_partitions_{section['stream_name']}_{section['consumer_name']}"

    async def delete() -> None:
        nc = await nats.connect(section["url"])
        try:
            for stream in (section["stream_name"], leases):
                with contextlib.suppress(NotFoundError):
                    await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()

    asyncio.run(delete())


def run_with_faults(cell: Cell, faults: list[tuple[float, Callable[[], None]]]) -> None:
    """Write the changes and inject `faults`, each `(seconds after the writer starts,
    what to do)`, then wait until every change has reached the webhook."""
    writer = cell.write_steadily()
    start = time.monotonic()
    for at, fault in faults:
        time.sleep(max(0.0, start + at - time.monotonic()))
        fault()
    writer.join()
    cell.wait_for_every_webhook()


@pytest.mark.timeout(600)
def test_engine_sigkilled_every_3_seconds(tmp_path: Path, capture: tuple[str, str]) -> None:
    """`fraiseql run` SIGKILLed every 3 s while the changes are written, and started again at
    once. The webhook gets every change at least once. The EffectivelyOnce handler never
    records an effect twice; a change whose key was recorded when its run was killed is not
    run again (at most once across a crash, as the README says), so at most the changes in
    flight at each kill (max_concurrency) miss their effect."""
    mode, url = capture
    with cell_in(tmp_path, url, mode) as cell:
        killed_every_3_seconds(cell, f"{mode} capture")


@pytest.mark.timeout(600)
def test_engine_sigkilled_every_3_seconds_keeps_each_rows_order(
    tmp_path: Path, fraiseql_logical_database_url: str
) -> None:
    """The same kills over 1,000 rows, each inserted and then updated 19 times, with per-key
    order (the default) and logical capture: no version of a row reaches the webhook for the
    first time after a newer version of it did; redeliveries after a kill repeat, in order."""
    with cell_in(tmp_path, fraiseql_logical_database_url, "logical", keys=1_000) as cell:
        killed_every_3_seconds(cell, "logical capture, 1,000 rows updated in turn, per-key order")


def killed_every_3_seconds(cell: Cell, what: str) -> None:
    cell.start_engine()
    kills = int(CHANGES / RATE / KILL_EVERY)
    run_with_faults(cell, [(KILL_EVERY * (k + 1), lambda: cell.kill_and_restart(0)) for k in range(kills)])
    cell.check(
        f"engine SIGKILL every {KILL_EVERY:g} s ({what}), {kills} kills",
        may_miss_effects=kills * MAX_CONCURRENCY,
    )


def restarted_twice(cell: Cell, server: services.ServerProcess, crash: int, fault: str) -> None:
    """One engine while `server` is stopped as an operator does 6 s into the run, then
    crashed with the signal `crash` at 13 s, down for 2 s each time. The engine is not
    restarted: it reconnects by itself."""
    cell.start_engine()
    run_with_faults(
        cell,
        [
            (6.0, lambda: server.restart(down_for=2.0)),
            (13.0, lambda: server.restart(crash, down_for=2.0)),
        ],
    )
    assert cell.engines[0].poll() is None, "the engine exited"
    cell.check(fault)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["trigger", "logical"])
def test_postgres_restarted_twice(tmp_path: Path, mode: str) -> None:
    """PostgreSQL (a server of the test's own) restarted twice while the changes are written:
    shut down as an operator does (fast), then crashed (immediate: recovery at start)."""
    # Durable, unlike the harness's default: a crash must not lose what was committed.
    durable = ("fsync=on", "synchronous_commit=on", "full_page_writes=on")
    server = services.start_postgres_server(settings=(*durable, *services.LOGICAL_SETTINGS))
    try:
        with cell_in(tmp_path, server.url, mode) as cell:
            restarted_twice(
                cell,
                server,
                signal.SIGQUIT,
                f"PostgreSQL restarted twice, fast then immediate ({mode} capture)",
            )
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_nats_server_restarted_twice(tmp_path: Path, fraiseql_database_url: str) -> None:
    """`backend = "nats"` with the bridge; its nats-server (file store, the test's own)
    restarted twice, stopped (SIGTERM) then killed (SIGKILL)."""
    server = services.start_nats_server()
    try:
        with cell_in(tmp_path, fraiseql_database_url, backend=lambda s: nats_backend(server.url, s)) as cell:
            restarted_twice(
                cell,
                server,
                signal.SIGKILL,
                "nats-server restarted twice, SIGTERM then SIGKILL (backend nats, bridge)",
            )
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_redis_restarted_twice_with_aof(tmp_path: Path, fraiseql_database_url: str) -> None:
    """`backend = "redis"` with the forwarder; its redis-server (append-only file, fsync every
    second, the test's own) restarted twice, stopped (SIGTERM) then killed (SIGKILL)."""
    server = services.start_redis_server(appendonly=True)
    try:
        with cell_in(tmp_path, fraiseql_database_url, backend=lambda s: redis_backend(server.url, s)) as cell:
            restarted_twice(
                cell,
                server,
                signal.SIGKILL,
                "Redis restarted twice with AOF, SIGTERM then SIGKILL (backend redis)",
            )
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_webhook_sink_down_for_20_seconds(tmp_path: Path, fraiseql_database_url: str) -> None:
    """The webhook's server goes down (connections refused, open ones cut) 4 s into the run and
    comes back 20 s later. The webhooks retry through it; the handler is not held back."""
    with cell_in(tmp_path, fraiseql_database_url) as cell:
        cell.start_engine()
        run_with_faults(cell, [(4.0, cell.sink.down), (24.0, cell.sink.up)])
        cell.check("webhook sink down for 20 s")


@pytest.mark.timeout(600)
def test_network_to_nats_cut_for_10_seconds(
    tmp_path: Path, fraiseql_database_url: str, fraiseql_nats_url: str
) -> None:
    """`backend = "nats"` with the bridge, reaching NATS through a proxy that stops every byte
    both ways for 10 s (a pulled cable: no connection refused, no reset), then lets them
    through again."""
    target = fraiseql_nats_url.removeprefix("nats://").rsplit(":", 1)
    with TcpProxy(target[0], int(target[1])) as proxy:
        backend = lambda s: nats_backend(proxy.url("nats"), s)  # noqa: E731
        with cell_in(tmp_path, fraiseql_database_url, backend=backend) as cell:
            cell.start_engine()
            run_with_faults(cell, [(5.0, proxy.cut), (15.0, proxy.restore)])
            assert cell.engines[0].poll() is None, "the engine exited"
            cell.check("network to NATS cut for 10 s (backend nats, bridge)")


@pytest.mark.timeout(600)
def test_two_engines_on_one_consumer_killed_in_turn(
    tmp_path: Path, fraiseql_database_url: str, fraiseql_nats_url: str
) -> None:
    """Two `fraiseql run` on one durable consumer (`backend = "nats"`, both with the bridge:
    one publishes at a time), SIGKILLed in turn every 3 s and started again at once."""
    backend = lambda s: nats_backend(fraiseql_nats_url, s)  # noqa: E731
    with cell_in(tmp_path, fraiseql_database_url, backend=backend) as cell:
        cell.start_engine()
        cell.start_engine()
        kills = int(CHANGES / RATE / KILL_EVERY)
        faults = [(KILL_EVERY * (k + 1), lambda k=k: cell.kill_and_restart(k % 2)) for k in range(kills)]
        run_with_faults(cell, faults)
        cell.check(
            f"two engines on one consumer SIGKILLed in turn every {KILL_EVERY:g} s, {kills} kills",
            may_miss_effects=kills * MAX_CONCURRENCY,
        )


@pytest.mark.timeout(600)
def test_three_engines_sharing_8_partitions_killed_in_turn_keep_each_rows_order(
    tmp_path: Path, fraiseql_logical_database_url: str, fraiseql_nats_url: str
) -> None:
    """Three `fraiseql run` on one stream with `[observers.nats] partitions = 8` (logical
    capture, the bridge in each: one publishes at a time), over 1,000 rows each inserted and
    then updated 19 times, SIGKILLed in turn every 3 s and started again at once: the
    partitions move between them, and no version of a row reaches the webhook for the first
    time after a newer one."""
    backend = lambda s: nats_backend(fraiseql_nats_url, s, partitions=8)  # noqa: E731
    with cell_in(tmp_path, fraiseql_logical_database_url, "logical", backend=backend, keys=1_000) as cell:
        for _ in range(3):
            cell.start_engine()
        kills = int(CHANGES / RATE / KILL_EVERY)
        faults = [(KILL_EVERY * (k + 1), lambda k=k: cell.kill_and_restart(k % 3)) for k in range(kills)]
        run_with_faults(cell, faults)
        cell.check(
            f"three engines sharing 8 partitions, SIGKILLed in turn every {KILL_EVERY:g} s, {kills} kills, "
            "1,000 rows updated in turn",
            may_miss_effects=kills * MAX_CONCURRENCY,
        )
