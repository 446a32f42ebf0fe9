//! `fraiseql._native.Engine`: the engine behind `fraiseql.Engine` and `fraiseql run`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use fraiseql_observers::action;
use fraiseql_observers::config::{self, ActionConfig, HandlerConfig};
use fraiseql_observers::runtime::{
    self as core_runtime, DeadLetters, Instruments, Running, StartOptions,
};
use fraiseql_observers::schema::default_table;
use fraiseql_observers::{
    Action, Config, DeadLetterQueue, DlqEntry, EntityDef, Error, Event, EventKind, MemoryDlq,
    MemoryTransport, ObserverSpec, Schema,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3_async_runtimes::TaskLocals;

use crate::convert::{row_from_py, to_json, to_py};
use crate::errors::PyFraiseError;
use crate::handler::{LoopSlot, PythonHandler};
use crate::runtime::runtime;

pub(crate) type Source = Option<(String, String)>;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A config given as a Python dict: serialised to TOML so it goes through the same parser
/// and validation as a file.
pub(crate) fn dict_source(dict: Option<&Bound<'_, PyDict>>) -> PyResult<Source> {
    let Some(dict) = dict else { return Ok(None) };
    let value = to_json(dict.as_any())?;
    let text = toml::to_string(&value).map_err(|e| {
        PyValueError::new_err(format!("config dict cannot be expressed as TOML: {e}"))
    })?;
    Ok(Some(("<config dict>".to_owned(), text)))
}

/// An observer declared in Python (`@fraiseql.subscription` / `fraiseql.observer`).
struct PyObserver {
    handler: HandlerConfig,
    /// The Python function of a subscription (None for observers made of built-in actions).
    function: Option<(Py<PyAny>, bool)>,
}

fn parse_py_observer(
    obj: &Bound<'_, PyAny>,
    errors: &mut Vec<Error>,
) -> PyResult<Option<PyObserver>> {
    let d = obj.cast::<PyDict>()?;
    let get = |k: &str| d.get_item(k);
    let origin: String = get("origin")?
        .map(|o| o.extract())
        .transpose()?
        .unwrap_or_default();
    let function = match get("function")? {
        Some(f) if !f.is_none() => {
            let is_async = get("is_async")?
                .map(|v| v.extract())
                .transpose()?
                .unwrap_or(false);
            Some((f.unbind(), is_async))
        }
        _ => None,
    };
    // The values it was declared with, as the config module reads a handler table.
    let decl = PyDict::new(d.py());
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        if !matches!(key.as_str(), "origin" | "function" | "is_async" | "topic") && !v.is_none() {
            decl.set_item(key, v)?;
        }
    }
    let value = to_json(decl.as_any())?;
    match config::parse_declared_handler(&value, &origin, &env, function.is_some()) {
        Ok(handler) => Ok(Some(PyObserver { handler, function })),
        Err(e) => {
            errors.push(Error::Config(e));
            Ok(None)
        }
    }
}

pub(crate) fn entity_defs(entities: &Bound<'_, PyList>) -> PyResult<Vec<EntityDef>> {
    entities
        .iter()
        .map(|e| {
            let (name, table, fields, kinds): (String, String, Vec<String>, Vec<(String, String)>) =
                e.extract()?;
            let kinds = kinds
                .into_iter()
                .map(|(field, kind)| Ok((field, kind.parse().map_err(PyValueError::new_err)?)))
                .collect::<PyResult<_>>()?;
            Ok(EntityDef {
                name,
                table,
                fields,
                kinds,
            })
        })
        .collect()
}

/// Everything validated and compiled, ready to start.
struct Prepared {
    config: Config,
    schema: Schema,
    specs: Vec<ObserverSpec>,
}

/// Validates config, schema, observers and conditions. Collects every error it can.
fn prepare(
    main: Source,
    runtime_file: Source,
    entities: Vec<EntityDef>,
    observers: &Bound<'_, PyList>,
    event_loop: &LoopSlot,
    build_actions: bool,
) -> PyResult<Result<Prepared, Vec<Error>>> {
    prepare_with(
        main,
        runtime_file,
        entities,
        observers,
        event_loop,
        build_actions,
        &env,
    )
}

