//! The composition root: what starts for a config, decided in one place.
//!
//! [`start`] takes the config, the schema and the observers and starts, on the caller's tokio
//! runtime, what the config asks for: one PostgreSQL pool when a database is configured (shared
//! by the dead-letter queue, the idempotency stores, change capture and the PostgreSQL
//! sources), the source of the chosen backend, the bridge or the Redis forwarder, and the
//! status server. It returns a [`Running`] handle; [`Running::stop`] drains and stops it all.
//! [`DeadLetters::open`] builds the same engine without a source, for `fraiseql dlq`.
//!
//! The PyO3 binding, the Rust example (`examples/embed.rs`), the tests and the benchmarks all
//! start the engine through here.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::postgres::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bridge;
use crate::capture::backfill;
pub use crate::capture::backfill::BackfillOptions;
use crate::capture::guard::{self, Guard, GuardHealth};
use crate::capture::logical::{self, LogicalCapture, Mode};
use crate::capture::{self, CaptureOptions};
use crate::checkpoint::{
    CheckpointStrategy, IdempotencyStores, MemoryIdempotencyStores, PgIdempotencyStore,
    PgIdempotencyStores,
};
use crate::config::{Backend, Config, ConfigError, ConfigErrors};
use crate::console::{Console, RECENT_EVENTS};
pub use crate::database::connect_pool;
use crate::dlq::{DeadLetterQueue, DlqEntry, DlqOrigin, MemoryDlq, PgDeadLetterQueue};
use crate::engine::{Engine, ObserverSpec};
use crate::error::{ConnectErrorKind, DeadLetterErrorKind, Error, Result};
use crate::event::EventKind;
use crate::metrics::{Metrics, RedisMetrics};
use crate::schema::{EntityDef, Schema};
use crate::status::{HealthSource, StatusServer};
use crate::telemetry::{Spans, Telemetry};
use crate::transport::logical::{LogicalOptions, LogicalSource};
use crate::transport::memory::MemoryTransport;
use crate::transport::nats::{self, NatsMetrics, NatsPublisher, NatsSource};
use crate::transport::postgres::{PostgresOptions, PostgresSource};
use crate::transport::redis::{self as redis_transport, RedisPublisher, RedisSource};
use crate::transport::Publisher;

/// The metrics of one engine process, registered in one registry: the observers' and those
/// of the configured backend. Made before [`start`] so that `/metrics` has something to
/// show for an engine that is not started yet.
#[derive(Clone)]
pub struct Instruments {
    /// The observers' (`fraiseql_observer_*`); its registry serves `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The bridge's or Redis forwarder's engine (`fraiseql_forwarder_*`), in the same
    /// registry: its publishes are not counted as observers' actions.
    pub forwarder: Arc<Metrics>,
    pub nats: NatsMetrics,
    pub redis: RedisMetrics,
}

impl Instruments {
    pub fn for_config(config: &Config) -> Instruments {
        let nats = NatsMetrics::new();
        let redis = RedisMetrics::new();
        let (metrics, forwarder) = Metrics::with_forwarder(|r| match config.observers.backend {
            Backend::Nats => nats.register(r),
            Backend::Redis => redis.register(r),
            Backend::Postgres | Backend::InMemory => {}
        });
        Instruments {
            metrics: Arc::new(metrics),
            forwarder: Arc::new(forwarder),
            nats,
            redis,
        }
    }
}

/// How [`start`] runs beyond what the config says.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Where `/health` and `/metrics` listen (`host`, `port`; port 0 picks a free one).
    /// `None` starts no status server.
    pub status: Option<(String, u16)>,
}

impl StartOptions {
    /// Serves the status server on `127.0.0.1:port`.
    pub fn status_on(port: u16) -> StartOptions {
        StartOptions {
            status: Some(("127.0.0.1".to_owned(), port)),
        }
    }
}

/// A started engine.
pub struct Running {
    engine: Arc<Engine>,
    dead_letters: Arc<DeadLetters>,
    memory: Option<MemoryTransport>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<Result<()>>>>,
    status: Mutex<Option<StatusServer>>,
    status_addr: Option<SocketAddr>,
    telemetry: tokio::sync::Mutex<Option<Telemetry>>,
}

impl Running {
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The in-memory intake (`backend = "in_memory"`): `emit` and `drain` go there.
    pub fn memory(&self) -> Option<&MemoryTransport> {
        self.memory.as_ref()
    }

    pub fn dead_letters(&self) -> &Arc<DeadLetters> {
        &self.dead_letters
    }

    /// Where the status server listens, if one was started.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }

