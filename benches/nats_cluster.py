"""What `replicas = 3` costs the publisher against `replicas = 1`, on one JetStream cluster.

    .venv/bin/python benches/nats_cluster.py [rounds]

Starts a 3-server cluster with the test harness (`fraiseql.testing.services`), then runs the
NATS benchmark's publish phases (`cargo bench -p fraiseql_observers --bench nats`, groups
`raw` and `publish`) against its first server, alternating `FRAISEQL_BENCH_REPLICAS=1` and `3`
for `rounds` rounds (default 2), and prints each round's lines. `FRAISEQL_BENCH_MESSAGES`
(default here 20,000) sets the messages per phase.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fraiseql.testing.services import start_nats_cluster

ROOT = Path(__file__).resolve().parent.parent


def run_bench(url: str, replicas: int) -> str:
    env = {
        **os.environ,
        "FRAISEQL_TEST_NATS_URL": url,
        "FRAISEQL_BENCH_REPLICAS": str(replicas),
        "FRAISEQL_BENCH_ONLY": "raw,publish",
        "FRAISEQL_BENCH_MESSAGES": os.environ.get("FRAISEQL_BENCH_MESSAGES", "20000"),
    }
    done = subprocess.run(
        ["cargo", "bench", "-q", "-p", "fraiseql_observers", "--bench", "nats"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the NATS benchmark failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    cluster = start_nats_cluster(3)
    try:
        print(f"3-server JetStream cluster on loopback, publishing to {cluster.nodes[0].url}")
        for round_ in range(1, rounds + 1):
            for replicas in (1, 3):
                print(f"\n## round {round_}, replicas = {replicas}")
                print(run_bench(cluster.nodes[0].url, replicas), end="", flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