/// [`prepare`] with the environment given.
fn prepare_with(
    main: Source,
    runtime_file: Source,
    entities: Vec<EntityDef>,
    observers: &Bound<'_, PyList>,
    event_loop: &LoopSlot,
    build_actions: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> PyResult<Result<Prepared, Vec<Error>>> {
    let mut errors = Vec::new();
    let config = match Config::from_sources(
        main.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        runtime_file.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        env,
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(Error::Config(e));
            None
        }
    };
    let schema = match Schema::new(entities) {
        Ok(s) => s,
        Err(e) => {
            errors.push(e);
            Schema::default()
        }
    };
    let mut declared = Vec::new();
    for obj in observers.iter() {
        if let Some(o) = parse_py_observer(&obj, &mut errors)? {
            declared.push(o);
        }
    }
    // Observers in fraiseql.toml run after those declared in Python.
    if let Some(c) = &config {
        declared.extend(c.observers.handlers.iter().map(|h| PyObserver {
            handler: h.clone(),
            function: None,
        }));
    }
    let mut specs = Vec::new();
    for o in declared {
        let mut actions: Vec<Arc<dyn Action>> = Vec::new();
        if let Some((function, is_async)) = o.function {
            let timeout = o.handler.timeout_ms.map_or(
                fraiseql_observers::action::DEFAULT_ACTION_TIMEOUT,
                std::time::Duration::from_millis,
            );
            actions.push(Arc::new(PythonHandler::new(
                o.handler.name.clone(),
                function,
                is_async,
                event_loop.clone(),
                timeout,
            )));
        }
        if !build_actions {
            // `check`: the templates, against the declared fields, without the secrets.
            let entity = schema.entity(&o.handler.entity);
            for a in &o.handler.actions {
                if let Err(e) = action::check(&o.handler.name, a, entity) {
                    errors.push(at_origin(&o.handler.origin, e));
                }
            }
        }
        if build_actions {
            // Built here, not in `check`: building reads the secrets named by *_env.
            let entity = schema.entity(&o.handler.entity);
            for a in &o.handler.actions {
                let a = &with_cloudevents_source(a, config.as_ref());
                match action::build(&o.handler.name, a, entity, env) {
                    Ok(action) => actions.push(action),
                    Err(e) => errors.push(at_origin(&o.handler.origin, e)),
                }
            }
        }
        // An observer that does not say how it is ordered follows `[observers] ordering`.
        let mut handler = o.handler.clone();
        if handler.ordering.is_none() {
            handler.ordering = config.as_ref().map(|c| c.observers.ordering);
        }
        match ObserverSpec::from_handler(&schema, &handler, actions) {
            Ok(spec) => specs.push(spec),
            Err(e) => errors.push(at_origin(&o.handler.origin, e)),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for s in &specs {
        if !seen.insert(s.name()) {
            errors.push(Error::Schema(format!(
                "observer name `{}` is declared twice",
                s.name()
            )));
        }
    }
    Ok(match (config, errors.is_empty()) {
        (Some(config), true) => Ok(Prepared {
            config,
            schema,
            specs,
        }),
        _ => Err(errors),
    })
}

/// A webhook without a `source` of its own gets the config's (`[observers.cloudevents]
/// source`, else derived from the database).
fn with_cloudevents_source(action: &ActionConfig, config: Option<&Config>) -> ActionConfig {
    let mut action = action.clone();
    if let (ActionConfig::Webhook(webhook), Some(config)) = (&mut action, config) {
        if webhook.source.is_none() {
            webhook.source = Some(config.cloudevents_source());
        }
    }
    action
}

/// Prefixes an error with where the observer was declared (`schema.py:12`).
fn at_origin(origin: &str, e: Error) -> Error {
    match e {
        Error::Schema(m) if !origin.is_empty() => Error::Schema(format!("{origin}: {m}")),
        Error::Action(m) if !origin.is_empty() => Error::Action(format!("{origin}: {m}")),
        other => other,
    }
}

/// Several problems raise one exception: the class of the first, the text of all.
fn raise_all(errors: Vec<Error>) -> PyErr {
    let text = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let first = errors.into_iter().next().expect("at least one error");
    if text.contains('\n') {
        let err: PyErr = PyFraiseError(first).into();
        Python::attach(|py| PyErr::from_type(err.get_type(py), text))
    } else {
        PyFraiseError(first).into()
    }
}

/// The keys `check` needs no value for (it does not connect), with a stand-in for a variable
/// they name that is not set.
const CONNECTION_KEYS: [(&str, &str); 5] = [
    ("database.url", "postgresql://unset.invalid/unset"),
    ("observers.nats.url", "nats://unset.invalid:4222"),
    ("observers.nats_url", "nats://unset.invalid:4222"),
    ("transport.nats.url", "nats://unset.invalid:4222"),
    ("observers.redis_url", "redis://unset.invalid:6379"),
];

/// `fraiseql check`: every problem found, without connecting to anything. Returns
/// `{"errors": [...], "skipped": [...]}`: a variable that only a connection needs (the
/// database URL, say) is not an error when unset, only said to be skipped.
#[pyfunction]
#[pyo3(signature = (main=None, runtime_file=None, entities=None, observers=None))]
pub fn check<'py>(
    py: Python<'py>,
    main: Source,
    runtime_file: Source,
    entities: Option<&Bound<'py, PyList>>,
    observers: Option<&Bound<'py, PyList>>,
) -> PyResult<Bound<'py, PyDict>> {
    let entities = entities.map(entity_defs).transpose()?.unwrap_or_default();
    let empty = PyList::empty(py);
    let observers = observers.unwrap_or(&empty);
    let slot: LoopSlot = Arc::new(OnceLock::new());
    let run = |env: &dyn Fn(&str) -> Option<String>| {
        prepare_with(
            main.clone(),
            runtime_file.clone(),
            entities.clone(),
            observers,
            &slot,
            false,
            env,
        )
    };
    let mut errors = problems(run(&env)?);
    // Unset variables of connection keys: stand-ins, and the check again.
    let mut stand_ins: Vec<(String, &str)> = Vec::new();
    let mut skipped = Vec::new();
    errors.retain(|e| {
        let Some((key, value)) = CONNECTION_KEYS.iter().find(|(k, _)| e.key == *k) else {
            return true;
        };
        let Some(var) = e
            .message
            .strip_prefix("environment variable ")
            .and_then(|m| m.split_whitespace().next())
        else {
            return true;
        };
        skipped.push(format!(
            "{key}: not checked: ${var} is not set (check does not connect; run needs it)"
        ));
        stand_ins.push((var.to_owned(), value));
        false
    });
    if !stand_ins.is_empty() {
        let with_stand_ins = |name: &str| {
            env(name).or_else(|| {
                stand_ins
                    .iter()
                    .find(|(var, _)| var == name)
                    .map(|(_, value)| (*value).to_owned())
            })
        };
        errors = problems(run(&with_stand_ins)?);
    }
    let out = PyDict::new(py);
    out.set_item(
        "errors",
        errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
    )?;
    out.set_item("skipped", skipped)?;
    Ok(out)
}

