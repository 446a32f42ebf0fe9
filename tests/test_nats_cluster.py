"""The NATS backend on a real JetStream cluster: three nats-servers with routes on loopback,
started by the harness, the stream kept in three copies (`replicas = 3`) and the engine given
every server's URL."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import nats
import psycopg
import pytest

import fraiseql
from fraiseql.testing.services import NatsCluster, scratch_database, start_nats_cluster


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
