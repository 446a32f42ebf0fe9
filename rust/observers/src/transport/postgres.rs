//! The `postgres` transport: reads the change log written by the capture triggers
//! ([`crate::capture`]) by cursor, wakes on `NOTIFY`, polls as a safety net, and acknowledges
//! (moves the cursor) only after the engine has finished every event of a batch.
//!
//! # Delivery: why no committed change is ever skipped
//!
//! Rows are read and the cursor is kept in `(txid, id)` order, where `txid` is the id of the
//! writing transaction (`pg_current_xact_id()`) and `id` the change-log sequence:
//!
//! ```sql
//! WHERE (txid, id) > ($last_txid, $last_id)
//!   AND txid < pg_snapshot_xmin(pg_current_snapshot())
//! ORDER BY txid, id LIMIT $batch
//! ```
//!
//! The classic hazard of a cursor over a sequence is the late commit: transaction A takes
//! `id = 10` and commits after transaction B, which took `id = 11`; a reader that saw 11 and
//! moved its cursor past it never sees 10. Here, the snapshot's `xmin` is the oldest
//! transaction id still running when the statement's snapshot was taken (or the next id to be
//! assigned if none is). So:
//! - every transaction with `txid < xmin` has finished: its rows are all visible (committed)
//!   or will never be (rolled back) — nothing more can appear below `xmin`;
//! - every transaction still running, or starting later, has `txid ≥ xmin` (ids are assigned
//!   in increasing order, and a transaction gets its id at its first write, i.e. no earlier
//!   than "now"), so it is not read yet and the cursor cannot pass it;
//! - `xmin` never decreases, so a range once complete stays complete.
//!
//! Hence the cursor only ever moves over ranges that are final, and a late commit is delivered
//! as soon as it commits (and the transactions before it have finished). The price: a long
//! transaction that writes anything holds back delivery of all later changes until it ends
//! (`lag_rows` in `/health` shows it). Read-only transactions have no id and hold nothing back.
//!
//! # Acknowledgement
//!
//! A batch's events run concurrently (up to `max_concurrency`; `1` keeps strict order); the
//! cursor row is upserted (never moved backwards) only after every [`Engine::process`] of the
//! batch has returned. A crash before that redelivers the batch: at-least-once, with
//! `EffectivelyOnce` observers deduplicating by event id (= the change-log id).
//!
//! # Several instances on one listener id
//!
//! One reader per `listener_id` is active at a time: the reader holds a session-level
//! `pg_try_advisory_lock(hashtext('fraiseql.listener'), hashtext(listener_id))` on its own
//! dedicated connection, and reads and moves the cursor on that same connection. The others
//! stay on standby and retry the lock every `poll_interval`; when the active process dies or
//! its connection drops, PostgreSQL releases the lock and a standby takes over from the stored
//! cursor. This was chosen over row-level claiming (`FOR UPDATE SKIP LOCKED` per batch) because
//! it keeps one totally ordered cursor per listener, needs no claim bookkeeping, and failover
//! is done by PostgreSQL itself. Horizontal scaling of the *work* is the NATS backend's job (a
//! bridge plus a shared durable consumer). A connection drop during a batch can let a standby
//! start on the same batch before the old reader notices: that is a redelivery, which
//! at-least-once allows. Session advisory locks need a session: point `database.url` at
//! PostgreSQL or a session-pooling proxy, not a transaction-pooling one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio::sync::{watch, Notify};

use crate::bridge::Publisher;
use crate::capture::{CHANGE_LOG_TABLE, CURSOR_TABLE};
use crate::config::{validate_sql_identifier, Config, DEFAULT_NOTIFY_CHANNEL};
use crate::engine::Engine;
use crate::error::{ConnectErrorKind, Error, Result};
use crate::event::{Event, EventKind};
use crate::metrics::Metrics;
use crate::retry::{Backoff, RetryPolicy};
use crate::status::HealthSource;
use crate::transport::process_guarded;