    /// Stops intake, finishes the work in flight (acknowledging it), stops the status server.
    /// Calling it again does nothing.
    pub async fn stop(&self) {
        if let Some(memory) = &self.memory {
            memory.stop().await;
        }
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for task in tasks {
            match task.await {
                Ok(Err(e)) => tracing::error!("[observers] source stopped: {e}"),
                Err(e) => tracing::error!("[observers] source task failed: {e}"),
                Ok(Ok(())) => {}
            }
        }
        let status = self.status.lock().expect("status lock").take();
        if let Some(status) = status {
            status.stop().await;
        }
        // The spans of the work just finished, exported before the end.
        if let Some(telemetry) = self.telemetry.lock().await.take() {
            telemetry.shutdown().await;
        }
    }
}

/// An instance without observers (a bridge or forwarder alone) leaves the shared consumer to
/// the instances that have some: pulling, it would acknowledge their messages with nothing run.
fn not_consuming(what: &str) {
    tracing::info!("[observers] no observers: this instance does not pull from {what}");
}

/// Starts the engine a config describes. See the module documentation.
pub async fn start(
    config: &Config,
    schema: &Schema,
    observers: Vec<ObserverSpec>,
    instruments: &Instruments,
    options: &StartOptions,
) -> Result<Running> {
    let config_schema = capture_schema(config, schema)?;
    let schema = &config_schema;
    let metrics = &instruments.metrics;
    let admin_token = admin_token(config, &|var| std::env::var(var).ok())?;
    // The in-memory backend keeps everything in process memory, a database or not.
    let pool = match &config.database.url {
        Some(url) if config.observers.backend != Backend::InMemory => {
            Some(connect_pool(url, config.observers.max_concurrency).await?)
        }
        _ => None,
    };
    let telemetry = Telemetry::start(&config.observers.telemetry).await?;
    let spans = telemetry.as_ref().map(Telemetry::spans).unwrap_or_default();
    let recent = options.status.is_some().then_some(RECENT_EVENTS);
    let consumes = !observers.is_empty();
    let (engine, dlq) = observer_engine(
        config,
        pool.as_ref(),
        observers,
        metrics,
        spans.clone(),
        recent,
    )
    .await?;
    let capture = match &pool {
        Some(pool) if !logical::readers(config).is_empty() => {
            Some(prepare_capture(config, schema, pool).await?)
        }
        _ => None,
    };
    let (shutdown, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut memory = None;
    let health: Arc<dyn HealthSource> = match config.observers.backend {
        Backend::InMemory => {
            let o = &config.observers;
            memory = Some(MemoryTransport::start(
                engine.clone(),
                o.queue_capacity,
                o.max_concurrency,
            ));
            tracing::info!("[observers] transport: in_memory");
            Arc::new(MemoryHealth)
        }
        Backend::Postgres => {
            let pool = pool.as_ref().ok_or_else(no_database)?;
            match capture {
                Some(Mode::Logical) => {
                    let source = LogicalSource::new(
                        pool.clone(),
                        database_url(config)?,
                        schema,
                        LogicalOptions::from_config(config),
                    )
                    .await?;
                    let pg = &config.observers.postgres;
                    tracing::info!(
                        "[observers] transport: postgres (logical capture, listener {}, slot {}, \
                         publication {})",
                        pg.listener_id,
                        logical::slot_name(&pg.listener_id),
                        pg.publication
                    );
                    let health = source.health();
                    let earlier =
                        switch_drain(pool, PostgresOptions::from_config(config), None).await?;
                    tasks.push(tokio::spawn(after_drain(
                        earlier,
                        source,
                        engine.clone(),
                        stop_rx.clone(),
                    )));
                    health
                }
                _ => {
                    if config.observers.auto_install {
                        capture::install_with(pool, schema, &CaptureOptions::from_config(config))
                            .await?;
                    }
                    let source =
                        PostgresSource::new(pool.clone(), PostgresOptions::from_config(config))
                            .await?;
                    log_postgres_source(config);
                    let health = source.health();
                    tasks.push(tokio::spawn(source.run(engine.clone(), stop_rx.clone())));
                    health
                }
            }
        }
        Backend::Nats => {
            let client = nats::connect(&config.observers.nats).await?;
            let source = NatsSource::new(
                client.clone(),
                &config.observers.nats,
                instruments.nats.clone(),
                config.observers.max_concurrency,
            )
            .await?;
            if config.observers.run_bridge {
                let publisher =
                    NatsPublisher::new(client, &config.observers.nats, instruments.nats.clone())
                        .for_config(config)
                        .with_order_keys(engine.order_keys());
                let forwarder = Forwarder {
                    config,
                    schema,
                    pool: pool.as_ref().ok_or_else(no_database)?,
                    publisher: Arc::new(publisher),
                    listener_id: &config.observers.bridge.transport_name,
                    target: "nats",
                    capture,
                };
                tasks.push(
                    forwarder
                        .start(dlq.clone(), instruments.forwarder.clone(), stop_rx.clone())
                        .await?,
                );
            }
            let health = source.health();
            if consumes {
                tasks.push(tokio::spawn(source.run(engine.clone(), stop_rx.clone())));
            } else {
                not_consuming(&format!(
                    "consumer `{}`",
                    config.observers.nats.consumer_name
                ));
            }
            health
        }
        Backend::Redis => {
            let url = redis_url(config)?;
            let rc = &config.observers.redis;
            let source = RedisSource::connect(
                url,
                rc,
                instruments.redis.clone(),
                config.observers.max_concurrency,
            )
            .await?;
            tracing::info!(
                "[observers] transport: redis ({}, stream {}, group {})",
                crate::redact::redact_url(url),
                rc.stream,
                rc.group
            );
            match pool.as_ref() {
                Some(pool) => {
                    let conn = redis_transport::connect(url, Duration::from_secs(10)).await?;
                    let publisher = RedisPublisher::new(conn, rc, instruments.redis.clone());
                    let forwarder = Forwarder {
                        config,
                        schema,
                        pool,
                        publisher: Arc::new(publisher),
                        listener_id: &rc.forwarder_name,
                        target: "redis",
                        capture,
                    };
                    tasks.push(
                        forwarder
                            .start(dlq.clone(), instruments.forwarder.clone(), stop_rx.clone())
                            .await?,
                    );
                }
                None => tracing::warn!(
                    "[observers] no [database] url: nothing is forwarded to the Redis stream by \
                     this instance, and dead letters are kept in memory"
                ),
            }
            let health = source.health();
            if consumes {
                tasks.push(tokio::spawn(source.run(engine.clone(), stop_rx.clone())));
            } else {
                not_consuming(&format!("group `{}`", rc.group));
            }
            health
        }
    };
    let health = match (&pool, capture) {
        (Some(pool), Some(mode)) => {
            let guard = capture_guard(config, schema, pool, mode)?;
            let guarded = Arc::new(Guarded {
                inner: health,
                guard: guard.health(),
            });
            tasks.push(tokio::spawn(guard.run(stop_rx.clone())));
            guarded
        }
        _ => health,
    };
    let blocked_after = Duration::from_secs(config.observers.blocked_after_secs);
    tasks.push(tokio::spawn(watch_in_flight(
        engine.clone(),
        blocked_after,
        stop_rx.clone(),
    )));
    let health: Arc<dyn HealthSource> = Arc::new(Watched {
        inner: health,
        engine: engine.clone(),
        blocked_after,
    });
    let dead_letters = Arc::new(DeadLetters {
        engine: engine.clone(),
        dlq,
        config: config.clone(),
        schema: schema.clone(),
        metrics: metrics.clone(),
        forwarder: instruments.forwarder.clone(),
        retrying: Mutex::default(),
    });
    let status = match &options.status {
        Some((host, port)) => {
            let console = Console::new(
                engine.clone(),
                dead_letters.clone(),
                metrics.clone(),
                health.clone(),
                admin_token.as_deref(),
            );
            let server =
                StatusServer::start(host, *port, metrics.clone(), health, Some(console)).await?;
            Some(server)
        }
        None => None,
    };
    Ok(Running {
        engine,
        dead_letters,
        memory,
        shutdown,
        tasks: Mutex::new(tasks),
        status_addr: status.as_ref().map(|s| s.addr),
        status: Mutex::new(status),
        telemetry: tokio::sync::Mutex::new(telemetry),
    })
}

/// Decides how this process captures changes (logged, with the reason) and, for logical
/// capture with `auto_install`, installs the publication and every reader's slot.
async fn prepare_capture(config: &Config, schema: &Schema, pool: &PgPool) -> Result<Mode> {
    let (mode, why) = logical::decide(pool, config.observers.postgres.capture).await?;
    let name = match mode {
        Mode::Logical => "logical",
        Mode::Trigger => "trigger",
    };
    tracing::info!("[observers] capture: {name} ({why})");
    if mode == Mode::Logical && config.observers.auto_install {
        logical::install(pool, schema, &LogicalCapture::from_config(config)).await?;
    }
    Ok(mode)
}

/// The guard that keeps the captured tables captured (see [`crate::capture::guard`]).
fn capture_guard(config: &Config, schema: &Schema, pool: &PgPool, mode: Mode) -> Result<Guard> {
    let capture = match mode {
        Mode::Logical => guard::Capture::Logical {
            publication: config.observers.postgres.publication.clone(),
        },
        Mode::Trigger => guard::Capture::Trigger(trigger_capture_options(config)),
    };
    let every = Duration::from_millis(config.observers.postgres.poll_interval_ms);
    Guard::new(
        pool.clone(),
        schema,
        capture,
        config.observers.auto_install,
        every,
    )
}

/// The trigger capture a config installs: the observers' channel on the postgres backend,
/// the bridge's where a forwarder reads the change log.
fn trigger_capture_options(config: &Config) -> CaptureOptions {
    if config.observers.backend == Backend::Postgres {
        return CaptureOptions::from_config(config);
    }
    CaptureOptions {
        notify_channel: config.observers.bridge.notify_channel.clone(),
        skip_unchanged_updates: config.observers.postgres.skip_unchanged_updates,
        notify: true,
    }
}

/// After a switch from trigger to logical capture: a trigger reader for what the change log
/// still holds for this reader, to deliver before the WAL (see `capture::logical::install`).
async fn switch_drain(
    pool: &PgPool,
    options: PostgresOptions,
    publisher: Option<Arc<dyn Publisher>>,
) -> Result<Option<PostgresSource>> {
    if !PostgresSource::pending_after_switch(pool, &options.listener_id).await? {
        return Ok(None);
    }
    capture::upgrade_change_log(pool).await?;
    let source = PostgresSource::new(pool.clone(), options).await?;
    Ok(Some(match publisher {
        Some(publisher) => source.with_batch_publisher(publisher),
        None => source,
    }))
}

/// Delivers what the change log still holds (if anything), then reads the WAL.
async fn after_drain(
    earlier: Option<PostgresSource>,
    source: LogicalSource,
    engine: Arc<Engine>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    if let Some(earlier) = earlier {
        tracing::info!(
            "[observers] delivering what trigger capture captured before the switch to logical \
             capture, first"
        );
        earlier.drain(engine.clone(), stop.clone()).await?;
        if *stop.borrow() {
            return Ok(());
        }
        tracing::info!("[observers] the change log is drained; reading the WAL");
    }
    source.run(engine, stop).await
}

/// A source's health with what the engine is processing: 503 while an event has been
/// processed for longer than `blocked_after`, whatever the cause (a slow handler, a stuck
/// key, an action that does not return).
struct Watched {
    inner: Arc<dyn HealthSource>,
    engine: Arc<Engine>,
    blocked_after: Duration,
}

impl Watched {
    fn blocked(&self) -> Option<crate::engine::Processing> {
        self.engine
            .oldest_in_flight()
            .filter(|p| p.since.elapsed() >= self.blocked_after)
    }
}

fn describe_processing(p: &crate::engine::Processing) -> Value {
    json!({
        "event_id": p.event_id,
        "entity": p.entity,
        "key": p.key,
        "observer": p.observer,
        "for_secs": (p.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

impl HealthSource for Watched {
    fn observers(&self) -> Value {
        let mut observers = self.inner.observers();
        let oldest = self.engine.oldest_in_flight();
        observers["oldest_in_flight"] = oldest.as_ref().map_or(Value::Null, describe_processing);
        observers["blocked"] = Value::Bool(self.blocked().is_some());
        // Schema drift is a warning, not an outage: listed, without a 503.
        let missing = self.engine.missing_fields();
        if !missing.is_empty() {
            observers["missing_fields"] = serde_json::to_value(missing).unwrap_or_default();
        }
        observers
    }

    fn databases(&self) -> Option<Value> {
        self.inner.databases()
    }

    fn healthy(&self) -> bool {
        self.inner.healthy() && self.blocked().is_none()
    }
}

/// Says in the log, once per event, when an event has been processed for longer than
/// `blocked_after`, and when processing moves again.
async fn watch_in_flight(
    engine: Arc<Engine>,
    blocked_after: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut reported: Option<String> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { return Ok(()) },
        }
        let blocked = engine
            .oldest_in_flight()
            .filter(|p| p.since.elapsed() >= blocked_after);
        match (&blocked, &reported) {
            (Some(p), seen) if seen.as_deref() != Some(p.event_id.as_str()) => {
                tracing::warn!(
                    "[observers] event {} ({} key {}) has been processed for {:.0}s, at observer \
                     {}: /health is 503 until it finishes (blocked_after_secs = {})",
                    p.event_id,
                    p.entity,
                    p.key.as_deref().unwrap_or("-"),
                    p.since.elapsed().as_secs_f64(),
                    p.observer.as_deref().unwrap_or("-"),
                    blocked_after.as_secs()
                );
                reported = Some(p.event_id.clone());
            }
            (None, Some(_)) => {
                tracing::info!("[observers] processing moves again");
                reported = None;
            }
            _ => {}
        }
    }
}

/// A source's health with the capture guard's gaps.
struct Guarded {
    inner: Arc<dyn HealthSource>,
    guard: Arc<GuardHealth>,
}

impl HealthSource for Guarded {
    fn observers(&self) -> Value {
        let mut observers = self.inner.observers();
        observers["capture_gaps"] = self.guard.gaps();
        observers["backfills"] = self.guard.backfills();
        observers
    }

    fn databases(&self) -> Option<Value> {
        self.inner.databases()
    }

    fn healthy(&self) -> bool {
        self.inner.healthy()
    }
}

fn database_url(config: &Config) -> Result<&str> {
    config.database.url.as_deref().ok_or_else(no_database)
}

fn log_postgres_source(config: &Config) {
    let pg = &config.observers.postgres;
    if pg.listen {
        tracing::info!(
            "[observers] transport: postgres (listener {}, channel {})",
            pg.listener_id,
            config.observers.notify_channel
        );
    } else {
        tracing::info!(
            "[observers] transport: postgres (listener {}, polling every {} ms)",
            pg.listener_id,
            pg.poll_interval_ms
        );
    }
}

/// The dead-letter queue and the engine that can re-run its entries, with or without a
/// running source.
pub struct DeadLetters {
    engine: Arc<Engine>,
    dlq: Arc<dyn DeadLetterQueue>,
    config: Config,
    schema: Schema,
    metrics: Arc<Metrics>,
    /// A forwarder's retries are counted as its, not as the observers'.
    forwarder: Arc<Metrics>,
    /// The entries being retried: a second retry of one of them is refused, not run twice.
    retrying: Mutex<HashSet<u64>>,
}

/// Holds an entry's place in [`DeadLetters::retrying`] while it is retried.
struct Retrying<'a> {
    set: &'a Mutex<HashSet<u64>>,
    id: u64,
}

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("retrying lock").remove(&self.id);
    }
}

