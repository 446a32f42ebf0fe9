"""The NATS backend on a real JetStream cluster: three nats-servers with routes on loopback,
started by the harness, the stream kept in three copies (`replicas = 3`) and the engine given
every server's URL."""

from __future__ import annotations

import asyncio
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

import nats
import psycopg
import pytest

import fraiseql
from fraiseql.testing.services import NatsCluster, free_port, scratch_database, start_nats_cluster


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    started = start_nats_cluster(3)
    try:
        yield started
    finally:
        started.stop()


def live_urls(cluster: NatsCluster) -> list[str]:
    return [node.url for node in cluster.nodes if node.process.poll() is None]


async def _stream_info(urls: list[str], name: str, subject: str | None) -> Any:
    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=2)
    try:
        return await nc.jetstream().stream_info(name, subjects_filter=subject)
    finally:
        await nc.close()


def stream_info(cluster: NatsCluster, name: str, subject: str | None = None) -> Any:
    """The stream's info from a live server; with `subject`, its message count per subject."""
    return asyncio.run(_stream_info(live_urls(cluster), name, subject))


def stored(info: Any, subject: str) -> int:
    return int((info.state.subjects or {}).get(subject, 0))


async def _consumer_leader(urls: list[str], stream: str, consumer: str) -> str:
    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=2)
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def _delete_stream(urls: list[str], name: str) -> None:
    nc = await nats.connect(servers=urls, connect_timeout=2)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


@pytest.mark.timeout(300)
def test_the_stream_leader_killed_mid_stream_loses_nothing_and_stores_nothing_twice(
    registry: fraiseql.Registry, fraiseql_database_url: str, cluster: NatsCluster
) -> None:
    """The bridge publishes SQL changes to a stream kept on all three servers while the
    engine consumes it; the stream's leader is SIGKILLed mid-stream: every change reaches the
    handler, the stream holds each change once (its `Nats-Msg-Id`), another server leads, and
    the killed one, started again, catches up."""
    # A database of its own: the bridge forwards the whole change log, and the session
    # database's holds every earlier test's changes.
    with scratch_database(fraiseql_database_url) as database_url:
        leader_killed_mid_stream(database_url, cluster)


def leader_killed_mid_stream(fraiseql_database_url: str, cluster: NatsCluster) -> None:
    suffix = uuid.uuid4().hex[:8]
    entity, table, stream = f"Clustered{suffix}", f"tb_clustered{suffix}", f"fq_{suffix}"
    subject = f"fq{suffix}.mutation.{entity.lower()}.insert"
    fraiseql.type(table=table, name=entity)(type(entity, (), {"__annotations__": {"id": int}}))
    lock = threading.Lock()
    seen: set[int] = set()

    @fraiseql.subscription(entity_type=entity, operation="create")
    def record(row: Any) -> None:
        with lock:
            seen.add(row.id)

    config: dict[str, Any] = {
        "database": {"url": fraiseql_database_url},
        "observers": {
            "backend": "nats",
            "run_bridge": True,
            "bridge": {"transport_name": f"bridge_{suffix}", "notify_channel": f"chan_{suffix}"},
            "nats": {
                "url": cluster.url,
                "stream_name": stream,
                "subject_prefix": f"fq{suffix}.mutation",
                "consumer_name": f"worker_{suffix}",
                "jetstream": {"replicas": 3, "ack_wait_secs": 5},
            },
        },
    }
    with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int primary key)")
    try:
        with (
            fraiseql.Engine(config) as engine,
            psycopg.connect(fraiseql_database_url, autocommit=True) as conn,
        ):
            for i in range(1, 201):
                conn.execute(f"INSERT INTO {table} VALUES ({i})")
            wait_until(lambda: len(seen) >= 50, timeout=30)
            # A healthy cluster first: both other copies current.
            wait_until(
                lambda: (
                    all(p.current for p in stream_info(cluster, stream).cluster.replicas or [])
                    and len(stream_info(cluster, stream).cluster.replicas or []) == 2
                ),
                timeout=30,
            )
            before = stream_info(cluster, stream)
            assert before.config.num_replicas == 3
            # The server leading the consumer (the stream's leader too, most often): the
            # engine's pulls go to it.
            leader = asyncio.run(_consumer_leader(live_urls(cluster), stream, f"worker_{suffix}"))
            killed = cluster.index(leader)
            cluster.kill(killed)
            for i in range(201, 401):  # written while the cluster elects another leader
                conn.execute(f"INSERT INTO {table} VALUES ({i})")
            wait_until(lambda: seen == set(range(1, 401)), timeout=120)
            after = stream_info(cluster, stream, subject)
            assert after.cluster.leader != leader
            assert stored(after, subject) == 400, "each change stored once"
            cluster.restart(killed)

            def caught_up() -> bool:
                info = stream_info(cluster, stream, subject)
                peers = [
                    info.cluster.leader,
                    *(p.name for p in info.cluster.replicas if p.current and not p.lag),
                ]
                return f"n{killed + 1}" in peers and stored(info, subject) == 400

            wait_until(caught_up, timeout=60)
            ours = [e for e in engine.dlq() if e["observer"].startswith(f"bridge_{suffix}:")]
            assert ours == [], "nothing dead-lettered while the cluster elected a leader"
        assert seen == set(range(1, 401))
    finally:
        with psycopg.connect(fraiseql_database_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"DELETE FROM fraiseql_dead_letters WHERE observer LIKE 'bridge_{suffix}:%'")
        asyncio.run(_delete_stream(live_urls(cluster), stream))


