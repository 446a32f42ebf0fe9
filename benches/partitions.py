"""Per-key order across instances on a JetStream cluster, under faults, with a checker.

    .venv/bin/python benches/partitions.py [--updates 1000000] [--keys 10000]
        [--partitions 16] [--instances 3]

Starts a 3-server JetStream cluster with the test harness (`fraiseql.testing.services`) and
`--instances` `fraiseql run` processes on it (`replicas = 3`, `[observers.nats] partitions`,
all three server URLs), each with a Python handler on the entity's UPDATEs that appends
`key version time pid` to a file of its own. Then publishes `--updates` updates of random
keys (`fraiseql.Publisher`, `publish_async`, up to 1,000 in flight, never two of one key at
once, so the stream holds each key's versions in order). A third of the way through it
SIGKILLs the stream's leader, half way it SIGKILLs one instance and starts it again, and
two thirds of the way it starts the killed server again.

The checker merges the instances' files by time: a version first handled after a newer one
of its key is an order violation; a version never handled is lost. It prints both (the
promise: 0 and 0), the duplicates (redeliveries after the kills), the publish and end-to-end
rates, and how the partitions were spread at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats

import fraiseql
from fraiseql.testing.services import NatsCluster, free_port, start_nats_cluster

SCHEMA = """
import os, time
import fraiseql

@fraiseql.type
class Item:
    id: str
    v: int

_out = open({out!r}, "a", buffering=1)

@fraiseql.subscription(entity_type=Item, operation="update")
def seen(item):
    _out.write(f"{{item.id}} {{item.v}} {{time.time_ns()}} {{os.getpid()}}\\n")
"""


class Instance:
    def __init__(self, root: Path, n: int, config: str) -> None:
        self.dir = root / f"instance{n}"
        self.dir.mkdir()
        self.port = free_port()
        self.out = self.dir / "seen.txt"
        (self.dir / "fraiseql.toml").write_text(config.replace("HTTP_PORT", str(self.port)))
        (self.dir / "schema.py").write_text(SCHEMA.format(out=str(self.out)))
        self.proc = self.spawn()

    def spawn(self) -> subprocess.Popen[bytes]:
        run = [sys.executable, "-m", "fraiseql.cli", "run"]
        with (self.dir / "engine.log").open("ab") as log:
            return subprocess.Popen(run, cwd=self.dir, stderr=log)

    def kill_and_restart(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc = self.spawn()

    def owned(self) -> list[int]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return list(json.loads(r.read())["observers"]["partitions"]["owned"])
        except Exception:
            return []

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def config(cluster: NatsCluster, partitions: int) -> str:
    return (
        '[observers]\nbackend = "nats"\nhttp_port = HTTP_PORT\nmax_concurrency = 64\n\n'
        f'[observers.nats]\nurl = "{cluster.url}"\nstream_name = "bench_partitions"\n'
        'subject_prefix = "bench.partitions"\nconsumer_name = "bench_worker"\n'
        f"partitions = {partitions}\n\n"
        "[observers.nats.jetstream]\nreplicas = 3\nack_wait_secs = 5\n"
    )


def nats_section(cluster: NatsCluster, partitions: int) -> dict[str, Any]:
    return {
        "url": cluster.url,
        "stream_name": "bench_partitions",
        "subject_prefix": "bench.partitions",
        "consumer_name": "bench_worker",
        "partitions": partitions,
        "jetstream": {"replicas": 3},
    }


async def stream_leader(cluster: NatsCluster) -> str:
    for node in cluster.nodes:
        if node.process.poll() is not None:
            continue
        nc = await nats.connect(node.url)
        try:
            info = await nc.jetstream().stream_info("bench_partitions")
            return str(info.cluster.leader)  # type: ignore[union-attr]
        finally:
            await nc.close()
    raise RuntimeError("no server answers")


def updates_in_order(updates: int, keys: int) -> list[tuple[int, int]]:
    """`(key, version)` of each update, versions 1, 2, … per key, keys at random."""
    rng = random.Random(7)
    versions = [0] * keys
    out = []
    for _ in range(updates):
        k = rng.randrange(keys)
        versions[k] += 1
        out.append((k, versions[k]))
    return out


async def publish_all(
    publisher: fraiseql.Publisher, updates: list[tuple[int, int]], faults: dict[int, Any]
) -> None:
    """Publishes with up to 1,000 in flight, never two of one key at once (a key's next
    version waits for its previous one's PubAck); runs `faults[i]` once `i` were sent."""
    in_flight: dict[int, asyncio.Task[Any]] = {}
    pending: set[asyncio.Task[Any]] = set()
    for i, (k, v) in enumerate(updates):
        if i in faults:
            await asyncio.to_thread(faults[i])
        if k in in_flight:
            await in_flight[k]
        while len(pending) >= 1000:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.ensure_future(publish_one(publisher, k, v, i))
        in_flight[k] = task
        pending.add(task)
    await asyncio.gather(*pending)


async def publish_one(publisher: fraiseql.Publisher, k: int, v: int, i: int) -> None:
    """One update, tried again for up to a minute (the same id: stored once) while the
    cluster elects a new leader, as an application publishing through a failover would."""
    give_up = time.monotonic() + 60
    while True:
        try:
            await publisher.publish_async("Item", "UPDATE", new={"id": f"k{k}", "v": v}, id=f"u{i}")
            return
        except fraiseql.PublishError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.5)