impl DeadLetters {
    /// The engine of `observers` over the durable dead-letter queue of the configured
    /// database, without a source: what `fraiseql dlq list|show|retry|purge` works on.
    pub async fn open(
        config: &Config,
        schema: &Schema,
        observers: Vec<ObserverSpec>,
        instruments: &Instruments,
    ) -> Result<DeadLetters> {
        let url = config.database.url.as_deref().ok_or_else(|| {
            Error::dead_letter(
                DeadLetterErrorKind::NoDatabase,
                "no [database] url: without a database, dead letters live in the memory of the \
                 running engine",
            )
        })?;
        let pool = connect_pool(url, 4).await?;
        let metrics = &instruments.metrics;
        let (engine, dlq) = observer_engine(
            config,
            Some(&pool),
            observers,
            metrics,
            Spans::default(),
            None,
        )
        .await?;
        Ok(DeadLetters {
            engine,
            dlq,
            config: config.clone(),
            schema: capture_schema(config, schema)?,
            metrics: metrics.clone(),
            forwarder: instruments.forwarder.clone(),
            retrying: Mutex::default(),
        })
    }

    pub fn queue(&self) -> &Arc<dyn DeadLetterQueue> {
        &self.dlq
    }

    /// Oldest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<DlqEntry>> {
        self.dlq.list(limit).await
    }

    /// Re-runs a dead letter: an observer's action, or a change the bridge or the Redis
    /// forwarder could not publish (published again through a publisher of its own). Ok(false)
    /// when it failed again (the entry stays, with the new error). An entry this process is
    /// retrying already is refused (`InProgress`): running it twice would deliver it twice.
    pub async fn retry(&self, id: u64) -> Result<bool> {
        let _held = self.hold_for_retry(id)?;
        let entry = self.dlq.get(id).await?;
        match entry.map(|e| e.origin) {
            Some(DlqOrigin::Forwarder) => {
                bridge::retry_forwarded(
                    &self.config,
                    &self.schema,
                    self.dlq.clone(),
                    self.forwarder.clone(),
                    self.engine.order_keys(),
                    id,
                )
                .await
            }
            _ => self.engine.retry_dead_letter(id).await,
        }
    }

    fn hold_for_retry(&self, id: u64) -> Result<Retrying<'_>> {
        if !self.retrying.lock().expect("retrying lock").insert(id) {
            return Err(Error::dead_letter(
                DeadLetterErrorKind::InProgress,
                format!("entry {id} is being retried already"),
            ));
        }
        Ok(Retrying {
            set: &self.retrying,
            id,
        })
    }

    /// Newest first: see [`DeadLetterQueue::search`].
    pub async fn search(&self, text: &str, limit: usize) -> Result<Vec<DlqEntry>> {
        self.dlq.search(text, limit).await
    }

    pub async fn get(&self, id: u64) -> Result<Option<DlqEntry>> {
        self.dlq.get(id).await
    }

    pub async fn len(&self) -> Result<usize> {
        self.dlq.len().await
    }

    /// Removes the entries with these ids; returns how many there were.
    pub async fn remove(&self, ids: &[u64]) -> Result<usize> {
        let removed = self.dlq.remove_many(ids).await?;
        self.metrics
            .dlq_size
            .dec_by(i64::try_from(removed).unwrap_or(i64::MAX));
        Ok(removed)
    }

    /// Removes every entry; returns how many there were.
    pub async fn purge(&self) -> Result<usize> {
        self.engine.purge_dead_letters().await
    }
}