ENGINE_SCHEMA = """
import os, time
import fraiseql

@fraiseql.type
class Item:
    id: str
    v: int

_out = open({out!r}, "a", buffering=1)

@fraiseql.subscription(entity_type=Item, operation="update")
def seen(item):
    _out.write(f"{{item.id}} {{item.v}} {{time.time_ns()}}\\n")
"""


def _owned(port: int) -> list[int]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return list(json.loads(response.read())["observers"]["partitions"]["owned"])
    except Exception:
        return []


@pytest.mark.timeout(300)
def test_three_engines_sharing_partitions_keep_each_keys_order_when_one_is_killed(
    tmp_path: Path, cluster: NatsCluster
) -> None:
    """Three `fraiseql run` on the cluster (`replicas = 3`, `partitions = 8`, every server's
    URL); 6,000 updates of 200 keys are published while one engine is SIGKILLed and started
    again: every version reaches a handler, none for the first time after a newer one of
    its key."""
    suffix = uuid.uuid4().hex[:8]
    nats_section: dict[str, Any] = {
        "url": cluster.url,
        "stream_name": f"fq_{suffix}",
        "subject_prefix": f"fq{suffix}.mutation",
        "consumer_name": f"worker_{suffix}",
        "partitions": 8,
    }
    engines: list[tuple[Path, int]] = []
    for n in range(3):
        home, port = tmp_path / f"engine{n}", free_port()
        home.mkdir()
        lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in nats_section.items())
        (home / "fraiseql.toml").write_text(
            f'[observers]\nbackend = "nats"\nhttp_port = {port}\n\n[observers.nats]\n{lines}\n'
            "[observers.nats.jetstream]\nreplicas = 3\nack_wait_secs = 5\n"
        )
        (home / "schema.py").write_text(ENGINE_SCHEMA.format(out=str(tmp_path / f"seen{n}.txt")))
        engines.append((home, port))

    def spawn(home: Path) -> subprocess.Popen[bytes]:
        with (home / "engine.log").open("ab") as log:
            return subprocess.Popen([sys.executable, "-m", "fraiseql.cli", "run"], cwd=home, stderr=log)

    def handled() -> list[tuple[int, str, int]]:
        rows = []
        for path in tmp_path.glob("seen*.txt"):
            for line in path.read_text().splitlines():
                key, v, at = line.split()
                rows.append((int(at), key, int(v)))
        return sorted(rows)

    procs = [spawn(home) for home, _ in engines]
    try:
        wait_until(lambda: sorted(p for _, port in engines for p in _owned(port)) == list(range(8)), 60)
        publisher = fraiseql.Publisher({"observers": {"backend": "nats", "nats": nats_section}})
        for v in range(1, 31):
            for k in range(200):
                publisher.publish("Item", "UPDATE", new={"id": f"k{k}", "v": v}, id=f"u{k}-{v}")
            if v == 10:
                procs[0].kill()
                procs[0].wait()
                procs[0] = spawn(engines[0][0])
        wait_until(lambda: len({(key, v) for _, key, v in handled()}) == 6_000, timeout=120)
        newest: dict[str, int] = {}
        first: set[tuple[str, int]] = set()
        late = []
        for _, key, v in handled():
            if (key, v) not in first:
                first.add((key, v))
                if v < newest.get(key, 0):
                    late.append((key, v, newest[key]))
                newest[key] = max(v, newest.get(key, 0))
        assert late == [], "a version reached a handler after a newer one of its key"
        assert first == {(f"k{k}", v) for k in range(200) for v in range(1, 31)}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        asyncio.run(_delete_stream(live_urls(cluster), f"fq_{suffix}"))
        asyncio.run(_delete_stream(live_urls(cluster), f"KV_fraiseql_partitions_fq_{suffix}_worker_{suffix}"))