/// One line per problem (a config error holds every problem of the files), with the key of
/// the config ones.
fn problems(prepared: Result<Prepared, Vec<Error>>) -> Vec<config::ConfigError> {
    match prepared {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .into_iter()
            .flat_map(|e| match e {
                Error::Config(all) => all.iter().cloned().collect::<Vec<_>>(),
                other => vec![config::ConfigError::other(other.to_string())],
            })
            .collect(),
    }
}

/// The in-memory queue of a running engine; emit() and drain() need it.
fn memory(running: &Running) -> PyResult<&MemoryTransport> {
    running.memory().ok_or_else(|| {
        PyFraiseError(Error::Engine(
            "emit() and drain() work on the in_memory backend; with backend postgres, write rows to the database (with nats or redis, publish to the stream)".into(),
        ))
        .into()
    })
}

fn not_running() -> PyErr {
    PyFraiseError(Error::Engine(
        "the engine is not running: call start() first".into(),
    ))
    .into()
}

fn started_once() -> PyErr {
    PyFraiseError(Error::Engine(
        "this engine was already started once; create a new one".into(),
    ))
    .into()
}

#[pyclass(name = "Engine", module = "fraiseql._native", frozen)]
pub struct PyEngine {
    config: Config,
    /// Declared types plus TOML-only entities: the tables change capture covers.
    schema: Schema,
    instruments: Instruments,
    observer_names: Vec<String>,
    /// Compiled observers, until the engine starts (or opens its dead letters): it can do
    /// that once.
    specs: Mutex<Option<Vec<ObserverSpec>>>,
    /// The dead letters of the started engine, or of `open_dead_letters`; kept after stop.
    dead_letters: OnceLock<Arc<DeadLetters>>,
    event_loop: LoopSlot,
    tables: HashMap<String, String>,
    running: Mutex<Option<Arc<Running>>>,
    http_port: Mutex<Option<u16>>,
}