struct MemoryHealth;

impl HealthSource for MemoryHealth {
    fn observers(&self) -> Value {
        json!({"transport": "in_memory", "connected": true})
    }
    fn healthy(&self) -> bool {
        true
    }
}

/// The tables to capture: every declared type, plus the entities that `[[observers.handlers]]`
/// name without a declared type (a TOML-only deployment), with their configured tables.
pub fn capture_schema(config: &Config, declared: &Schema) -> Result<Schema> {
    let mut entities = declared.entities().to_vec();
    for h in &config.observers.handlers {
        if !entities.iter().any(|e| e.name == h.entity) {
            entities.push(EntityDef {
                name: h.entity.clone(),
                table: h.table.clone(),
                fields: Vec::new(),
                kinds: Vec::new(),
            });
        }
    }
    Schema::new(entities)
}

/// The shortest admin token accepted: a guessable token would guard retry and purge.
const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// The console's admin token, from the variable `[observers] admin_token_env` names: read at
/// start, so a name without a value fails the start rather than the first retry.
fn admin_token(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>> {
    let Some(var) = &config.observers.admin_token_env else {
        return Ok(None);
    };
    let problem = match env(var) {
        Some(token) if token.trim().chars().count() >= MIN_ADMIN_TOKEN_CHARS => {
            return Ok(Some(token.trim().to_owned()));
        }
        Some(token) if token.trim().is_empty() => format!("environment variable {var} is empty"),
        Some(_) => format!(
            "the token in {var} is shorter than {MIN_ADMIN_TOKEN_CHARS} characters; use a \
             random one, e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`"
        ),
        None => format!(
            "environment variable {var} is not set (it holds the token the console's retry \
             and purge need)"
        ),
    };
    Err(Error::Config(ConfigErrors(vec![ConfigError::new(
        "environment",
        "observers.admin_token_env",
        None,
        problem,
    )])))
}

fn no_database() -> Error {
    Error::connect(
        ConnectErrorKind::InvalidSettings,
        "backend `postgres` needs a database: set [database] url in fraiseql.toml or DATABASE_URL",
    )
}

fn redis_url(config: &Config) -> Result<&str> {
    config.observers.redis_url.as_deref().ok_or_else(|| {
        Error::connect(
            ConnectErrorKind::InvalidSettings,
            "redis backend requires observers.redis_url to be set",
        )
    })
}

/// The observers' engine over the dead-letter queue and the idempotency stores: in
/// PostgreSQL with a pool, in process memory without.
async fn observer_engine(
    config: &Config,
    pool: Option<&PgPool>,
    observers: Vec<ObserverSpec>,
    metrics: &Arc<Metrics>,
    spans: Spans,
    recent: Option<usize>,
) -> Result<(Arc<Engine>, Arc<dyn DeadLetterQueue>)> {
    let dlq = dead_letter_queue(config, pool, metrics).await?;
    let stores = idempotency_stores(pool, &observers).await?;
    let mut engine = Engine::new(observers, dlq.clone(), stores.as_ref(), metrics.clone())?
        .with_spans(spans)
        .with_shutdown_timeout(Duration::from_secs(config.observers.shutdown_timeout_secs));
    if let Some(capacity) = recent {
        engine = engine.with_recent(capacity);
    }
    Ok((Arc::new(engine), dlq))
}

/// The durable dead-letter queue with a database (its size seeds the gauge), else one in
/// process memory.
async fn dead_letter_queue(
    config: &Config,
    pool: Option<&PgPool>,
    metrics: &Metrics,
) -> Result<Arc<dyn DeadLetterQueue>> {
    let max = config.observers.max_dlq_size;
    let Some(pool) = pool else {
        return Ok(Arc::new(MemoryDlq::new(max)));
    };
    let dlq = PgDeadLetterQueue::new(pool.clone(), max).await?;
    metrics.dlq_size.set(dlq.len().await? as i64);
    Ok(Arc::new(dlq))
}

fn idempotency_tables(specs: &[ObserverSpec]) -> Vec<&str> {
    specs
        .iter()
        .filter_map(|s| match s.checkpoint() {
            CheckpointStrategy::EffectivelyOnce { idempotency_table } => {
                Some(idempotency_table.as_str())
            }
            CheckpointStrategy::AtLeastOnce => None,
        })
        .collect()
}

/// EffectivelyOnce stores: in PostgreSQL when a database is configured (so they hold across
/// instances), in process memory otherwise.
async fn idempotency_stores(
    pool: Option<&PgPool>,
    specs: &[ObserverSpec],
) -> Result<Box<dyn IdempotencyStores>> {
    let tables = idempotency_tables(specs);
    match pool {
        Some(pool) => {
            let stores = PgIdempotencyStores::new(pool.clone());
            stores.prepare(tables).await?;
            Ok(Box::new(stores))
        }
        None => {
            if !tables.is_empty() {
                tracing::warn!(
                    "[observers] no [database] url: EffectivelyOnce keys are kept per process, \
                     so several instances may each run an event once"
                );
            }
            Ok(Box::new(MemoryIdempotencyStores::default()))
        }
    }
}

/// The PostgreSQL → transport forwarder (see [`crate::bridge`]): installs capture notifying
/// the bridge's channel, and forwards the change log under its own cursor.
struct Forwarder<'a> {
    config: &'a Config,
    schema: &'a Schema,
    pool: &'a PgPool,
    publisher: Arc<dyn Publisher>,
    listener_id: &'a str,
    target: &'static str,
    capture: Option<Mode>,
}

