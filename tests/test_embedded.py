"""`fraiseql run --embedded`: the example on a PostgreSQL of its own, as the README shows it.

Real subprocesses throughout: the engine, the embedded server it starts, and psql.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fraiseql import _embedded

ROOT = Path(__file__).resolve().parent.parent
FRAISEQL = [sys.executable, "-m", "fraiseql.cli"]


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A copy of the e-commerce example, with its embedded cluster removed afterwards."""
    project = tmp_path / "ecommerce"
    shutil.copytree(ROOT / "examples" / "ecommerce", project, ignore=shutil.ignore_patterns(".fraiseql"))
    yield project
    home = _embedded.home_for(project)
    pid = home / "data" / "postmaster.pid"
    if pid.exists():  # a failed test may leave the server up: stop it before deleting it
        subprocess.run(["kill", "-INT", pid.read_text().split()[0]], check=False)
        time.sleep(1)
    shutil.rmtree(home, ignore_errors=True)


class Lines:
    """Collects a stream's lines on a thread, so the test can wait for one."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: object) -> None:
        with stream:  # type: ignore[attr-defined]
            for line in stream:  # type: ignore[attr-defined]
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()

    def join(self) -> None:
        """After the process exited: the rest of the output, and the stream closed."""
        self._thread.join(10)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(self.lines))
                self._cond.wait(left)


def psql(project: Path, sql: str) -> None:
    out = subprocess.run(
        [*FRAISEQL, "db", "psql", "--embedded", "-v", "ON_ERROR_STOP=1", "-c", sql],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def start_engine(
    project: Path, ready: str = "[observers] transport: postgres"
) -> tuple[subprocess.Popen[str], Lines, Lines]:
    proc = subprocess.Popen(
        [*FRAISEQL, "run", "--embedded", "--http-port", "0"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    err.wait_for(ready)
    return proc, out, err


def stop_engine(proc: subprocess.Popen[str], *streams: Lines) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    for stream in streams:
        stream.join()


def test_embedded_example_fires_observers_for_plain_sql_and_keeps_changes_across_restarts(
    project: Path,
) -> None:
    proc, out, err = start_engine(project)
    try:
        err.wait_for("[embedded] running")  # initdb/01_tables.sql on the first start
        psql(
            project,
            "INSERT INTO tb_order (id, customer_email, total) VALUES ('ord_1', 'ada@example.com', 1250)",
        )
        assert (
            out.wait_for("charge_customer:") == "charge_customer: charged ada@example.com 1250.00 for ord_1"
        )
        assert out.wait_for("on_high_value_order:").startswith(
            "on_high_value_order: ord_1 total=1250.0 (event "
        )
        psql(project, "UPDATE tb_order SET status = 'shipped' WHERE id = 'ord_1'")
        assert out.wait_for("on_order_shipped:") == "on_order_shipped: ord_1 pending -> shipped"
    finally:
        stop_engine(proc, out, err)
    assert not (_embedded.home_for(project) / "data" / "postmaster.pid").exists(), "run stops what it started"

    # Written while the engine is down (psql starts the database for the statement):
    # processed on the next start, once.
    psql(project, "INSERT INTO tb_order (id, customer_email, total) VALUES ('ord_2', 'bob@example.com', 20)")
    proc, out, err = start_engine(project)
    try:
        assert out.wait_for("charge_customer:") == "charge_customer: charged bob@example.com 20.00 for ord_2"
        time.sleep(1)
        assert not any("ord_1" in line for line in out.lines), out.lines
    finally:
        stop_engine(proc, out, err)
    assert not any("[embedded] running" in line for line in err.lines), "init scripts run once"


def test_embedded_refuses_a_config_with_its_own_database_url(tmp_path: Path) -> None:
    (tmp_path / "fraiseql.toml").write_text('[database]\nurl = "postgresql://db.example.com/app"\n')
    out = subprocess.run(
        [*FRAISEQL, "run", "--embedded"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "--embedded" in out.stderr and "[database] url" in out.stderr


def test_embedded_starts_nats_too_when_the_config_uses_it(tmp_path: Path) -> None:
    """backend = "nats" with the bridge and no reachable NATS URL: --embedded starts a
    nats-server beside the database, and a SQL insert travels PostgreSQL → bridge →
    JetStream → consumer → handler."""
    project = tmp_path / "natsy"
    (project / "initdb").mkdir(parents=True)
    (project / "initdb" / "01.sql").write_text("CREATE TABLE tb_parcel (id text PRIMARY KEY);\n")
    (project / "fraiseql.toml").write_text(
        '[database]\nurl = "${DATABASE_URL}"\n\n[observers]\nbackend = "nats"\nrun_bridge = true\n'
        "http_port = 0\n\n[observers.nats]\n"
        f'stream_name = "emb_{tmp_path.name[-8:]}"\nsubject_prefix = "emb{tmp_path.name[-8:]}.mutation"\n'
    )
    (project / "schema.py").write_text(
        "import sys\nimport fraiseql\n@fraiseql.type\nclass Parcel:\n    id: str\n"
        "@fraiseql.subscription(entity_type=Parcel, operation='create')\n"
        "def sent(p):\n    sys.stdout.write(f'sent {p.id}\\n')\n    sys.stdout.flush()\n"
    )
    try:
        proc, out, err = start_engine(project, ready="[observers] transport: nats")
        try:
            err.wait_for("[embedded] nats-server")
            psql(project, "INSERT INTO tb_parcel VALUES ('p1')")
            assert out.wait_for("sent ") == "sent p1"
        finally:
            stop_engine(proc, out, err)
    finally:
        shutil.rmtree(_embedded.nats_home_for(project), ignore_errors=True)
        shutil.rmtree(_embedded.home_for(project), ignore_errors=True)


def test_embedded_reads_the_backend_from_the_runtime_file_and_a_named_url_variable(
    tmp_path: Path,
) -> None:
    """`[transport] backend = "nats"` in fraiseql-observer.toml alone makes --embedded start
    a nats-server (the CLI asks the native loader, which merges both files), and
    `url = "${APP_DB}"` gets the embedded database in APP_DB."""
    project = tmp_path / "runtimefile"
    project.mkdir()
    (project / "fraiseql.toml").write_text('[database]\nurl = "${APP_DB}"\n\n[observers]\nhttp_port = 0\n')
    (project / "fraiseql-observer.toml").write_text(
        '[transport]\nbackend = "nats"\n\n[transport.nats]\n'
        f'stream_name = "rt_{tmp_path.name[-8:]}"\nsubject_prefix = "rt{tmp_path.name[-8:]}.mutation"\n'
    )
    try:
        proc, out, err = start_engine(project, ready="[observers] transport: nats")
        try:
            assert any("[embedded] nats-server" in line for line in err.lines)
        finally:
            stop_engine(proc, out, err)
    finally:
        shutil.rmtree(_embedded.nats_home_for(project), ignore_errors=True)
        shutil.rmtree(_embedded.home_for(project), ignore_errors=True)


def test_the_dead_letter_commands_take_embedded_and_the_port_stays_the_same(project: Path) -> None:
    """`dlq list --embedded` starts the project's database for the command (its first start
    runs the init scripts), and the next start listens on the same port."""
    out = subprocess.run(
        [*FRAISEQL, "dlq", "list", "--embedded"], cwd=project, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert "0 entries" in out.stderr
    first = re.search(r"PostgreSQL postgresql://postgres@127\.0\.0\.1:(\d+)/", out.stderr)
    assert first, out.stderr
    again = subprocess.run(
        [*FRAISEQL, "dlq", "list", "--embedded"], cwd=project, capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 0, again.stderr
    second = re.search(r"PostgreSQL postgresql://postgres@127\.0\.0\.1:(\d+)/", again.stderr)
    assert second and second.group(1) == first.group(1), again.stderr
