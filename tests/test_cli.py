"""`fraiseql check` and `fraiseql run` as a user runs them: real subprocesses."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ecommerce"
FRAISEQL = [sys.executable, "-m", "fraiseql.cli"]


def run(*args: str, cwd: Path = ROOT, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FRAISEQL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def test_example_runs_and_fires_its_observers() -> None:
    out = run("run", "--config", "fraiseql-memory.toml", "--events", "events.jsonl", cwd=EXAMPLE)
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.splitlines())
    assert lines == sorted(
        [
            "charge_customer: charged ada@example.com 1250.00 for ord_123",
            "charge_customer: charged bob@example.com 99.99 for ord_124",
            "on_high_value_order: ord_123 total=1250.0 (event evt-1)",
            "on_high_value_order: ord_123 total=1250.0 (event evt-1)",
            "on_order_shipped: ord_123 pending -> shipped",
            "on_payment_failed: payment pay_1 of order ord_124 failed",
        ]
    )
    assert "[observers] transport: in_memory" in out.stderr


def test_debug_log_prints_the_observer_lines() -> None:
    env = {**os.environ, "RUST_LOG": "debug"}
    out = run("run", "--config", "fraiseql-memory.toml", "--events", "events.jsonl", cwd=EXAMPLE, env=env)
    assert out.returncode == 0, out.stderr
    assert "[observer] on_high_value_order fired: Order{id=ord_123, total=1250.0}" in out.stderr
    assert "[observer] on_high_value_order completed in" in out.stderr
    assert "[observer] charge_customer skipped duplicate event evt-1" in out.stderr


def test_check_accepts_the_example() -> None:
    out = run(
        "check",
        "--config",
        "fraiseql.toml",
        cwd=EXAMPLE,
        env={**os.environ, "DATABASE_URL": "postgresql://localhost/x"},
    )
    assert out.returncode == 0, out.stderr
    assert "ok:" in out.stdout


def test_check_needs_no_value_it_would_only_connect_with() -> None:
    """As shipped, with no DATABASE_URL: `check` does not connect, so it says what it skipped
    and passes."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = run("check", cwd=EXAMPLE, env=env)
    assert out.returncode == 0, out.stderr
    assert "skipped: database.url: not checked: $DATABASE_URL is not set" in out.stderr
    assert "ok:" in out.stdout


def test_check_applies_the_template_checks_that_run_applies(tmp_path: Path) -> None:
    (tmp_path / "schema.py").write_text(
        "import fraiseql\n@fraiseql.type\nclass Order:\n    id: str\n    total: float\n"
    )
    (tmp_path / "fraiseql.toml").write_text(
        '[observers]\nbackend = "in_memory"\n\n[[observers.handlers]]\nname = "notify"\n'
        'entity = "Order"\nevent = "INSERT"\nactions = [{ type = "webhook", url = "http://x.test/", '
        'body_template = \'{"o": "{{ordr_id}}"}\' }]\n'
    )
    out = run("check", cwd=tmp_path)
    assert out.returncode == 1
    assert "body_template" in out.stderr and "ordr_id" in out.stderr, out.stderr