impl Forwarder<'_> {
    async fn start(
        self,
        dlq: Arc<dyn DeadLetterQueue>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<JoinHandle<Result<()>>> {
        let bridge = &self.config.observers.bridge;
        let specs = bridge::bridge_observers(self.schema, self.publisher.clone(), self.listener_id);
        let engine = Arc::new(
            Engine::new(specs, dlq, &MemoryIdempotencyStores::default(), metrics)?
                .forwarding()
                .with_shutdown_timeout(Duration::from_secs(
                    self.config.observers.shutdown_timeout_secs,
                )),
        );
        if self.capture == Some(Mode::Logical) {
            let options = LogicalOptions::for_reader(
                self.config,
                self.listener_id,
                bridge.batch_size,
                bridge.poll_interval_secs.saturating_mul(1000),
            );
            let source = LogicalSource::new(
                self.pool.clone(),
                database_url(self.config)?,
                self.schema,
                options,
            )
            .await?
            .with_batch_publisher(self.publisher.clone());
            let earlier = switch_drain(
                self.pool,
                bridge::bridge_options(self.config, self.listener_id),
                Some(self.publisher.clone()),
            )
            .await?;
            self.log_start();
            return Ok(tokio::spawn(after_drain(earlier, source, engine, stop)));
        }
        if self.config.observers.auto_install {
            let options = trigger_capture_options(self.config);
            capture::install_with(self.pool, self.schema, &options).await?;
        }
        let options = bridge::bridge_options(self.config, self.listener_id);
        let source = PostgresSource::new(self.pool.clone(), options)
            .await?
            .with_batch_publisher(self.publisher.clone());
        self.log_start();
        Ok(tokio::spawn(source.run(engine, stop)))
    }

    fn log_start(&self) {
        tracing::info!(
            "[observers] bridge: postgres -> {} ({}, {} table(s))",
            self.target,
            self.listener_id,
            self.schema.entities().len()
        );
    }
}