impl PyEngine {
    fn running(&self) -> PyResult<Arc<Running>> {
        self.running
            .lock()
            .expect("running lock")
            .clone()
            .ok_or_else(not_running)
    }

    /// The compiled observers, for the one start (or `open_dead_letters`).
    fn take_specs(&self) -> PyResult<Vec<ObserverSpec>> {
        self.specs
            .lock()
            .expect("specs lock")
            .take()
            .ok_or_else(started_once)
    }

    fn dead_letters(&self) -> PyResult<Arc<DeadLetters>> {
        self.dead_letters.get().cloned().ok_or_else(not_running)
    }

    /// The queue to list: the engine's, or an empty one before it started.
    fn dead_letter_queue(&self) -> Arc<dyn DeadLetterQueue> {
        match self.dead_letters.get() {
            Some(d) => d.queue().clone(),
            None => Arc::new(MemoryDlq::new(None)),
        }
    }

    fn event(
        &self,
        entity: String,
        event: &str,
        new: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<Event> {
        build_event(&self.tables, entity, event, new, old, id)
    }
}

/// A change event from Python arguments, checked: INSERT and UPDATE need `new`, DELETE
/// needs `old`. The table is the declared one, else the default `tb_<entity>`.
pub(crate) fn build_event(
    tables: &HashMap<String, String>,
    entity: String,
    event: &str,
    new: Option<&Bound<'_, PyAny>>,
    old: Option<&Bound<'_, PyAny>>,
    id: Option<String>,
) -> PyResult<Event> {
    let kind: EventKind = event.parse().map_err(PyValueError::new_err)?;
    let new = row_from_py(new, "new")?;
    let old = row_from_py(old, "old")?;
    match kind {
        EventKind::Insert if new.is_none() => {
            return Err(PyValueError::new_err("an INSERT needs `new`"))
        }
        EventKind::Update if new.is_none() => {
            return Err(PyValueError::new_err(
                "an UPDATE needs `new` (and usually `old`)",
            ))
        }
        EventKind::Delete if old.is_none() => {
            return Err(PyValueError::new_err("a DELETE needs `old`"))
        }
        _ => {}
    }
    let table = tables
        .get(&entity)
        .cloned()
        .unwrap_or_else(|| default_table(&entity));
    let mut ev = Event::new(entity, kind, table, new, old);
    if let Some(id) = id {
        ev.id = id;
    }
    Ok(ev)
}

fn dlq_entry_to_py<'py>(py: Python<'py>, e: &DlqEntry) -> PyResult<Bound<'py, PyAny>> {
    let value = serde_json::to_value(e).map_err(|e| PyValueError::new_err(e.to_string()))?;
    to_py(py, &value)
}

/// The config alone (no schema, no observers built): for commands that need no secrets.
pub(crate) fn load_config(main: &Source, runtime_file: &Source) -> PyResult<Config> {
    Config::from_sources(
        main.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        runtime_file.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        &env,
    )
    .map_err(|e| PyFraiseError(Error::Config(e)).into())
}

/// What `fraiseql run --embedded` must know before the config can load (its variables may
/// be the ones it is about to set): `backend`, `uses_nats`, `nats_url`, `database_url_env`.
#[pyfunction]
#[pyo3(signature = (main=None, runtime_file=None))]
pub fn config_facts<'py>(
    py: Python<'py>,
    main: Source,
    runtime_file: Source,
) -> PyResult<Bound<'py, PyDict>> {
    let facts = Config::facts(
        main.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        runtime_file.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
        &env,
    );
    let out = PyDict::new(py);
    out.set_item("backend", facts.backend.as_str())?;
    out.set_item("uses_nats", facts.uses_nats)?;
    out.set_item("nats_url", facts.nats_url)?;
    out.set_item("database_url_env", facts.database_url_env)?;
    Ok(out)
}

