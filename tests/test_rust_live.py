"""Runs the Rust crate's live-service tests against the services this harness provides, so
they get the same PostgreSQL (found on the standard port, from the environment, or started
here) as the Python tests — on a machine with none installed too."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1800)
def test_rust_postgres_source_against_the_harness_database(fraiseql_database_url: str) -> None:
    env = {**os.environ, "FRAISEQL_TEST_DATABASE_URL": fraiseql_database_url}
    out = subprocess.run(
        [
            "cargo",
            "test",
            "--quiet",
            "-p",
            "fraiseql_observers",
            "--test",
            "postgres",
            "--test",
            "postgres_dlq",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "test result: ok. 13 passed" in out.stdout, out.stdout[-2000:]  # the source
    assert "test result: ok. 10 passed" in out.stdout, out.stdout[-2000:]  # the dead-letter queue


@pytest.mark.timeout(1800)
def test_rust_nats_transport_against_the_harness_server(fraiseql_nats_url: str) -> None:
    env = {**os.environ, "FRAISEQL_TEST_NATS_URL": fraiseql_nats_url}
    out = subprocess.run(
        ["cargo", "test", "--quiet", "-p", "fraiseql_observers", "--test", "nats"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "test result: ok. 14 passed" in out.stdout, out.stdout[-2000:]