/// `fraiseql db install` / `--uninstall` for the captured tables of `schema` and the config.
/// Installs the capture the config and the server call for (see [`logical::decide`]);
/// uninstalling removes both kinds. Returns what was done, for the command to print.
pub async fn install_capture(config: &Config, schema: &Schema, uninstall: bool) -> Result<String> {
    let schema = capture_schema(config, schema)?;
    let url = config.database.url.as_deref().ok_or_else(no_database)?;
    let pool = connect_pool(url, 1).await?;
    let tables: Vec<&str> = schema.entities().iter().map(|e| e.table.as_str()).collect();
    let logical_capture = LogicalCapture::from_config(config);
    if uninstall {
        capture::uninstall(&pool, &schema).await?;
        logical::uninstall(&pool, &logical_capture).await?;
        return Ok(format!(
            "change capture removed from {} (triggers, publication `{}`, slots {})",
            tables.join(", "),
            logical_capture.publication,
            logical_capture.slots.join(", ")
        ));
    }
    let (mode, why) = logical::decide(&pool, config.observers.postgres.capture).await?;
    match mode {
        Mode::Logical => {
            logical::install(&pool, &schema, &logical_capture).await?;
            Ok(format!(
                "logical capture installed on {} (publication `{}`, slots {}; {why})",
                tables.join(", "),
                logical_capture.publication,
                logical_capture.slots.join(", ")
            ))
        }
        Mode::Trigger => {
            capture::install_with(&pool, &schema, &CaptureOptions::from_config(config)).await?;
            Ok(format!(
                "trigger capture installed on {} ({why})",
                tables.join(", ")
            ))
        }
    }
}

