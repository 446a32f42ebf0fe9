"""Soak: hours of mixed load through `fraiseql run`, watching for what grows (issue 16).

One PostgreSQL (embedded, durable, `wal_level = logical`), one nats-server and one webhook
sink, started on free ports. `fraiseql run` in the production topology (`backend = "nats"`
with the bridge, logical capture) runs three webhook observers (INSERT, UPDATE, DELETE;
no retry, so a failure is a dead letter at once) and an EffectivelyOnce Python handler on
status changes. A writer makes a steady mix of changes (half INSERTs, two fifths UPDATEs,
a tenth DELETEs) over a bounded set of rows. The sink fails the first delivery of one
event in a hundred with a 500; `fraiseql dlq retry --all` replays the dead letters every
`--replay-every` seconds (their second delivery succeeds).

Every `--sample-every` seconds: the engine's RSS, open file descriptors, TCP connections
and threads, and PostgreSQL's backends. At the end: the slope of each after the warm-up
(the first `--warmup` of the run), by least squares, and the check that every change was
delivered once the last replay has run, with the dead-letter queue empty.

    .venv/bin/python benches/soak.py                         # 1 hour
    .venv/bin/python benches/soak.py --duration 1200         # 20 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import psycopg

from fraiseql.testing import services

PG_SETTINGS = ("fsync=on", "synchronous_commit=on", "full_page_writes=on", *services.LOGICAL_SETTINGS)
ROWS = 10_000  # the rows the writer's changes range over

SCHEMA_PY = """
import fraiseql

_once = fraiseql.Retry(max_attempts=1)


@fraiseql.type(table="tb_soak", name="Soak")
class Soak:
    id: int
    status: str
    total: float


for kind in ("INSERT", "UPDATE", "DELETE"):
    fraiseql.observer(
        name=f"hook_{{kind.lower()}}", entity="Soak", event=kind,
        actions=[fraiseql.webhook({hook!r})], retry=_once,
    )


@fraiseql.subscription(
    entity_type="Soak", operation="update", name="status_changed", condition="status.changed()",
    checkpoint=fraiseql.EffectivelyOnce(idempotency_table="soak_keys"),
)
def status_changed(row, event):
    return None