/// Counting more than this many pending rows for `/health` is not worth the scan.
const LAG_COUNT_CAP: i64 = 100_000;
/// How often the active reader counts its lag: at most once per poll interval, and not
/// more than once a second even when polling faster (the count reads up to the cap).
const LAG_EVERY: Duration = Duration::from_secs(1);
/// `/health` turns 503 when the active reader's cursor has not moved for this long while
/// changes are pending (a stuck batch, a transaction holding back `xmin`).
const STALL_AFTER: Duration = Duration::from_secs(60);
/// Reconnecting the reader and the LISTEN connection.
const RECONNECT: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(10));

/// How the source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Identifies the cursor; instances sharing it share the work (one active at a time).
    pub listener_id: String,
    /// The channel the capture triggers notify (`[observers] notify_channel`).
    pub notify_channel: String,
    /// Change-log rows read per batch (at least 1).
    pub batch_size: usize,
    /// Safety-net poll and standby lock-retry period.
    pub poll_interval: Duration,
    /// LISTEN for wake-ups; without, the change log is only polled.
    pub listen: bool,
    /// Events of a batch processed at once (at least 1).
    pub max_concurrency: usize,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            listener_id: "fraiseql".to_owned(),
            notify_channel: DEFAULT_NOTIFY_CHANNEL.to_owned(),
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            listen: true,
            max_concurrency: 256,
        }
    }
}

impl PostgresOptions {
    /// `[observers] notify_channel`, `max_concurrency` and `[observers.postgres]`.
    pub fn from_config(config: &Config) -> Self {
        let o = &config.observers;
        PostgresOptions {
            listener_id: o.postgres.listener_id.clone(),
            notify_channel: o.notify_channel.clone(),
            batch_size: o.postgres.batch_size.max(1),
            poll_interval: Duration::from_millis(o.postgres.poll_interval_ms.max(10)),
            listen: o.postgres.listen,
            max_concurrency: o.max_concurrency,
        }
    }
}

/// A position in the change log: the last acknowledged `(txid, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Cursor {
    txid: u64,
    id: i64,
}

const ROLE_STARTING: u8 = 0;
const ROLE_STANDBY: u8 = 1;
const ROLE_ACTIVE: u8 = 2;
const ROLE_RECONNECTING: u8 = 3;
const ROLE_STOPPED: u8 = 4;

/// Shared state behind `/health`.
struct SourceHealth {
    listener_id: String,
    listener_connected: AtomicBool,
    database_ok: AtomicBool,
    lag_rows: AtomicU64,
    skipped_rows: AtomicU64,
    delivered: AtomicU64,
    role: AtomicU8,
    /// Whether the reader LISTENs (else the listener connection is not part of health).
    listens: bool,
    /// When the cursor last moved or the reader was caught up (ms since `started`).
    progress_ms: AtomicU64,
    started: Instant,
}

impl SourceHealth {
    fn progressed(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.progress_ms.store(now, Ordering::Relaxed);
    }

    fn stalled(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let since = now.saturating_sub(self.progress_ms.load(Ordering::Relaxed));
        self.role.load(Ordering::Relaxed) == ROLE_ACTIVE
            && self.lag_rows.load(Ordering::Relaxed) > 0
            && Duration::from_millis(since) >= STALL_AFTER
    }

    fn connected(&self) -> bool {
        if self.listens {
            self.listener_connected.load(Ordering::Relaxed)
        } else {
            self.database_ok.load(Ordering::Relaxed)
        }
    }
}

impl HealthSource for SourceHealth {
    fn observers(&self) -> Value {
        let role = match self.role.load(Ordering::Relaxed) {
            ROLE_STANDBY => "standby",
            ROLE_ACTIVE => "active",
            ROLE_RECONNECTING => "reconnecting",
            ROLE_STOPPED => "stopped",
            _ => "starting",
        };
        json!({
            "transport": "postgres",
            "connected": self.connected(),
            "listening": self.listens,
            "lag_rows": self.lag_rows.load(Ordering::Relaxed),
            "stalled": self.stalled(),
            "listener_id": self.listener_id,
            "role": role,
            "events_delivered": self.delivered.load(Ordering::Relaxed),
            "skipped_rows": self.skipped_rows.load(Ordering::Relaxed),
        })
    }