/// `fraiseql backfill ENTITY`: feeds `entity`'s rows through the capture the config and the
/// server use (see [`crate::capture::backfill`]), for `observers` named in `options` — each
/// must observe the entity's INSERTs. `progress` is called after each chunk.
pub async fn backfill(
    config: &Config,
    schema: &Schema,
    observers: &[ObserverSpec],
    entity: &str,
    options: &BackfillOptions,
    progress: impl FnMut(&backfill::Progress),
) -> Result<backfill::Progress> {
    let schema = capture_schema(config, schema)?;
    let names: Vec<&str> = schema.entities().iter().map(|e| e.name.as_str()).collect();
    let Some(def) = schema.entities().iter().find(|e| e.name == entity) else {
        let hint = crate::config::suggest_from(entity, &names)
            .map_or_else(String::new, |s| format!(" (did you mean `{s}`?)"));
        return Err(Error::Schema(format!(
            "no entity `{entity}` is declared{hint}; declared: {}",
            names.join(", ")
        )));
    };
    for name in &options.observers {
        match observers.iter().find(|o| o.name() == name) {
            Some(o) if o.entity == entity && o.event == EventKind::Insert => {}
            Some(o) => {
                return Err(Error::Schema(format!(
                    "observer `{name}` observes {} of `{}`: a backfill feeds INSERTs of `{entity}`",
                    o.event, o.entity
                )))
            }
            None => {
                return Err(Error::Schema(format!(
                    "no observer named `{name}`; observers of `{entity}`'s INSERTs: {}",
                    observers
                        .iter()
                        .filter(|o| o.entity == entity && o.event == EventKind::Insert)
                        .map(ObserverSpec::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
    }
    let url = config.database.url.as_deref().ok_or_else(no_database)?;
    let pool = connect_pool(url, 2).await?;
    let (mode, _) = logical::decide(&pool, config.observers.postgres.capture).await?;
    if mode == Mode::Logical {
        // Rows written to the WAL before a slot exists would reach no reader.
        logical::check_slots(&pool, &LogicalCapture::from_config(config)).await?;
    }
    let channel = trigger_capture_options(config).notify_channel;
    backfill::run(&pool, mode, def, options, &channel, progress).await
}

/// The SQL of `fraiseql db install --print` (or `--uninstall --print`), without connecting:
/// with `capture = "auto"`, both kinds, each under a comment saying when it applies.
pub fn capture_sql(config: &Config, schema: &Schema, uninstall: bool) -> Result<String> {
    let schema = capture_schema(config, schema)?;
    let logical_capture = LogicalCapture::from_config(config);
    let (logical_sql, trigger_sql) = if uninstall {
        (
            logical::uninstall_sql(&logical_capture)?,
            capture::uninstall_sql(&schema)?,
        )
    } else {
        (
            logical::install_sql(&schema, &logical_capture)?,
            capture::install_sql_with(&schema, &CaptureOptions::from_config(config))?,
        )
    };
    Ok(match config.observers.postgres.capture {
        crate::config::Capture::Logical => logical_sql,
        crate::config::Capture::Trigger => trigger_sql,
        crate::config::Capture::Auto if uninstall => format!("{trigger_sql}{logical_sql}"),
        crate::config::Capture::Auto => format!(
            "-- capture = \"auto\": where wal_level = logical and the role may replicate,\n\
             -- logical capture:\n{logical_sql}\n-- otherwise, trigger capture:\n{trigger_sql}"
        ),
    })
}

/// `fraiseql idempotency prune`: old keys out of each table, in batches. Returns the rows
/// deleted per table.
pub async fn prune_idempotency(
    config: &Config,
    tables: &[String],
    older_than: Duration,
    batch: usize,
) -> Result<Vec<(String, u64)>> {
    let url = config.database.url.as_deref().ok_or_else(no_database)?;
    let pool = connect_pool(url, 1).await?;
    let mut out = Vec::new();
    for table in tables {
        let store = PgIdempotencyStore::lazy(pool.clone(), table)?;
        out.push((table.clone(), store.prune(older_than, batch).await?));
    }
    Ok(out)
}