/// `[database] url` after `${VAR}` interpolation and the `DATABASE_URL` fallback, for
/// `fraiseql db psql`.
#[pyfunction]
#[pyo3(signature = (main=None, runtime_file=None))]
pub fn database_url(main: Source, runtime_file: Source) -> PyResult<Option<String>> {
    Ok(load_config(&main, &runtime_file)?.database.url)
}

/// `fraiseql db install|uninstall`: change capture for the declared entities. Needs the
/// config and schema only (no action secrets). `print_only` returns the SQL instead.
#[pyfunction]
#[pyo3(signature = (main=None, runtime_file=None, entities=None, uninstall=false, print_only=false))]
pub fn db_install(
    py: Python<'_>,
    main: Source,
    runtime_file: Source,
    entities: Option<&Bound<'_, PyList>>,
    uninstall: bool,
    print_only: bool,
) -> PyResult<String> {
    let config = load_config(&main, &runtime_file)?;
    let declared = Schema::new(entities.map(entity_defs).transpose()?.unwrap_or_default())
        .map_err(PyFraiseError)?;
    if print_only {
        return Ok(core_runtime::capture_sql(&config, &declared, uninstall).map_err(PyFraiseError)?);
    }
    py.detach(|| runtime().block_on(core_runtime::install_capture(&config, &declared, uninstall)))
        .map_err(PyFraiseError)
        .map_err(Into::into)
}

/// `fraiseql backfill ENTITY`: feeds the entity's existing rows through change capture.
/// `progress(sent, total, rate)` is called after each chunk; returns
/// `{"id", "sent", "total", "resumed_at", "done"}`.
#[pyfunction]
#[pyo3(signature = (main, runtime_file, entities, observers, entity, filter=None, only=Vec::new(), chunk=1000, restart=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn backfill<'py>(
    py: Python<'py>,
    main: Source,
    runtime_file: Source,
    entities: &Bound<'py, PyList>,
    observers: &Bound<'py, PyList>,
    entity: String,
    filter: Option<String>,
    only: Vec<String>,
    chunk: usize,
    restart: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let slot: LoopSlot = Arc::new(OnceLock::new());
    let prepared = prepare(
        main,
        runtime_file,
        entity_defs(entities)?,
        observers,
        &slot,
        false,
    )?
    .map_err(raise_all)?;
    let options = core_runtime::BackfillOptions {
        filter,
        observers: only,
        chunk: chunk.max(1),
        restart,
    };
    let report = |p: &fraiseql_observers::capture::backfill::Progress| {
        if let Some(callback) = &progress {
            Python::attach(|py| {
                if let Err(e) = callback.call1(py, (p.sent, p.total, p.rate)) {
                    e.print(py);
                }
            });
        }
    };
    let done = py
        .detach(|| {
            runtime().block_on(core_runtime::backfill(
                &prepared.config,
                &prepared.schema,
                &prepared.specs,
                &entity,
                &options,
                report,
            ))
        })
        .map_err(PyFraiseError)?;
    let out = PyDict::new(py);
    out.set_item("id", done.id)?;
    out.set_item("sent", done.sent)?;
    out.set_item("total", done.total)?;
    out.set_item("resumed_at", done.resumed_at)?;
    out.set_item("done", done.done)?;
    Ok(out)
}