    fn databases(&self) -> Option<Value> {
        let status = if self.database_ok.load(Ordering::Relaxed) {
            "ok"
        } else {
            "down"
        };
        Some(json!({ "primary": { "status": status } }))
    }

    fn healthy(&self) -> bool {
        self.connected() && self.database_ok.load(Ordering::Relaxed) && !self.stalled()
    }
}

/// The change-log reader. See the module documentation for the delivery argument.
pub struct PostgresSource {
    pool: PgPool,
    connect_options: PgConnectOptions,
    options: PostgresOptions,
    health: Arc<SourceHealth>,
    batch_publisher: Option<Arc<dyn Publisher>>,
}

impl PostgresSource {
    /// Connects a pool of its own ([`crate::runtime::connect_pool`]) and checks that the
    /// change-capture tables exist.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<PostgresSource> {
        let pool = crate::runtime::connect_pool(url, options.max_concurrency).await?;
        PostgresSource::new(pool, options).await
    }

    /// A source over `pool` (the process's one pool: the reader and the LISTEN connection are
    /// dedicated connections made with its options). Checks that the change-capture tables
    /// exist.
    pub async fn new(pool: PgPool, options: PostgresOptions) -> Result<PostgresSource> {
        let mut options = options;
        validate_sql_identifier(&options.notify_channel).map_err(|e| {
            Error::connect(
                ConnectErrorKind::InvalidSettings,
                format!("observers.notify_channel: {e}"),
            )
        })?;
        if options.listener_id.is_empty() {
            return Err(Error::connect(
                ConnectErrorKind::InvalidSettings,
                "listener id must not be empty",
            ));
        }
        options.batch_size = options.batch_size.max(1);
        options.max_concurrency = options.max_concurrency.max(1);
        options.poll_interval = options.poll_interval.max(Duration::from_millis(10));
        let connect_options = (*pool.connect_options()).clone();
        let shown = format!(
            "{}:{}/{}",
            connect_options.get_host(),
            connect_options.get_port(),
            connect_options.get_database().unwrap_or_default()
        );
        let (log, cursor): (bool, bool) =
            sqlx::query_as("SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL")
                .bind(CHANGE_LOG_TABLE)
                .bind(CURSOR_TABLE)
                .fetch_one(&pool)
                .await
                .map_err(|e| crate::runtime::postgres_error(&shown, &e))?;
        if !(log && cursor) {
            let missing = if log { CURSOR_TABLE } else { CHANGE_LOG_TABLE };
            return Err(Error::connect(
                ConnectErrorKind::NotSetUp,
                format!(
                    "the change-capture table `{missing}` does not exist in the database at \
                     {shown}: run `fraiseql db install` (or enable [observers] auto_install) \
                     first"
                ),
            ));
        }
        let health = Arc::new(SourceHealth {
            listener_id: options.listener_id.clone(),
            listener_connected: AtomicBool::new(false),
            database_ok: AtomicBool::new(true),
            lag_rows: AtomicU64::new(0),
            skipped_rows: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            role: AtomicU8::new(ROLE_STARTING),
            listens: options.listen,
            progress_ms: AtomicU64::new(0),
            started: Instant::now(),
        });
        Ok(PostgresSource {
            pool,
            connect_options,
            options,
            health,
            batch_publisher: None,
        })
    }

    /// Makes this source a forwarder's: each batch is published through `publisher` first
    /// ([`Publisher::publish_batch`]), and only what it could not confirm reaches the engine,
    /// whose observers publish it again with retries and dead-letter it if that fails too.
    pub fn with_batch_publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.batch_publisher = Some(publisher);
        self
    }

    /// The pool (for idempotency stores, the DLQ, installs). Not used by the reader itself,
    /// which has dedicated connections.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn options(&self) -> &PostgresOptions {
        &self.options
    }

    /// `/health` view: unhealthy while the LISTEN connection or the database is down.
    pub fn health(&self) -> Arc<dyn HealthSource> {
        self.health.clone()
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped); finishes the batch in
    /// flight and acknowledges it, then returns. Connection failures are retried with backoff;
    /// they never end the run.
    pub async fn run(self, engine: Arc<Engine>, shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut shutdown = shutdown;
        let wake = Arc::new(Notify::new());
        let listener = self.options.listen.then(|| {
            tokio::spawn(listen_loop(
                self.connect_options.clone(),
                self.options.notify_channel.clone(),
                wake.clone(),
                self.health.clone(),
            ))
        });
        let result = self.read_loop(&engine, &mut shutdown, &wake).await;
        if let Some(listener) = listener {
            listener.abort();
            let _ = listener.await;
        }
        self.health
            .listener_connected
            .store(false, Ordering::Relaxed);
        self.health.role.store(ROLE_STOPPED, Ordering::Relaxed);
        result
    }

    async fn read_loop(
        &self,
        engine: &Arc<Engine>,
        shutdown: &mut watch::Receiver<bool>,
        wake: &Notify,
    ) -> Result<()> {
        let mut backoff = Backoff::new(RECONNECT);
        loop {
            if is_shutdown(shutdown) {
                return Ok(());
            }
            // The reader's session writes only its cursor, and a cursor update lost in a crash
            // just redelivers a batch (at-least-once; EffectivelyOnce keys are committed
            // durably elsewhere). So its commits need not wait for the WAL flush, which
            // would otherwise add a disk sync to every batch's latency.
            let reader_options = self
                .connect_options
                .clone()
                .options([("synchronous_commit", "off")]);
            let mut conn = match PgConnection::connect_with(&reader_options).await {
                Ok(conn) => conn,
                Err(e) => {
                    self.health.database_ok.store(false, Ordering::Relaxed);
                    self.health.role.store(ROLE_RECONNECTING, Ordering::Relaxed);
                    tracing::warn!("postgres source: cannot connect: {e}; retrying");
                    if sleep_or_shutdown(shutdown, backoff.next_delay()).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            self.health.database_ok.store(true, Ordering::Relaxed);
            match self
                .serve(&mut conn, engine, shutdown, wake, &mut backoff)
                .await
            {
                Ok(()) => {
                    // Closing the session releases the advisory lock at once.
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(e) => {
                    self.health.database_ok.store(false, Ordering::Relaxed);
                    self.health.role.store(ROLE_RECONNECTING, Ordering::Relaxed);
                    tracing::warn!(
                        "postgres source `{}`: {e}; reconnecting",
                        self.options.listener_id
                    );
                    drop(conn);
                    if sleep_or_shutdown(shutdown, backoff.next_delay()).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One session: become the active reader, then read, process and acknowledge until
    /// shutdown (Ok) or a database error (Err: the caller reconnects).
    async fn serve(
        &self,
        conn: &mut PgConnection,
        engine: &Arc<Engine>,
        shutdown: &mut watch::Receiver<bool>,
        wake: &Notify,
        backoff: &mut Backoff,
    ) -> std::result::Result<(), sqlx::Error> {
        let o = &self.options;
        let mut announced = false;
        loop {
            let locked: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtext('fraiseql.listener'), hashtext($1))",
            )
            .bind(&o.listener_id)
            .fetch_one(&mut *conn)
            .await?;
            self.health.database_ok.store(true, Ordering::Relaxed);
            backoff.reset();
            if locked {
                break;
            }
            if !announced {
                tracing::info!(
                    "postgres source `{}`: another instance is reading; standing by",
                    o.listener_id
                );
                announced = true;
            }
            self.health.role.store(ROLE_STANDBY, Ordering::Relaxed);
            let cursor = load_cursor(conn, &o.listener_id).await?;
            self.store_lag(conn, cursor, engine.metrics()).await?;
            if sleep_or_shutdown(shutdown, o.poll_interval).await {
                return Ok(());
            }
        }
        self.health.role.store(ROLE_ACTIVE, Ordering::Relaxed);
        let mut cursor = load_cursor(conn, &o.listener_id).await?;
        tracing::info!(
            "postgres source `{}`: reading the change log after ({}, {})",
            o.listener_id,
            cursor.txid,
            cursor.id
        );
        let mut lag_checked: Option<Instant> = None;
        let mut prefetched: Option<Vec<PgRow>> = None;
        loop {
            if is_shutdown(shutdown) {
                return Ok(());
            }
            let rows = match prefetched.take() {
                Some(rows) => rows,
                None => fetch_batch(conn, cursor, o.batch_size).await?,
            };
            let full = rows.len() == o.batch_size;
            if let Some(last) = rows.last() {
                let last = row_cursor(last)?;
                let events = self.decode_batch(engine, &rows).await;
                drop(rows);
                let n = events.len() as u64;
                if full {
                    // A backlog: the next batch is read while this one is processed (the
                    // engine does not use this connection). The cursor still moves only
                    // after this batch is done; a prefetched batch dropped on shutdown or
                    // error is simply read again.
                    let (_, next) = tokio::join!(
                        self.deliver(engine, events),
                        fetch_batch(conn, last, o.batch_size)
                    );
                    save_cursor(conn, &o.listener_id, last).await?;
                    prefetched = Some(next?);
                } else {
                    self.deliver(engine, events).await;
                    save_cursor(conn, &o.listener_id, last).await?;
                }
                cursor = last;
                self.health.delivered.fetch_add(n, Ordering::Relaxed);
                self.health.progressed();
                engine.metrics().source_batches.inc();
            }
            if lag_checked.is_none_or(|t| t.elapsed() >= o.poll_interval.max(LAG_EVERY)) {
                self.store_lag(conn, cursor, engine.metrics()).await?;
                lag_checked = Some(Instant::now());
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                () = wake.notified() => {}
                () = tokio::time::sleep(o.poll_interval) => {}
            }
        }
    }

    /// A forwarder's batch goes to its publisher first, many publishes in flight; only the
    /// events it could not confirm run through the engine (retries, dead-letter queue).
    async fn deliver(&self, engine: &Engine, events: Vec<Event>) {
        let batch = match &self.batch_publisher {
            Some(publisher) => publisher.publish_batch(&events).await,
            None => None,
        };
        let (events, failed_attempts) = match batch {
            // The batch publish was their first attempt.
            Some(unconfirmed) => (
                events
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| unconfirmed.binary_search(i).is_ok())
                    .map(|(_, event)| event)
                    .collect(),
                1,
            ),
            None => (events, 0),
        };
        process_batch(
            engine,
            events,
            self.options.max_concurrency,
            failed_attempts,
        )
        .await;
    }

    /// Rows after the cursor (counted up to a cap) and the age of the oldest of them, into
    /// `/health` and the lag metrics.
    async fn store_lag(
        &self,
        conn: &mut PgConnection,
        cursor: Cursor,
        metrics: &Metrics,
    ) -> std::result::Result<(), sqlx::Error> {
        let (rows, age): (i64, Option<f64>) = sqlx::query_as(&format!(
            "SELECT count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(committed_at))::float8 \
             FROM (SELECT committed_at FROM {CHANGE_LOG_TABLE} \
                   WHERE (txid, id) > ($1::text::xid8, $2) ORDER BY txid, id \
                   LIMIT {LAG_COUNT_CAP}) AS pending"
        ))
        .bind(cursor.txid.to_string())
        .bind(cursor.id)
        .fetch_one(&mut *conn)
        .await?;
        let rows = rows.max(0);
        self.health.lag_rows.store(rows as u64, Ordering::Relaxed);
        if rows == 0 {
            self.health.progressed();
        }
        metrics.changelog_lag_rows.set(rows);
        metrics
            .changelog_lag_seconds
            .set(age.unwrap_or(0.0).max(0.0));
        Ok(())
    }

    /// Rows that cannot become an event are dead-lettered with the reason and counted (the
    /// cursor still moves past them): one bad row never stalls the listener, and none is
    /// dropped silently.
    async fn decode_batch(&self, engine: &Engine, rows: &[PgRow]) -> Vec<Event> {
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            match decode_event(row) {
                Ok(event) => events.push(event),
                Err(reason) => {
                    self.health.skipped_rows.fetch_add(1, Ordering::Relaxed);
                    let id = row.try_get::<i64, _>("id").unwrap_or_default();
                    let source = format!("postgres:{}", self.options.listener_id);
                    engine
                        .dead_letter_undecodable(&source, id.to_string(), raw_row(row), &reason)
                        .await;
                }
            }
        }
        events
    }
}

/// What can be read of a change-log row, column by column, for the dead-letter entry.
fn raw_row(row: &PgRow) -> Value {
    let mut out = serde_json::Map::new();
    for column in [
        "id",
        "txid_text",
        "entity",
        "event",
        "table_name",
        "committed_at",
    ] {
        let value = match row.try_get::<Option<String>, _>(column) {
            Ok(v) => v.map_or(Value::Null, Value::String),
            Err(_) => row
                .try_get::<Option<i64>, _>(column)
                .ok()
                .flatten()
                .map_or(Value::Null, Value::from),
        };
        out.insert(column.to_owned(), value);
    }
    for column in ["new", "old"] {
        let value = row.try_get::<Option<Value>, _>(column).ok().flatten();
        out.insert(column.to_owned(), value.unwrap_or(Value::Null));
    }
    Value::Object(out)
}

/// Keeps one LISTEN connection up and turns notifications into wake-ups. Any (re)connect
/// also wakes the reader, since notifications sent while disconnected are lost.
async fn listen_loop(
    options: PgConnectOptions,
    channel: String,
    wake: Arc<Notify>,
    health: Arc<SourceHealth>,
) {
    let mut backoff = Backoff::new(RECONNECT);
    loop {
        match connect_listener(&options, &channel).await {
            Ok(mut listener) => {
                health.listener_connected.store(true, Ordering::Relaxed);
                backoff.reset();
                wake.notify_one();
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => wake.notify_one(),
                        // Lost and re-established (eager reconnect): catch up.
                        Ok(None) => wake.notify_one(),
                        Err(e) => {
                            tracing::warn!("postgres source: LISTEN connection failed: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("postgres source: cannot LISTEN on `{channel}`: {e}"),
        }
        health.listener_connected.store(false, Ordering::Relaxed);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn connect_listener(
    options: &PgConnectOptions,
    channel: &str,
) -> std::result::Result<PgListener, sqlx::Error> {
    // A one-connection pool of its own, as `PgListener::connect` builds: it only serves
    // reconnects.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// Processes the events concurrently (bounded) and returns when every one has finished.
/// `failed_attempts`: attempts each event's actions already made elsewhere.
async fn process_batch(
    engine: &Engine,
    events: Vec<Event>,
    max_concurrency: usize,
    failed_attempts: u32,
) {
    futures::stream::iter(events)
        .for_each_concurrent(max_concurrency, |event| async move {
            process_guarded(engine, &event, failed_attempts, "postgres source").await;
        })
        .await;
}

fn batch_sql() -> String {
    format!(
        // `txid_text`, not `txid`: ORDER BY resolves a name to an output column first, and
        // ordering by the text would put txid 1000 before 999 (and skip 999's rows when the
        // batch limit cuts between them).
        "SELECT id, txid::text AS txid_text, entity, event, table_name, new, old, \
         to_char(committed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS committed_at \
         FROM {CHANGE_LOG_TABLE} \
         WHERE (txid, id) > ($1::text::xid8, $2) \
           AND txid < (SELECT pg_snapshot_xmin(pg_current_snapshot())) \
         ORDER BY {CHANGE_LOG_TABLE}.txid, {CHANGE_LOG_TABLE}.id \
         LIMIT $3"
    )
}

async fn fetch_batch(
    conn: &mut PgConnection,
    after: Cursor,
    limit: usize,
) -> std::result::Result<Vec<PgRow>, sqlx::Error> {
    sqlx::query(&batch_sql())
        .bind(after.txid.to_string())
        .bind(after.id)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await
}

fn row_cursor(row: &PgRow) -> std::result::Result<Cursor, sqlx::Error> {
    let id: i64 = row.try_get("id")?;
    let txid: String = row.try_get("txid_text")?;
    let txid = txid.parse().map_err(|e| sqlx::Error::ColumnDecode {
        index: "txid_text".into(),
        source: Box::new(e),
    })?;
    Ok(Cursor { txid, id })
}

fn decode_event(row: &PgRow) -> std::result::Result<Event, String> {
    let text = |name: &str| -> std::result::Result<String, String> {
        row.try_get::<Option<String>, _>(name)
            .map_err(|e| format!("column {name}: {e}"))?
            .ok_or_else(|| format!("column {name} is NULL"))
    };
    let json = |name: &str| -> std::result::Result<Option<Value>, String> {
        row.try_get::<Option<Value>, _>(name)
            .map_err(|e| format!("column {name}: {e}"))
    };
    let id: i64 = row.try_get("id").map_err(|e| format!("column id: {e}"))?;
    let kind: EventKind = text("event")?.parse()?;
    Ok(Event {
        id: id.to_string(),
        entity: text("entity")?,
        event: kind,
        table: text("table_name")?,
        timestamp: text("committed_at")?,
        new: json("new")?,
        old: json("old")?,
    })
}

async fn load_cursor(
    conn: &mut PgConnection,
    listener_id: &str,
) -> std::result::Result<Cursor, sqlx::Error> {
    let row: Option<(String, i64)> = sqlx::query_as(&format!(
        "SELECT last_txid::text, last_id FROM {CURSOR_TABLE} WHERE listener_id = $1"
    ))
    .bind(listener_id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        None => Ok(Cursor::default()),
        Some((txid, id)) => Ok(Cursor {
            txid: txid.parse().map_err(|e| sqlx::Error::ColumnDecode {
                index: "last_txid".into(),
                source: Box::new(e),
            })?,
            id,
        }),
    }
}

/// Upserts the cursor; never moves it backwards.
async fn save_cursor(
    conn: &mut PgConnection,
    listener_id: &str,
    cursor: Cursor,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {CURSOR_TABLE} AS c (listener_id, last_txid, last_id, updated_at) \
         VALUES ($1, $2::text::xid8, $3, now()) \
         ON CONFLICT (listener_id) DO UPDATE \
         SET last_txid = EXCLUDED.last_txid, last_id = EXCLUDED.last_id, updated_at = EXCLUDED.updated_at \
         WHERE (c.last_txid, c.last_id) < (EXCLUDED.last_txid, EXCLUDED.last_id)"
    ))
    .bind(listener_id)
    .bind(cursor.txid.to_string())
    .bind(cursor.id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn is_shutdown(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Sleeps `delay` unless shutdown comes first; returns true on shutdown.
async fn sleep_or_shutdown(shutdown: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    if is_shutdown(shutdown) {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_query_reads_only_below_the_snapshot_xmin() {
        let sql = batch_sql();
        assert!(sql.contains("txid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))"));
        assert!(sql.contains("ORDER BY fraiseql_change_log.txid, fraiseql_change_log.id"));
        assert!(
            sql.contains("txid::text AS txid_text"),
            "never shadow the txid column"
        );
    }
}
