"""`[observers.nats] partitions = N`: per-key order across the instances sharing a stream.

Each `fraiseql run` here is a real process on the harness's NATS server; the partition leases
live in a JetStream key-value bucket. The fault matrix (`tests/test_faults.py`) has the cell
where three such instances are SIGKILLed in turn under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
from nats.js.errors import NotFoundError

import fraiseql
from fraiseql.testing import services

SCHEMA = """
import os
import fraiseql

@fraiseql.type
class Order:
    id: str
    v: int

def record(o):
    with open({seen!r}, "a") as f:
        f.write(f"{{o.id}} {{o.v}} {{os.getpid()}}\\n")

@fraiseql.subscription(entity_type=Order, operation="create")
def created(o):
    record(o)

@fraiseql.subscription(entity_type=Order, operation="update")
def updated(o):
    record(o)
"""


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


class Instances:
    """`fraiseql run` processes on one stream, each in a directory of its own (its own status
    port and partition count), recording what its handler saw in one shared file."""

    def __init__(self, tmp_path: Path, nats_url: str) -> None:
        self.dir, self.url = tmp_path, nats_url
        self.suffix = uuid.uuid4().hex[:8]
        self.seen = tmp_path / "seen.txt"
        self.procs: list[subprocess.Popen[bytes]] = []

    def nats_section(self, partitions: int) -> dict[str, Any]:
        return {
            "url": self.url,
            "stream_name": f"fq_{self.suffix}",
            "subject_prefix": f"fq{self.suffix}.mutation",
            "consumer_name": f"worker_{self.suffix}",
            "partitions": partitions,
            "jetstream": {"ack_wait_secs": 5},
        }

    def start(self, partitions: int) -> tuple[subprocess.Popen[bytes], int]:
        n, port = len(self.procs), services.free_port()
        home = self.dir / f"instance{n}"
        home.mkdir()
        nats_lines = "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in self.nats_section(partitions).items() if k != "jetstream"
        )
        (home / "fraiseql.toml").write_text(
            f'[observers]\nbackend = "nats"\nhttp_port = {port}\nmax_concurrency = 8\n\n'
            f"[observers.nats]\n{nats_lines}\n[observers.nats.jetstream]\nack_wait_secs = 5\n"
        )
        (home / "schema.py").write_text(SCHEMA.format(seen=str(self.seen)))
        run = [sys.executable, "-m", "fraiseql.cli", "run"]
        with (home / "engine.log").open("w") as log:
            proc = subprocess.Popen(run, cwd=home, stderr=log)
        self.procs.append(proc)
        return proc, port

    def refused(self, partitions: int) -> str:
        """Start one more with `partitions`; it must exit at start. Returns its log."""
        proc, _ = self.start(partitions)
        assert proc.wait(60) != 0, "it started"
        return (self.dir / f"instance{len(self.procs) - 1}" / "engine.log").read_text()

    def publisher(self, partitions: int) -> fraiseql.Publisher:
        return fraiseql.Publisher({"observers": {"backend": "nats", "nats": self.nats_section(partitions)}})

    def lines(self) -> list[tuple[str, int, str]]:
        text = self.seen.read_text() if self.seen.exists() else ""
        return [(i, int(v), pid) for i, v, pid in (line.split() for line in text.splitlines())]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def delete(self) -> None:
        async def delete() -> None:
            nc = await nats.connect(self.url)
            try:
                js = nc.jetstream()
                leases = f"KV_fraiseql_partitions_fq_{self.suffix}_worker_{self.suffix}"
                for name in (f"fq_{self.suffix}", leases):
                    with contextlib.suppress(NotFoundError):
                        await js.delete_stream(name)
            finally:
                await nc.close()

        asyncio.run(delete())


@contextlib.contextmanager
def instances(tmp_path: Path, nats_url: str) -> Iterator[Instances]:
    group = Instances(tmp_path, nats_url)
    try:
        yield group
    finally:
        group.stop()
        group.delete()


def owned(port: int) -> list[int] | None:
    """The partitions the instance on `port` owns, per its `/health` (None until it answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
    except OSError:
        return None
    return list(body["observers"]["partitions"]["owned"])


async def subjects(url: str, stream: str) -> set[str]:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream, subjects_filter=">")
        return set((info.state.subjects or {}).keys())
    finally:
        await nc.close()