"""


class Sink:
    """Records the event ids it answered 200 (the `Idempotency-Key` header); fails the first
    delivery of one event in a hundred."""

    def __init__(self) -> None:
        self.delivered: set[str] = set()
        self.failed: set[str] = set()
        self.requests = 0
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                event = self.headers.get("Idempotency-Key") or ""
                with sink.lock:
                    sink.requests += 1
                    fail = hash(event) % 100 == 0 and event not in sink.failed
                    (sink.failed if fail else sink.delivered).add(event)
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((services.LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{services.LOOPBACK}:{self.server.server_address[1]}/hook"


@dataclass
class Writer:
    """Steady mixed changes at `rate` a second, 10 per transaction; counts what it wrote."""

    url: str
    rate: float
    changes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        per_tx = 10
        interval = per_tx / self.rate
        start = time.monotonic()
        n = 0
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                n += 1
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                with conn.transaction():
                    for k in range(per_tx):
                        self.changes += self.change(conn, (n * per_tx + k) % 20)

    def change(self, conn: psycopg.Connection[Any], slot: int) -> int:
        """One change: 10 of 20 slots insert, 8 update, 2 delete; 1 if a row changed."""
        row = int(time.monotonic_ns() // 1000) % ROWS
        if slot < 10:
            cur = conn.execute(
                "INSERT INTO tb_soak (id, status, total) VALUES (%s, 'new', %s) ON CONFLICT DO NOTHING",
                (row, slot * 10.0),
            )
        elif slot < 18:
            status = "shipped" if slot % 2 else "paid"
            update = "UPDATE tb_soak SET status = %s, total = total + 1 WHERE id = %s"
            cur = conn.execute(update, (status, row))
        else:
            cur = conn.execute("DELETE FROM tb_soak WHERE id = %s", (row,))
        return cur.rowcount


def sample(engine: psutil.Process, pg_url: str) -> dict[str, float]:
    with engine.oneshot():
        memory = engine.memory_info().rss / 1024
        fds = engine.num_fds()
        threads = engine.num_threads()
    connections = len(engine.net_connections(kind="tcp"))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
        backends = int(row.fetchone()[0])  # type: ignore[index]
    return {"rss_kb": memory, "fds": fds, "tcp": connections, "threads": threads, "pg_backends": backends - 1}


def slope_per_hour(times: list[float], values: list[float]) -> float:
    """Least-squares slope, per hour."""
    if len(times) < 2:
        return 0.0
    return statistics.linear_regression(times, values).slope * 3600


def replay(workdir: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fraiseql.cli", "dlq", "retry", "--all"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    delivered = sum(1 for line in lines if line.endswith(": delivered"))
    failed = sum(1 for line in lines if ": " in line and not line.endswith(": delivered"))
    return f"{delivered} delivered, {failed} not (exit {done.returncode})"


def dead_letters(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM fraiseql_dead_letters").fetchone()
        return int(row[0]) if row else 0


def wait_healthy(port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fraiseql run exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("fraiseql run was not healthy after 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds of load (default 3600)")
    parser.add_argument("--rate", type=float, default=300.0, help="statements a second (default 300)")
    parser.add_argument("--replay-every", type=float, default=600.0, help="seconds between DLQ replays")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the run not in the slopes")
    parser.add_argument("--out", type=Path, help="write the samples and figures as JSON here")
    args = parser.parse_args()

    postgres = services.start_postgres_server(settings=PG_SETTINGS)
    nats_server = services.start_nats_server()
    sink = Sink()
    work = Path(tempfile.mkdtemp(prefix="fraiseql-soak-"))
    engine_proc: subprocess.Popen[Any] | None = None
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE tb_soak (id int primary key, status text, total numeric)")
        port = services.free_port()
        (work / "fraiseql.toml").write_text(
            f'[database]\nurl = "{postgres.url}"\n\n'
            f'[observers]\nbackend = "nats"\nrun_bridge = true\nhttp_port = {port}\n\n'
            f'[observers.postgres]\ncapture = "logical"\n\n'
            f'[observers.nats]\nurl = "{nats_server.url}"\nstream_name = "SOAK"\n'
        )
        (work / "schema.py").write_text(SCHEMA_PY.format(hook=sink.url))
        log = (work / "engine.log").open("ab")
        engine_proc = subprocess.Popen([sys.executable, "-m", "fraiseql.cli", "run"], cwd=work, stderr=log)
        wait_healthy(port, engine_proc)
        engine = psutil.Process(engine_proc.pid)

        writer = Writer(postgres.url, args.rate)
        writing = threading.Thread(target=writer.run, daemon=True)
        start = time.monotonic()
        writing.start()
        samples: list[dict[str, float]] = []
        replays: list[str] = []
        next_replay = start + args.replay_every
        print(f"soak: {args.duration:g} s at {args.rate:g} changes/s; work dir {work}", flush=True)
        while (now := time.monotonic()) < start + args.duration:
            time.sleep(max(0.0, args.sample_every - (time.monotonic() - now)))
            point = {"t": time.monotonic() - start, **sample(engine, postgres.url)}
            samples.append(point)
            print(
                f"  t={point['t']:6.0f}s  changes {writer.changes:>9,}  delivered {len(sink.delivered):>9,}  "
                f"rss {point['rss_kb'] / 1024:6.1f} MB  fds {point['fds']:.0f}  tcp {point['tcp']:.0f}  "
                f"threads {point['threads']:.0f}  pg backends {point['pg_backends']:.0f}",
                flush=True,
            )
            if time.monotonic() >= next_replay:
                replays.append(replay(work))
                print(f"  replay: {replays[-1]}", flush=True)
                next_replay += args.replay_every
        writer.stop.set()
        writing.join()

        # Drain: what was written is delivered or dead-lettered; the last replay sends the rest.
        deadline = time.monotonic() + 300
        while len(sink.delivered | sink.failed) < writer.changes and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(2)
        replays.append(replay(work))
        lost = writer.changes - len(sink.delivered)
        left = dead_letters(postgres.url)

        kept = [s for s in samples if s["t"] >= args.duration * args.warmup]
        times = [s["t"] for s in kept]
        figures = {
            key: {
                "first": kept[0][key] if kept else 0,
                "last": kept[-1][key] if kept else 0,
                "max": max((s[key] for s in kept), default=0),
                "slope_per_hour": slope_per_hour(times, [s[key] for s in kept]),
            }
            for key in ("rss_kb", "fds", "tcp", "threads", "pg_backends")
        }
        print(
            f"\nsoak: {writer.changes:,} changes in {args.duration:g} s, {sink.requests:,} webhook requests, "
            f"{len(sink.failed):,} failed once and replayed ({len(replays)} replays); "
            f"not delivered {lost}, dead letters left {left}"
        )
        for key, f in figures.items():
            print(
                f"  {key:12} after warm-up: {f['first']:.0f} -> {f['last']:.0f} (max {f['max']:.0f}), "
                f"slope {f['slope_per_hour']:+.1f}/h"
            )
        if args.out:
            record = {"args": vars(args) | {"out": str(args.out)}, "samples": samples, "figures": figures}
            args.out.write_text(json.dumps(record, indent=1))
        if lost or left:
            raise SystemExit(f"FAILED: {lost} changes not delivered, {left} dead letters left; see {work}")
    finally:
        if engine_proc is not None:
            engine_proc.terminate()
            engine_proc.wait(60)
        sink.server.shutdown()
        nats_server.stop()
        postgres.stop()


if __name__ == "__main__":
    main()