def test_check_and_run_refuse_a_literal_of_the_wrong_type_for_a_declared_field(tmp_path: Path) -> None:
    """`status > 1000` on a `str` field never matches: an error before anything runs."""
    (tmp_path / "schema.py").write_text(
        "from typing import Optional\nimport fraiseql\nfrom fraiseql.scalars import ID\n"
        "@fraiseql.type\nclass Order:\n    id: ID\n    status: str\n    total: Optional[float]\n"
        "    is_vip: bool\n    meta: dict\n"
        "fraiseql.observer(name='big', entity='Order', event='INSERT',\n"
        "    condition=\"meta == 1 && id != 'x' && status > 1000\", handler=print)\n"
    )
    (tmp_path / "fraiseql.toml").write_text('[observers]\nbackend = "in_memory"\nhttp_port = 0\n')
    for command in (["check"], ["run", "--events", "/dev/null"]):
        out = run(*command, cwd=tmp_path)
        assert out.returncode == 1, (command, out.stderr)
        assert (
            "`status` is declared as text but is compared with the number 1000 at line 1, column "
            "36: a text value never equals or orders with a number (write '1000' to compare text)"
        ) in out.stderr, (command, out.stderr)
    (tmp_path / "schema.py").write_text(
        (tmp_path / "schema.py").read_text().replace("status > 1000", "total > 1000 && is_vip == true")
    )
    out = run("check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_run_says_when_it_is_ready_and_when_it_stopped(tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text('[observers]\nbackend = "in_memory"\nhttp_port = 0\n')
    with subprocess.Popen([*FRAISEQL, "run"], cwd=tmp_path, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = read_stderr_until(proc, "ready: ")
        assert re.search(
            r"ready: 0 observers, health on http://127\.0\.0\.1:\d+/health, console on http://127\.0\.0\.1:\d+/",
            line,
        ), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "[observers] stopped" in proc.stderr.read()


def test_events_end_with_a_summary() -> None:
    out = run("run", "--config", "fraiseql-memory.toml", "--events", "events.jsonl", cwd=EXAMPLE)
    assert out.returncode == 0, out.stderr
    assert "[observers] done: 6 events processed, 0 rejected, 0 in the dead-letter queue" in out.stderr


def test_an_unreachable_database_is_reported_at_once_with_its_address(tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text(
        '[database]\nurl = "postgresql://app@127.0.0.1:1/shop"\n[observers]\nhttp_port = 0\n'
    )
    out = run("run", cwd=tmp_path)
    assert out.returncode == 1
    assert "cannot connect to PostgreSQL at postgresql://***@127.0.0.1:1/" in out.stderr, out.stderr
    assert "refused" in out.stderr.lower(), out.stderr


def test_check_lists_every_error_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text(
        "[observers]\n"
        'backend = "nats"\n'
        "max_dlq_sise = 10\n"
        "run_bridge = true\n"
        "\n"
        "[[observers.handlers]]\n"
        'name = "h"\n'
        'entity = "Order"\n'
        'event = "UPSERT"\n'
        'actions = [{ type = "webhook", url_env = "HOOK" }]\n'
    )
    (tmp_path / "schema.py").write_text(
        "import fraiseql\n"
        "@fraiseql.type\n"
        "class Order:\n"
        "    id: str\n"
        "    total: float\n"
        "@fraiseql.subscription(entity_type=Order, operation='create', condition='totl > 5')\n"
        "def big(o): pass\n"
    )
    out = run("check", cwd=tmp_path)
    assert out.returncode == 1
    err = out.stderr
    assert "fraiseql.toml:3: observers.max_dlq_sise: unknown key (did you mean max_dlq_size?)" in err
    assert "NATS transport requires nats.url to be set" in err
    assert "run_bridge=true requires transport=nats" not in err  # backend is nats: that one holds
    assert "fraiseql.toml:9: observers.handlers[0].event" in err
    assert "schema.py:6: observer `big`: condition unknown field `totl`" in err
    assert "did you mean `total`?" in err
    problems = [line for line in err.splitlines() if re.match(r"\S+\.(toml|py):\d+: ", line)]
    assert len(problems) == 4
    assert err.rstrip().endswith("\n4 errors"), err  # the footer counts each one


def test_check_reports_the_bridge_rule_and_toml_syntax(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[observers]\nbackend = "postgres"\nrun_bridge = true\n')
    out = run("check", "--config", str(cfg))
    assert out.returncode == 1
    assert "run_bridge=true requires transport=nats" in out.stderr
    cfg.write_text("[observers\nbackend = 1\n")
    out = run("check", "--config", str(cfg))
    assert out.returncode == 1
    assert f"{cfg}:1:" in out.stderr


def read_stderr_until(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> str:
    """Reads `proc`'s stderr up to the line holding `needle` (or the timeout); that line."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    line = ""
    for line in proc.stderr:
        if needle in line or time.monotonic() > deadline:
            break
    return line


def test_run_stops_cleanly_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text('[observers]\nbackend = "in_memory"\nhttp_port = 0\n')
    with subprocess.Popen([*FRAISEQL, "run"], cwd=tmp_path, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        read_stderr_until(proc, "ready: ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "draining in-flight events" in proc.stderr.read()


def test_sigterm_while_start_up_waits_for_an_unreachable_server_exits_0(tmp_path: Path) -> None:
    """Start-up retries an unreachable NATS forever; SIGTERM must still end it."""
    (tmp_path / "fraiseql.toml").write_text(
        '[observers]\nbackend = "nats"\nhttp_port = 0\n[observers.nats]\nurl = "nats://127.0.0.1:1"\n'
    )
    with subprocess.Popen([*FRAISEQL, "run"], cwd=tmp_path, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        line = read_stderr_until(proc, "cannot connect to NATS")
        assert "retrying" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "stopped during start-up" in proc.stderr.read()


def test_run_on_postgres_without_a_database_says_what_to_set(tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text('[observers]\nbackend = "postgres"\n')
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = run("run", cwd=tmp_path, env=env)
    assert out.returncode == 1
    assert "set [database] url in fraiseql.toml or DATABASE_URL" in out.stderr