/// `fraiseql idempotency prune`: deletes keys older than `older_than_secs` from `tables`
/// plus the tables of the EffectivelyOnce observers in fraiseql.toml.
#[pyfunction]
#[pyo3(signature = (main, runtime_file, tables, older_than_secs, batch=10_000))]
pub fn idempotency_prune(
    py: Python<'_>,
    main: Source,
    runtime_file: Source,
    mut tables: Vec<String>,
    older_than_secs: f64,
    batch: usize,
) -> PyResult<Vec<(String, u64)>> {
    let config = load_config(&main, &runtime_file)?;
    for h in &config.observers.handlers {
        if let Some(t) = h.checkpoint.idempotency_table() {
            tables.push(t.to_owned());
        }
    }
    tables.sort();
    tables.dedup();
    let older_than = std::time::Duration::try_from_secs_f64(older_than_secs)
        .map_err(|e| PyValueError::new_err(format!("older_than: {e}")))?;
    py.detach(|| {
        runtime().block_on(core_runtime::prune_idempotency(
            &config, &tables, older_than, batch,
        ))
    })
    .map_err(|e| PyFraiseError(e).into())
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (main=None, runtime_file=None, config=None, entities=None, observers=None))]
    fn new(
        py: Python<'_>,
        main: Source,
        runtime_file: Source,
        config: Option<&Bound<'_, PyDict>>,
        entities: Option<&Bound<'_, PyList>>,
        observers: Option<&Bound<'_, PyList>>,
    ) -> PyResult<Self> {
        let main = match dict_source(config)? {
            Some(d) => Some(d),
            None => main,
        };
        let entities = entities.map(entity_defs).transpose()?.unwrap_or_default();
        let tables = entities
            .iter()
            .map(|e| (e.name.clone(), e.table.clone()))
            .collect();
        let empty = PyList::empty(py);
        let observers = observers.unwrap_or(&empty);
        let event_loop: LoopSlot = Arc::new(OnceLock::new());
        let prepared = prepare(main, runtime_file, entities, observers, &event_loop, true)?
            .map_err(raise_all)?;
        let config = prepared.config;
        let schema =
            core_runtime::capture_schema(&config, &prepared.schema).map_err(PyFraiseError)?;
        let instruments = Instruments::for_config(&config);
        let observer_names = prepared.specs.iter().map(|s| s.name().to_owned()).collect();
        Ok(PyEngine {
            config,
            schema,
            instruments,
            observer_names,
            specs: Mutex::new(Some(prepared.specs)),
            dead_letters: OnceLock::new(),
            event_loop,
            tables,
            running: Mutex::new(None),
            http_port: Mutex::new(None),
        })
    }

    /// Starts the engine (`fraiseql_observers::runtime::start`). `event_loop` runs `async
    /// def` handlers. `http_port`: None = no HTTP server, 0 = any free port, otherwise that
    /// port.
    #[pyo3(signature = (event_loop=None, http_port=None))]
    fn start(
        &self,
        py: Python<'_>,
        event_loop: Option<Bound<'_, PyAny>>,
        http_port: Option<u16>,
    ) -> PyResult<()> {
        let mut running = self.running.lock().expect("running lock");
        if running.is_some() {
            return Err(
                PyFraiseError(Error::Engine("the engine is already running".into())).into(),
            );
        }
        if let Some(lp) = event_loop {
            let locals = TaskLocals::new(lp).copy_context(py)?;
            let _ = self.event_loop.set(locals);
        }
        let specs = self.take_specs()?;
        let options = StartOptions {
            status: http_port.map(|port| (self.config.observers.http_host.clone(), port)),
        };
        let started = py
            .detach(|| {
                runtime().block_on(core_runtime::start(
                    &self.config,
                    &self.schema,
                    specs,
                    &self.instruments,
                    &options,
                ))
            })
            .map_err(PyFraiseError)?;
        let started = Arc::new(started);
        *self.http_port.lock().expect("port lock") = started.status_addr().map(|a| a.port());
        let _ = self.dead_letters.set(started.dead_letters().clone());
        let observers = self.observer_names.len();
        let plural = if observers == 1 { "" } else { "s" };
        match started.status_addr() {
            Some(addr) => tracing::info!(
                "ready: {observers} observer{plural}, health on http://{addr}/health, \
                 console on http://{addr}/"
            ),
            None => tracing::info!("ready: {observers} observer{plural}"),
        }
        *running = Some(started);
        Ok(())
    }

    #[getter]
    fn http_port(&self) -> Option<u16> {
        *self.http_port.lock().expect("port lock")
    }

    /// `[observers] http_port` of the config.
    #[getter]
    fn configured_http_port(&self) -> u16 {
        self.config.observers.http_port
    }

    #[getter]
    fn backend(&self) -> &'static str {
        self.config.observers.backend.as_str()
    }

    #[getter]
    fn observer_names(&self) -> Vec<String> {
        self.observer_names.clone()
    }

    /// Queues one change. Blocks (without the GIL) while the queue is full.
    #[pyo3(signature = (entity, event, new=None, old=None, id=None))]
    fn emit(
        &self,
        py: Python<'_>,
        entity: String,
        event: &str,
        new: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<String> {
        let ev = self.event(entity, event, new, old, id)?;
        let event_id = ev.id.clone();
        let running = self.running()?;
        let transport = memory(&running)?;
        if let Some(ev) = transport.try_emit(ev).map_err(PyFraiseError)? {
            py.detach(|| runtime().block_on(transport.emit(ev)))
                .map_err(PyFraiseError)?;
        }
        Ok(event_id)
    }

    #[pyo3(signature = (entity, event, new=None, old=None, id=None))]
    fn emit_async<'py>(
        &self,
        py: Python<'py>,
        entity: String,
        event: &str,
        new: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
        id: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ev = self.event(entity, event, new, old, id)?;
        let event_id = ev.id.clone();
        let running = self.running()?;
        memory(&running)?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let transport = memory(&running)?;
            transport.emit(ev).await.map_err(PyFraiseError)?;
            Ok(event_id)
        })
    }

    /// Waits until every emitted event has been processed or dead-lettered.
    fn drain(&self, py: Python<'_>) -> PyResult<()> {
        let running = self.running()?;
        let transport = memory(&running)?;
        py.detach(|| runtime().block_on(transport.drain()));
        Ok(())
    }

    fn drain_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let running = self.running()?;
        memory(&running)?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            memory(&running)?.drain().await;
            Ok(())
        })
    }

    #[getter]
    fn pending(&self) -> usize {
        let running = self.running.lock().expect("running lock").clone();
        running
            .as_deref()
            .and_then(Running::memory)
            .map_or(0, MemoryTransport::pending)
    }

    /// Stops accepting events, finishes those accepted, stops the HTTP server.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        let Some(running) = self.running.lock().expect("running lock").take() else {
            return Ok(());
        };
        py.detach(|| runtime().block_on(running.stop()));
        Ok(())
    }

    fn stop_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let running = self.running.lock().expect("running lock").take();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            if let Some(running) = running {
                running.stop().await;
            }
            Ok(())
        })
    }

    #[pyo3(signature = (limit=1000))]
    fn dlq_list<'py>(&self, py: Python<'py>, limit: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let dlq = self.dead_letter_queue();
        let entries = py
            .detach(|| runtime().block_on(dlq.list(limit)))
            .map_err(PyFraiseError)?;
        entries.iter().map(|e| dlq_entry_to_py(py, e)).collect()
    }

    fn dlq_retry(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        let dead_letters = self.dead_letters()?;
        Ok(py
            .detach(|| runtime().block_on(dead_letters.retry(id)))
            .map_err(PyFraiseError)?)
    }

    fn dlq_retry_async<'py>(&self, py: Python<'py>, id: u64) -> PyResult<Bound<'py, PyAny>> {
        let dead_letters = self.dead_letters()?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            Ok(dead_letters.retry(id).await.map_err(PyFraiseError)?)
        })
    }

    /// Removes the entries with these ids; returns how many there were.
    fn dlq_remove(&self, py: Python<'_>, ids: Vec<u64>) -> PyResult<usize> {
        let dead_letters = self.dead_letters()?;
        Ok(py
            .detach(|| runtime().block_on(dead_letters.remove(&ids)))
            .map_err(PyFraiseError)?)
    }

    fn dlq_purge(&self, py: Python<'_>) -> PyResult<usize> {
        let dead_letters = self.dead_letters()?;
        Ok(py
            .detach(|| runtime().block_on(dead_letters.purge()))
            .map_err(PyFraiseError)?)
    }

    /// Opens the durable dead-letter queue of the configured database and builds the engine
    /// without starting a source: what `fraiseql dlq list|show|retry|purge` works on.
    fn open_dead_letters(&self, py: Python<'_>) -> PyResult<()> {
        if self.dead_letters.get().is_some() {
            return Err(PyFraiseError(Error::Engine(
                "open_dead_letters() is for an engine that was not started".into(),
            ))
            .into());
        }
        let specs = self.take_specs()?;
        let opened = py
            .detach(|| {
                runtime().block_on(DeadLetters::open(
                    &self.config,
                    &self.schema,
                    specs,
                    &self.instruments,
                ))
            })
            .map_err(PyFraiseError)?;
        let _ = self.dead_letters.set(Arc::new(opened));
        Ok(())
    }

    fn metrics_text(&self) -> String {
        self.instruments.metrics.encode()
    }
}