def read_seen(instances: list[Instance]) -> list[tuple[int, str, int]]:
    """Every handled update as `(time, key, version)`, all instances merged by time."""
    seen = []
    for inst in instances:
        if not inst.out.exists():
            continue
        for line in inst.out.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                seen.append((int(parts[2]), parts[0], int(parts[1])))
    seen.sort()
    return seen


def check(seen: list[tuple[int, str, int]], updates: list[tuple[int, int]]) -> dict[str, int]:
    newest: dict[str, int] = {}
    first: set[tuple[str, int]] = set()
    violations = 0
    for _, key, v in seen:
        if (key, v) in first:
            continue
        first.add((key, v))
        if v < newest.get(key, 0):
            violations += 1
        newest[key] = max(v, newest.get(key, 0))
    want = {(f"k{k}", v) for k, v in updates}
    return {
        "handled": len(seen),
        "distinct": len(first),
        "duplicates": len(seen) - len(first),
        "lost": len(want - first),
        "violations": violations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()

    cluster = start_nats_cluster(3)
    root = Path(tempfile.mkdtemp(prefix="fraiseql-bench-partitions-"))
    instances: list[Instance] = []
    try:
        print(f"3-server cluster {cluster.url}; {args.instances} instances, partitions = {args.partitions}")
        instances = [Instance(root, n, config(cluster, args.partitions)) for n in range(args.instances)]
        deadline = time.monotonic() + 60
        fair = (args.partitions // args.instances, -(-args.partitions // args.instances))

        def balanced() -> bool:
            owned = [inst.owned() for inst in instances]
            every = sorted(p for o in owned for p in o) == list(range(args.partitions))
            return every and all(fair[0] <= len(o) <= fair[1] for o in owned)

        while not balanced():
            if time.monotonic() > deadline:
                raise SystemExit("the instances did not take every partition in 60 s")
            time.sleep(0.2)
        print("partitions at start:", [inst.owned() for inst in instances])

        updates = updates_in_order(args.updates, args.keys)
        killed: list[int] = []
        log: list[str] = []

        def kill_leader() -> None:
            leader = asyncio.run(stream_leader(cluster))
            i = cluster.index(leader)
            cluster.kill(i)
            killed.append(i)
            log.append(f"{time.monotonic() - start:.1f} s: SIGKILLed the stream leader {leader}")

        def kill_instance() -> None:
            instances[0].kill_and_restart()
            log.append(f"{time.monotonic() - start:.1f} s: SIGKILLed instance 0, started it again")

        def restart_server() -> None:
            cluster.restart(killed[0])
            log.append(f"{time.monotonic() - start:.1f} s: started n{killed[0] + 1} again")

        n = args.updates
        faults = {n // 3: kill_leader, n // 2: kill_instance, 2 * n // 3: restart_server}
        section = nats_section(cluster, args.partitions)
        publisher = fraiseql.Publisher({"observers": {"backend": "nats", "nats": section}})
        start = time.monotonic()
        asyncio.run(publish_all(publisher, updates, faults))
        published = time.monotonic() - start
        rate = n / published
        print(f"published {n:,} updates over {args.keys:,} keys in {published:.1f} s ({rate:,.0f}/s)")
        for line in log:
            print(" ", line)
        deadline = time.monotonic() + args.timeout
        distinct = 0
        while time.monotonic() < deadline:
            distinct = len({(k, v) for _, k, v in read_seen(instances)})
            if distinct >= n:
                break
            time.sleep(2)
        done = time.monotonic() - start
        figures = check(read_seen(instances), updates)
        rate = figures["distinct"] / done
        print(f"handled in {done:.1f} s from the first publish ({rate:,.0f} updates/s end to end)")
        print(
            f"checker: distinct {figures['distinct']:,} of {n:,}, lost {figures['lost']}, "
            f"order violations {figures['violations']}, duplicates {figures['duplicates']}"
        )
        print("partitions at the end:", [inst.owned() for inst in instances])
        if figures["lost"] or figures["violations"]:
            raise SystemExit(1)
    finally:
        for inst in instances:
            inst.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