def in_order_per_row(lines: list[tuple[str, int, str]]) -> list[tuple[str, int, int]]:
    """`(row, version, after)` for each version first seen after a newer one of its row."""
    newest: dict[str, int] = {}
    first: set[tuple[str, int]] = set()
    late = []
    for row, v, _ in lines:
        if (row, v) in first:
            continue
        first.add((row, v))
        if v < newest.get(row, -1):
            late.append((row, v, newest[row]))
        newest[row] = max(v, newest.get(row, -1))
    return late


def test_two_instances_split_the_partitions_and_one_takes_all_when_the_other_stops(
    tmp_path: Path, fraiseql_nats_url: str
) -> None:
    """`partitions = 4`: each change goes to `{subject}.{partition}`; two instances own two
    partitions each, none twice; both do work and each row's versions arrive in order. When
    one stops (SIGTERM) it hands its partitions over and the other owns all four and gets
    what is published next."""
    with instances(tmp_path, fraiseql_nats_url) as group:
        _, port_a = group.start(partitions=4)
        wait_until(lambda: owned(port_a) == [0, 1, 2, 3])
        b, port_b = group.start(partitions=4)

        def split() -> bool:
            a_owns, b_owns = owned(port_a) or [], owned(port_b) or []
            return len(a_owns) == len(b_owns) == 2 and sorted(a_owns + b_owns) == [0, 1, 2, 3]

        wait_until(split)
        publisher = group.publisher(partitions=4)
        for v in range(10):
            for row in range(20):
                kind = "INSERT" if v == 0 else "UPDATE"
                publisher.publish("Order", kind, new={"id": f"o{row}", "v": v}, id=f"e{row}-{v}")
        wait_until(lambda: len({(r, v) for r, v, _ in group.lines()}) == 200)
        prefix = f"fq{group.suffix}.mutation"
        assert asyncio.run(subjects(fraiseql_nats_url, f"fq_{group.suffix}")) == {
            f"{prefix}.order.{kind}.{p}" for kind in ("insert", "update") for p in range(4)
        }
        assert in_order_per_row(group.lines()) == []
        assert len({pid for _, _, pid in group.lines()}) == 2, "both instances did work"

        b.terminate()
        assert b.wait(30) == 0
        wait_until(lambda: owned(port_a) == [0, 1, 2, 3], timeout=10)
        for row in range(20):
            publisher.publish("Order", "UPDATE", new={"id": f"o{row}", "v": 10}, id=f"e{row}-10")
        wait_until(lambda: len({(r, v) for r, v, _ in group.lines()}) == 220)
        assert in_order_per_row(group.lines()) == []


def test_an_instance_that_partitions_the_stream_otherwise_is_refused_with_the_reason(
    tmp_path: Path, fraiseql_nats_url: str
) -> None:
    """Beside a live instance with `partitions = 4`, one with 2 and one with none exit at
    start and say why. With every instance stopped and messages left in the 4 partitions, a
    start with 2 is refused too: those messages would never be read."""
    with instances(tmp_path, fraiseql_nats_url) as group:
        first, port = group.start(partitions=4)
        wait_until(lambda: owned(port) == [0, 1, 2, 3])
        for partitions in (2, 0):
            err = group.refused(partitions)
            assert f"observers.nats.partitions is {partitions}, but instance" in err, err
            assert "with partitions = 4; every instance must use the same number" in err, err
        first.terminate()
        assert first.wait(30) == 0
        publisher = group.publisher(partitions=4)
        for row in range(5):
            publisher.publish("Order", "INSERT", new={"id": f"o{row}", "v": 0}, id=f"e{row}")
        err = group.refused(partitions=2)
        assert f"consumer `worker_{group.suffix}_p" in err and "_of_4` of stream" in err, err
        assert "messages to process: run with its setting until it has none" in err, err
