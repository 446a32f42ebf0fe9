//! Starting and stopping the transport a config selects. Runs inside the runtime.

use std::sync::{Arc, Mutex};

use fraiseql_observers::bridge::{self, Publisher};
use fraiseql_observers::capture::{self, CaptureOptions};
use fraiseql_observers::http::{HealthSource, HttpServer};
use fraiseql_observers::transport::nats::{self, mask_url, NatsPublisher};
use fraiseql_observers::transport::redis as redis_transport;
use fraiseql_observers::{
    Config, DeadLetterQueue, Engine, EntityDef, Error, IdempotencyStores, MemoryIdempotencyStores,
    MemoryTransport, Metrics, NatsMetrics, NatsSource, ObserverSpec, PgDeadLetterQueue,
    PgIdempotencyStores, PostgresOptions, PostgresSource, RedisMetrics, RedisPublisher,
    RedisSource, Result, Schema,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub enum Transport {
    Memory(MemoryTransport),
    /// Source tasks (postgres, nats, the bridge) stopped through one watch channel.
    Source {
        shutdown: watch::Sender<bool>,
        tasks: Mutex<Vec<JoinHandle<Result<()>>>>,
    },
}

pub struct Running {
    pub transport: Transport,
    pub http: Mutex<Option<HttpServer>>,
}

impl Running {
    /// Stops intake, finishes the work in flight, stops the HTTP server.
    pub async fn stop(&self) {
        match &self.transport {
            Transport::Memory(t) => t.stop().await,
            Transport::Source { shutdown, tasks } => {
                let _ = shutdown.send(true);
                let tasks = std::mem::take(&mut *tasks.lock().expect("tasks lock"));
                for task in tasks {
                    match task.await {
                        Ok(Err(e)) => tracing::error!("[observers] source stopped: {e}"),
                        Err(e) => tracing::error!("[observers] source task failed: {e}"),
                        Ok(Ok(())) => {}
                    }
                }
            }
        }
        let http = self.http.lock().expect("http lock").take();
        if let Some(http) = http {
            http.stop().await;
        }
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

async fn serve_http(
    http_port: Option<u16>,
    metrics: Arc<Metrics>,
    health: Arc<dyn HealthSource>,
) -> Result<Option<HttpServer>> {
    match http_port {
        Some(port) => Ok(Some(
            HttpServer::start("0.0.0.0", port, metrics, health).await?,
        )),
        None => Ok(None),
    }
}

pub async fn start_memory(
    engine: Arc<Engine>,
    config: &Config,
    http_port: Option<u16>,
) -> Result<Running> {
    let obs = &config.observers;
    let metrics = engine.metrics().clone();
    let transport = MemoryTransport::start(engine, obs.queue_capacity, obs.max_concurrency);
    let http = serve_http(http_port, metrics, Arc::new(MemoryHealth)).await?;
    tracing::info!("[observers] transport: in_memory");
    Ok(Running {
        transport: Transport::Memory(transport),
        http: Mutex::new(http),
    })
}

/// The tables to capture: every declared type, plus the entities that `[[observers.handlers]]`
/// name without a Python type (a TOML-only deployment), with their configured tables.
pub fn capture_schema(config: &Config, declared: &Schema) -> Result<Schema> {
    let mut entities = declared.entities().to_vec();
    for h in &config.observers.handlers {
        if !entities.iter().any(|e| e.name == h.entity) {
            entities.push(EntityDef {
                name: h.entity.clone(),
                table: h.table.clone(),
                fields: Vec::new(),
            });
        }
    }
    Schema::new(entities)
}

pub fn database_url(config: &Config) -> Result<&str> {
    config.database.url.as_deref().ok_or_else(|| {
        Error::Transport(
            "backend `postgres` needs a database: set [database] url in fraiseql.toml or DATABASE_URL".into(),
        )
    })
}

async fn pool(url: &str) -> Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .map_err(|e| Error::Transport(format!("cannot connect to the database: {e}")))
}

/// The durable dead-letter queue, when a database is configured; its size seeds the gauge.
pub async fn dead_letters(
    config: &Config,
    metrics: &Metrics,
) -> Result<Option<Arc<dyn DeadLetterQueue>>> {
    let Some(url) = &config.database.url else {
        return Ok(None);
    };
    let dlq = PgDeadLetterQueue::new(pool(url).await?, config.observers.max_dlq_size).await?;
    metrics.dlq_size.set(dlq.len().await? as i64);
    Ok(Some(Arc::new(dlq)))
}

/// An engine for `fraiseql dlq retry`: the observers and the durable stores, no source.
pub async fn offline_engine(
    specs: Vec<ObserverSpec>,
    config: &Config,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Engine>, Arc<dyn DeadLetterQueue>)> {
    let dlq = dead_letters(config, &metrics).await?.ok_or_else(|| {
        Error::DeadLetter(
            "no [database] url: without a database, dead letters live in the memory of the running engine".into(),
        )
    })?;
    let stores = PgIdempotencyStores::new(pool(database_url(config)?).await?);
    stores
        .prepare(idempotency_tables(&specs).iter().map(String::as_str))
        .await?;
    let engine = Arc::new(Engine::new(specs, dlq.clone(), &stores, metrics)?);
    Ok((engine, dlq))
}

/// `fraiseql idempotency prune`: old keys out of each table, in batches.
pub async fn prune_idempotency(
    config: &Config,
    tables: &[String],
    older_than: std::time::Duration,
    batch: usize,
) -> Result<Vec<(String, u64)>> {
    let pool = pool(database_url(config)?).await?;
    let mut out = Vec::new();
    for table in tables {
        let store = fraiseql_observers::PgIdempotencyStore::lazy(pool.clone(), table)?;
        out.push((table.clone(), store.prune(older_than, batch).await?));
    }
    Ok(out)
}

/// `fraiseql db install` / `uninstall`.
pub async fn install(config: &Config, schema: &Schema, uninstall: bool) -> Result<()> {
    let pool = pool(database_url(config)?).await?;
    if uninstall {
        capture::uninstall(&pool, schema).await
    } else {
        capture::install_with(&pool, schema, &CaptureOptions::from_config(config)).await
    }
}

fn idempotency_tables(specs: &[ObserverSpec]) -> Vec<String> {
    specs
        .iter()
        .filter_map(|s| match &s.checkpoint {
            fraiseql_observers::CheckpointStrategy::EffectivelyOnce { idempotency_table } => {
                Some(idempotency_table.clone())
            }
            fraiseql_observers::CheckpointStrategy::AtLeastOnce => None,
        })
        .collect()
}

/// The EffectivelyOnce stores of a message-transport backend: in PostgreSQL when a database
/// is configured (so they hold across instances), in process memory otherwise.
async fn shared_stores(
    config: &Config,
    specs: &[ObserverSpec],
) -> Result<Box<dyn IdempotencyStores>> {
    let tables = idempotency_tables(specs);
    match &config.database.url {
        Some(url) => {
            let stores = PgIdempotencyStores::new(pool(url).await?);
            stores.prepare(tables.iter().map(String::as_str)).await?;
            Ok(Box::new(stores))
        }
        None => {
            if !tables.is_empty() {
                tracing::warn!("[observers] no [database] url: EffectivelyOnce keys are kept per process, so several instances may each run an event once");
            }
            Ok(Box::new(MemoryIdempotencyStores::default()))
        }
    }
}

fn source_running(
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<()>>>,
    http: Option<HttpServer>,
) -> Running {
    Running {
        transport: Transport::Source {
            shutdown,
            tasks: Mutex::new(tasks),
        },
        http: Mutex::new(http),
    }
}

/// Consumes the durable JetStream consumer shared by every instance.
pub async fn start_nats(
    specs: Vec<ObserverSpec>,
    config: &Config,
    schema: &Schema,
    dlq: Arc<dyn DeadLetterQueue>,
    metrics: Arc<Metrics>,
    nats_metrics: NatsMetrics,
    http_port: Option<u16>,
) -> Result<(Arc<Engine>, Running)> {
    let stores = shared_stores(config, &specs).await?;
    let engine = Arc::new(Engine::new(
        specs,
        dlq.clone(),
        stores.as_ref(),
        metrics.clone(),
    )?);
    let client = nats::connect(&config.observers.nats).await?;
    let source = NatsSource::new(
        client.clone(),
        &config.observers.nats,
        nats_metrics.clone(),
        config.observers.max_concurrency,
    )
    .await?;
    let (shutdown, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if config.observers.run_bridge {
        let publisher = NatsPublisher::new(client, &config.observers.nats, nats_metrics);
        let name = config.observers.bridge.transport_name.clone();
        let forwarder = Forwarder::new(config, schema, Arc::new(publisher), &name, "nats");
        tasks.push(
            forwarder
                .start(dlq, metrics.clone(), stop_rx.clone())
                .await?,
        );
    }
    let http = serve_http(http_port, metrics, source.health()).await?;
    tasks.push(tokio::spawn(source.run(engine.clone(), stop_rx)));
    Ok((engine, source_running(shutdown, tasks, http)))
}

/// Reads the Redis Stream through the consumer group shared by every instance. With a
/// database, this instance also competes to forward the change log to the stream (one
/// forwarder is active at a time: the advisory lock of its cursor).
pub async fn start_redis(
    specs: Vec<ObserverSpec>,
    config: &Config,
    schema: &Schema,
    dlq: Arc<dyn DeadLetterQueue>,
    metrics: Arc<Metrics>,
    redis_metrics: RedisMetrics,
    http_port: Option<u16>,
) -> Result<(Arc<Engine>, Running)> {
    let url = config.observers.redis_url.as_deref().ok_or_else(|| {
        Error::Transport("redis backend requires observers.redis_url to be set".into())
    })?;
    let rc = &config.observers.redis;
    let stores = shared_stores(config, &specs).await?;
    let engine = Arc::new(Engine::new(
        specs,
        dlq.clone(),
        stores.as_ref(),
        metrics.clone(),
    )?);
    let source = RedisSource::connect(
        url,
        rc,
        redis_metrics.clone(),
        config.observers.max_concurrency,
    )
    .await?;
    tracing::info!(
        "[observers] transport: redis ({}, stream {}, group {})",
        mask_url(url),
        rc.stream,
        rc.group
    );
    let (shutdown, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    if config.database.url.is_some() {
        let conn = redis_transport::connect(url, std::time::Duration::from_secs(10)).await?;
        let publisher = RedisPublisher::new(conn, rc, redis_metrics);
        let forwarder = Forwarder::new(
            config,
            schema,
            Arc::new(publisher),
            &rc.forwarder_name,
            "redis",
        );
        tasks.push(
            forwarder
                .start(dlq, metrics.clone(), stop_rx.clone())
                .await?,
        );
    } else {
        tracing::warn!("[observers] no [database] url: nothing is forwarded to the Redis stream by this instance, and dead letters are kept in memory");
    }
    let http = serve_http(http_port, metrics, source.health()).await?;
    tasks.push(tokio::spawn(source.run(engine.clone(), stop_rx)));
    Ok((engine, source_running(shutdown, tasks, http)))
}

/// The PostgreSQL → transport forwarder (see `fraiseql_observers::bridge`): installs capture
/// notifying the bridge's channel, and forwards the change log under its own cursor.
struct Forwarder<'a> {
    config: &'a Config,
    schema: &'a Schema,
    publisher: Arc<dyn Publisher>,
    listener_id: String,
    target: &'static str,
}

impl<'a> Forwarder<'a> {
    fn new(
        config: &'a Config,
        schema: &'a Schema,
        publisher: Arc<dyn Publisher>,
        listener_id: &str,
        target: &'static str,
    ) -> Self {
        Forwarder {
            config,
            schema,
            publisher,
            listener_id: listener_id.to_owned(),
            target,
        }
    }

    async fn start(
        self,
        dlq: Arc<dyn DeadLetterQueue>,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Result<JoinHandle<Result<()>>> {
        let url = database_url(self.config)?;
        let bridge = &self.config.observers.bridge;
        if self.config.observers.auto_install {
            let options = CaptureOptions {
                notify_channel: bridge.notify_channel.clone(),
                skip_unchanged_updates: self.config.observers.postgres.skip_unchanged_updates,
                notify: true,
            };
            capture::install_with(&pool(url).await?, self.schema, &options).await?;
        }
        let specs =
            bridge::bridge_observers(self.schema, self.publisher.clone(), &self.listener_id);
        let engine = Engine::new(specs, dlq, &MemoryIdempotencyStores::default(), metrics)?;
        let options = bridge::bridge_options(self.config, &self.listener_id);
        let source = PostgresSource::connect(url, options)
            .await?
            .with_batch_publisher(self.publisher);
        tracing::info!(
            "[observers] bridge: postgres -> {} ({}, {} table(s))",
            self.target,
            self.listener_id,
            self.schema.entities().len()
        );
        Ok(tokio::spawn(source.run(Arc::new(engine), stop)))
    }
}

/// Installs capture if configured, connects the source, builds the engine with PostgreSQL
/// idempotency stores, and starts reading the change log.
pub async fn start_postgres(
    specs: Vec<ObserverSpec>,
    config: &Config,
    schema: &Schema,
    dlq: Arc<dyn DeadLetterQueue>,
    metrics: Arc<Metrics>,
    http_port: Option<u16>,
) -> Result<(Arc<Engine>, Running)> {
    let url = database_url(config)?;
    if config.observers.auto_install {
        install(config, schema, false).await?;
    }
    let source = PostgresSource::connect(url, PostgresOptions::from_config(config)).await?;
    let stores = PgIdempotencyStores::new(source.pool().clone());
    stores
        .prepare(idempotency_tables(&specs).iter().map(String::as_str))
        .await?;
    let engine = Arc::new(Engine::new(specs, dlq, &stores, metrics.clone())?);
    let health = source.health();
    let http = serve_http(http_port, metrics, health).await?;
    let (shutdown, stop_rx) = watch::channel(false);
    let tasks = vec![tokio::spawn(source.run(engine.clone(), stop_rx))];
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
    Ok((
        engine,
        Running {
            transport: Transport::Source {
                shutdown,
                tasks: Mutex::new(tasks),
            },
            http: Mutex::new(http),
        },
    ))
}
