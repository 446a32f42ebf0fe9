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
//! The source is driven by the one delivery loop ([`delivery::run`]): a batch's events run
//! concurrently (up to `max_concurrency`; `1` keeps strict order), the next batch is read
//! while one is processed, and the cursor row is upserted (never moved backwards) by the
//! cursor store (`CursorStore`) only after every event of the batch, and of every batch before it, is done.
//! An event whose dead letter could not be stored rewinds the reader to the stored cursor. A
//! crash before the upsert redelivers the batch: at-least-once, with `EffectivelyOnce`
//! observers deduplicating by event id (= the change-log id).
//!
//! # Several instances on one listener id
//!
//! One reader per `listener_id` is active at a time: the reader holds a session-level
//! `pg_try_advisory_lock(hashtext('fraiseql.listener'), hashtext(listener_id))` on its own
//! dedicated connection, and reads on it; the cursor is stored on a second connection of its
//! own, so that it can move while the reader waits for changes (safe: it never moves
//! backwards, and only over rows this instance finished). The others
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

use async_trait::async_trait;
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio::sync::{watch, Notify};

use crate::capture::{CHANGE_LOG_TABLE, CURSOR_TABLE};
use crate::config::{validate_sql_identifier, Config, DEFAULT_NOTIFY_CHANNEL};
use crate::engine::Engine;
use crate::error::{ConnectErrorKind, Error, Result};
use crate::event::{Event, EventKind};
use crate::metrics::Metrics;
use crate::retry::{Backoff, RetryPolicy};
use crate::status::HealthSource;
use crate::transport::delivery::{
    self, sleep_or_stop, Committer, Delivery, Fetch, Payload, Settled, Source, Undecodable,
};
use crate::transport::ledger::Ledger;
use crate::transport::Publisher;

/// Counting more than this many pending rows for `/health` is not worth the scan.
const LAG_COUNT_CAP: i64 = 100_000;
/// How often the active reader counts its lag: at most once per poll interval, and not
/// more than once a second even when polling faster (the count reads up to the cap).
const LAG_EVERY: Duration = Duration::from_secs(1);
/// How often the active reader deletes consumed change-log rows and keeps its cursor alive.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Change-log rows deleted per statement while pruning.
const PRUNE_BATCH: i64 = 10_000;
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
    /// Consumed rows are deleted below the slowest cursor that moved (or was kept alive by a
    /// running reader) within this long.
    pub retention: Duration,
    /// Delivery held back this long is reported with what holds it, and `/health` turns 503
    /// when the cursor has not moved for this long while changes are pending.
    pub stall_after: Duration,
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
            retention: Duration::from_secs(7 * 86_400),
            stall_after: Duration::from_secs(30),
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
            retention: o.postgres.retention,
            stall_after: Duration::from_secs(o.postgres.stall_warning_secs.max(1)),
        }
    }
}

/// A position in the change log: the last acknowledged `(txid, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct Cursor {
    txid: u64,
    id: i64,
}

/// `txid:id`, as the delivery ledger keeps it.
impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.txid, self.id)
    }
}

impl Cursor {
    fn parse(text: &str) -> Option<Cursor> {
        let (txid, id) = text.split_once(':')?;
        Some(Cursor {
            txid: txid.parse().ok()?,
            id: id.parse().ok()?,
        })
    }
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
    stall_after: Duration,
    /// What holds delivery back, when it is behind by more than `stall_after`.
    held_back_by: std::sync::Mutex<Option<Value>>,
    pruned: AtomicU64,
    /// Whether `lag_rows` has been read at least once.
    lag_known: AtomicBool,
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
            && Duration::from_millis(since) >= self.stall_after
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
            "held_back_by": self.held_back_by.lock().expect("health lock").clone(),
            "pruned_rows": self.pruned.load(Ordering::Relaxed),
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
    /// The process's pool: pruning and the stall diagnosis.
    pool: PgPool,
    connect_options: PgConnectOptions,
    options: PostgresOptions,
    health: Arc<SourceHealth>,
    batch_publisher: Option<Arc<dyn Publisher>>,
    /// The cursor stored last, shared with the committer: where a rewind reads again from.
    committed: Arc<std::sync::Mutex<Cursor>>,
    /// Where it records how far it has handed changes out (none for a forwarder: nothing of
    /// the user's runs in it).
    ledger: Option<Arc<Ledger>>,
    reader: Reader,
}

/// The reading side's state.
#[derive(Default)]
struct Reader {
    /// The reader's session; it holds the advisory lock while active.
    conn: Option<PgConnection>,
    active: bool,
    announced_standby: bool,
    /// Where the next batch starts (ahead of the committed cursor while batches are read
    /// ahead).
    read_after: Cursor,
    /// The last batch was not full: wait for a wake-up before reading again.
    caught_up: bool,
    /// Changes in this range were handed out by a run that did not end cleanly: suspect.
    suspect: Option<(Cursor, Cursor)>,
    /// Where the batch handed last started: it may still be under way with the next.
    previous_start: Option<Cursor>,
    /// The ledger was read: on the first activation only, since after a lost session what
    /// it holds is this run's own range, not a dead run's.
    ledger_read: bool,
    lag_checked: Option<Instant>,
    pruned_at: Option<Instant>,
    /// A prune still running (pruning never blocks reading).
    pruning: Option<tokio::task::JoinHandle<()>>,
    wake: Arc<Notify>,
    listener: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<Arc<Metrics>>,
}

impl PostgresSource {
    /// Connects a pool of its own ([`crate::database::connect_pool`]) and checks that the
    /// change-capture tables exist.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<PostgresSource> {
        let pool = crate::database::connect_pool(url, options.max_concurrency).await?;
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
        let (log, cursor, current): (bool, bool, bool) = sqlx::query_as(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, \
             (SELECT count(*) = 2 FROM pg_attribute WHERE attrelid = to_regclass($1) \
                     AND attname IN ('backfill', 'traceparent') AND NOT attisdropped)",
        )
        .bind(CHANGE_LOG_TABLE)
        .bind(CURSOR_TABLE)
        .fetch_one(&pool)
        .await
        .map_err(|e| crate::database::postgres_error(&shown, &e))?;
        if log && cursor && !current {
            return Err(Error::connect(
                ConnectErrorKind::NotSetUp,
                format!(
                    "the change log in the database at {shown} is from an earlier version: run \
                     `fraiseql db install` (or enable [observers] auto_install) to update it"
                ),
            ));
        }
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
            stall_after: options.stall_after,
            held_back_by: std::sync::Mutex::new(None),
            pruned: AtomicU64::new(0),
            lag_known: AtomicBool::new(false),
        });
        let ledger =
            Ledger::open(pool.clone(), format!("postgres:{}", options.listener_id)).await?;
        Ok(PostgresSource {
            pool,
            connect_options,
            options,
            health,
            batch_publisher: None,
            committed: Arc::default(),
            ledger: Some(Arc::new(ledger)),
            reader: Reader::default(),
        })
    }

    /// Makes this source a forwarder's: each batch is published through `publisher` first
    /// ([`Publisher::publish_batch`]), and only what it could not confirm reaches the engine,
    /// whose observers publish it again with retries and dead-letter it if that fails too.
    pub fn with_batch_publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.batch_publisher = Some(publisher);
        self.ledger = None;
        self
    }

    /// `/health` view: unhealthy while the LISTEN connection or the database is down.
    pub fn health(&self) -> Arc<dyn HealthSource> {
        self.health.clone()
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped); finishes the events in
    /// flight and stores the cursor after them, then returns. Connection failures are retried
    /// with backoff; they never end the run.
    pub async fn run(self, engine: Arc<Engine>, shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut source = self;
        source.reader.metrics = Some(engine.metrics().clone());
        if source.options.listen {
            source.reader.listener = Some(tokio::spawn(listen_loop(
                source.connect_options.clone(),
                source.options.notify_channel.clone(),
                source.reader.wake.clone(),
                source.health.clone(),
            )));
        }
        let max_concurrency = source.options.max_concurrency;
        delivery::run(source, engine, max_concurrency, shutdown).await
    }

    /// Whether `listener_id` has read the change log before and has changes left in it:
    /// what trigger capture captured before a switch to logical capture.
    pub async fn pending_after_switch(pool: &PgPool, listener_id: &str) -> Result<bool> {
        let exists: bool = sqlx::query_scalar(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
        )
        .bind(CHANGE_LOG_TABLE)
        .bind(CURSOR_TABLE)
        .fetch_one(pool)
        .await
        .map_err(|e| Error::Transport(format!("looking for the change log: {e}")))?;
        if !exists {
            return Ok(false);
        }
        sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {CHANGE_LOG_TABLE} l JOIN {CURSOR_TABLE} c \
                            ON c.listener_id = $1 \
                            WHERE (l.txid, l.id) > (c.last_txid, c.last_id))"
        ))
        .bind(listener_id)
        .fetch_one(pool)
        .await
        .map_err(|e| Error::Transport(format!("reading the change log: {e}")))
    }

    /// Runs until the change log holds nothing more for this listener (read by this instance,
    /// or by the active one while this one stands by), or `shutdown`.
    pub async fn drain(
        self,
        engine: Arc<Engine>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let health = self.health.clone();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(self.run(engine, stop_rx));
        loop {
            let drained = health.lag_known.load(Ordering::Relaxed)
                && health.lag_rows.load(Ordering::Relaxed) == 0;
            if drained || *shutdown.borrow() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                changed = shutdown.changed() => if changed.is_err() { break },
            }
        }
        let _ = stop.send(true);
        task.await
            .map_err(|e| Error::Transport(format!("draining the change log: {e}")))?
    }

    fn metrics(&self) -> &Metrics {
        self.reader
            .metrics
            .as_deref()
            .expect("set before the source runs")
    }

    /// The reader session, connected (and the cursor loaded) if it was not.
    async fn session(&mut self) -> std::result::Result<&mut PgConnection, sqlx::Error> {
        if self.reader.conn.is_none() {
            // The reader's session writes nothing that needs the WAL flush (the cursor is
            // stored by the committer), so its commits need not wait for one.
            let reader_options = self
                .connect_options
                .clone()
                .options([("synchronous_commit", "off")]);
            match PgConnection::connect_with(&reader_options).await {
                Ok(conn) => self.reader.conn = Some(conn),
                Err(e) => {
                    self.lost();
                    return Err(e);
                }
            }
            self.health.database_ok.store(true, Ordering::Relaxed);
            self.reader.active = false;
        }
        Ok(self.reader.conn.as_mut().expect("just connected"))
    }

    /// The reader session failed: reconnect (and take the lock again) on the next fetch.
    fn lost(&mut self) {
        self.reader.conn = None;
        self.reader.active = false;
        self.health.database_ok.store(false, Ordering::Relaxed);
        self.health.role.store(ROLE_RECONNECTING, Ordering::Relaxed);
    }

    /// Tries to become the active reader. False: another instance reads; this one stands by.
    async fn take_lock(&mut self) -> std::result::Result<bool, sqlx::Error> {
        let listener_id = self.options.listener_id.clone();
        let conn = self.session().await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtext('fraiseql.listener'), hashtext($1))",
        )
        .bind(&listener_id)
        .fetch_one(&mut *conn)
        .await?;
        let cursor = load_cursor(conn, &listener_id).await?;
        *self.committed.lock().expect("cursor lock") = cursor;
        if locked {
            self.reader.active = true;
            self.reader.read_after = cursor;
            self.reader.caught_up = false;
            if !std::mem::replace(&mut self.reader.ledger_read, true) {
                self.reader.suspect = self.handed_before(cursor).await;
            }
            self.health.role.store(ROLE_ACTIVE, Ordering::Relaxed);
            tracing::info!(
                "postgres source `{listener_id}`: reading the change log after ({}, {})",
                cursor.txid,
                cursor.id
            );
        } else {
            if !self.reader.announced_standby {
                tracing::info!(
                    "postgres source `{listener_id}`: another instance is reading; standing by"
                );
                self.reader.announced_standby = true;
            }
            self.health.role.store(ROLE_STANDBY, Ordering::Relaxed);
        }
        Ok(locked)
    }

    /// The changes past `cursor` that a run that did not end cleanly may have left under way.
    async fn handed_before(&self, cursor: Cursor) -> Option<(Cursor, Cursor)> {
        let ledger = self.ledger.as_ref()?;
        let (from, to) = match ledger.handed_before().await {
            Ok(handed) => handed?,
            Err(e) => {
                tracing::warn!("postgres source `{}`: {e}", self.options.listener_id);
                return None;
            }
        };
        let (from, to) = (Cursor::parse(&from)?, Cursor::parse(&to)?);
        if to <= cursor {
            return None;
        }
        tracing::warn!(
            "postgres source `{}`: the last run stopped without finishing the changes from \
             {from} to {to}; each is run alone, and one that stops the engine again and again \
             is dead-lettered",
            self.options.listener_id,
        );
        Some((from, to))
    }

    /// Records in the ledger the changes that may be under way once the batch from `first` to
    /// `end` is handed out, before it is.
    async fn record_handed(&mut self, first: Cursor, end: Cursor) -> Result<()> {
        let from = self.reader.previous_start.map_or(first, |p| p.min(first));
        if let Some(ledger) = &self.ledger {
            ledger.handed(&from.to_string(), &end.to_string()).await?;
        }
        self.reader.previous_start = Some(first);
        if self.reader.suspect.is_some_and(|(_, to)| to <= end) {
            self.reader.suspect = None;
        }
        Ok(())
    }

    /// One fetch: see [`Source::fetch`].
    async fn read(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> std::result::Result<Fetch<PgDelivery, BatchEnd>, sqlx::Error> {
        if !self.reader.active && !self.take_lock().await? {
            self.store_lag().await?;
            sleep_or_stop(shutdown, self.options.poll_interval).await;
            return Ok(Fetch::Idle);
        }
        if self.reader.caught_up && self.wait_for_changes(shutdown).await {
            return Ok(Fetch::Idle);
        }
        let (after, limit) = (self.reader.read_after, self.options.batch_size);
        let rows = fetch_batch(self.session().await?, after, limit).await?;
        self.reader.caught_up = rows.len() < limit;
        let due = self
            .reader
            .lag_checked
            .is_none_or(|t| t.elapsed() >= self.options.poll_interval.max(LAG_EVERY));
        if due {
            self.store_lag().await?;
            self.reader.lag_checked = Some(Instant::now());
        }
        self.prune_if_due();
        let Some(last) = rows.last() else {
            return Ok(Fetch::Idle);
        };
        let end = row_cursor(last)?;
        let first = row_cursor(&rows[0])?;
        let deliveries = self.decode_batch(&rows);
        if let Err(e) = self.record_handed(first, end).await {
            tracing::warn!("postgres source `{}`: {e}", self.options.listener_id);
            return Ok(Fetch::Idle);
        }
        self.reader.read_after = end;
        drop(rows);
        let events = deliveries.len();
        let deliveries = self.publish_first(deliveries).await;
        Ok(Fetch::Batch(
            deliveries,
            BatchEnd {
                cursor: end,
                events: events as u64,
            },
        ))
    }

    /// Waits for a NOTIFY (or the poll interval). True on shutdown.
    async fn wait_for_changes(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            () = self.reader.wake.notified() => false,
            stop = sleep_or_stop(shutdown, self.options.poll_interval) => stop,
        }
    }

    async fn publish_first(&self, deliveries: Vec<PgDelivery>) -> Vec<PgDelivery> {
        match &self.batch_publisher {
            Some(publisher) => publish_first(publisher.as_ref(), deliveries).await,
            None => deliveries,
        }
    }

    /// Rows after the committed cursor (counted up to a cap) and the age of the oldest of
    /// them, into `/health` and the lag metrics.
    async fn store_lag(&mut self) -> std::result::Result<(), sqlx::Error> {
        let cursor = *self.committed.lock().expect("cursor lock");
        let (rows, age): (i64, Option<f64>) = sqlx::query_as(&format!(
            "SELECT count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(committed_at))::float8 \
             FROM (SELECT committed_at FROM {CHANGE_LOG_TABLE} \
                   WHERE (txid, id) > ($1::text::xid8, $2) ORDER BY txid, id \
                   LIMIT {LAG_COUNT_CAP}) AS pending"
        ))
        .bind(cursor.txid.to_string())
        .bind(cursor.id)
        .fetch_one(self.session().await?)
        .await?;
        let rows = rows.max(0);
        self.health.lag_rows.store(rows as u64, Ordering::Relaxed);
        self.health.lag_known.store(true, Ordering::Relaxed);
        if rows == 0 {
            self.health.progressed();
        }
        let age = age.unwrap_or(0.0).max(0.0);
        let metrics = self.metrics();
        metrics.changelog_lag_rows.set(rows);
        metrics.changelog_lag_seconds.set(age);
        metrics.source_stalled.set(i64::from(self.health.stalled()));
        self.report_stall(age).await;
        Ok(())
    }

    /// Once the oldest pending change is older than `stall_after`: says what holds delivery
    /// back (the oldest transaction that has written and not ended, on any database of the
    /// server: the change log is read below its id), in `/health` and in the log; and that
    /// delivery resumed when it did.
    async fn report_stall(&mut self, age: f64) {
        let behind = age >= self.options.stall_after.as_secs_f64();
        let blocker = if behind {
            match oldest_open_transaction(&self.pool).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::debug!("postgres source: looking for what holds delivery back: {e}");
                    None
                }
            }
        } else {
            None
        };
        let mut held = self.health.held_back_by.lock().expect("health lock");
        let was = held.take();
        let name = &self.options.listener_id;
        match (&blocker, was.as_ref().map(|w| &w["pid"])) {
            (Some(b), previous) if previous != Some(&b["pid"]) => tracing::warn!(
                "postgres source `{name}`: delivery is {age:.0}s behind, held back by the \
                 transaction of server process {} (database {}, application {:?}, open for \
                 {:.0}s, {}): {:?}; changes committed after it start are delivered when it ends",
                b["pid"],
                b["database"],
                b["application_name"].as_str().unwrap_or_default(),
                b["transaction_age_secs"].as_f64().unwrap_or_default(),
                b["state"].as_str().unwrap_or_default(),
                b["query"].as_str().unwrap_or_default(),
            ),
            (None, Some(_)) if !behind => {
                tracing::info!("postgres source `{name}`: delivery caught up")
            }
            _ => {}
        }
        *held = blocker;
    }

    /// Every [`PRUNE_EVERY`], while active: keeps this listener's cursor alive and deletes
    /// the change-log rows every live cursor has passed (in a task of its own).
    fn prune_if_due(&mut self) {
        if !self.reader.active
            || self
                .reader
                .pruning
                .as_ref()
                .is_some_and(|t| !t.is_finished())
            || self
                .reader
                .pruned_at
                .is_some_and(|t| t.elapsed() < PRUNE_EVERY)
        {
            return;
        }
        self.reader.pruned_at = Some(Instant::now());
        let (pool, health) = (self.pool.clone(), self.health.clone());
        let (listener_id, retention) = (self.options.listener_id.clone(), self.options.retention);
        self.reader.pruning = Some(tokio::spawn(async move {
            match prune(&pool, &listener_id, retention).await {
                Ok(0) => {}
                Ok(n) => {
                    health.pruned.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(
                        "postgres source `{listener_id}`: deleted {n} consumed change-log rows"
                    );
                }
                Err(e) => tracing::warn!(
                    "postgres source `{listener_id}`: deleting consumed change-log rows: {e}"
                ),
            }
        }));
    }

    /// Rows that cannot become an event are delivered as undecodable (the loop dead-letters
    /// them with the reason, and the cursor moves past them): one bad row never stalls the
    /// listener, and none is dropped silently.
    fn decode_batch(&self, rows: &[PgRow]) -> Vec<PgDelivery> {
        rows.iter()
            .map(|row| {
                let payload = match decode_event(row) {
                    Ok(event) => Payload::Event(event),
                    Err(reason) => {
                        self.health.skipped_rows.fetch_add(1, Ordering::Relaxed);
                        let id = row.try_get::<i64, _>("id").unwrap_or_default();
                        Payload::Undecodable(Undecodable {
                            id: id.to_string(),
                            context: raw_row(row),
                            raw: None,
                            reason,
                        })
                    }
                };
                let suspect = self.reader.suspect.is_some_and(|(from, to)| {
                    row_cursor(row).is_ok_and(|at| from <= at && at <= to)
                });
                PgDelivery {
                    payload,
                    attempts_made: 0,
                    suspect,
                }
            })
            .collect()
    }
}

/// A forwarder's batch goes to its publisher first, many publishes in flight; only the events
/// it could not confirm are delivered to the engine, their first attempt made.
pub(crate) async fn publish_first(
    publisher: &dyn Publisher,
    deliveries: Vec<PgDelivery>,
) -> Vec<PgDelivery> {
    let (events, undecodable): (Vec<PgDelivery>, Vec<PgDelivery>) = deliveries
        .into_iter()
        .partition(|d| matches!(d.payload, Payload::Event(_)));
    let batch: Vec<&Event> = events
        .iter()
        .filter_map(|d| match &d.payload {
            Payload::Event(e) => Some(e),
            Payload::Undecodable(_) => None,
        })
        .collect();
    let Some(unconfirmed) = publisher.publish_batch(&batch).await else {
        return events.into_iter().chain(undecodable).collect();
    };
    events
        .into_iter()
        .enumerate()
        .filter(|(i, _)| unconfirmed.binary_search(i).is_ok())
        .map(|(_, mut d)| {
            d.attempts_made = 1;
            d
        })
        .chain(undecodable)
        .collect()
}

/// Where a batch ends, and how many events it held: the checkpoint of this source.
pub struct BatchEnd {
    cursor: Cursor,
    events: u64,
}

#[async_trait]
impl Source for PostgresSource {
    type Delivery = PgDelivery;
    type Checkpoint = BatchEnd;

    fn name(&self) -> String {
        format!("postgres:{}", self.options.listener_id)
    }

    /// A change-log row is read again only after a rewind: a panic dead-letters it at once.
    fn max_deliver(&self) -> u64 {
        1
    }

    /// One batch is read while the one before it is processed.
    fn read_ahead(&self) -> Option<usize> {
        Some(1)
    }

    fn ledger(&self) -> Option<Arc<Ledger>> {
        self.ledger.clone()
    }

    fn committer(&self) -> Arc<dyn Committer<BatchEnd>> {
        Arc::new(CursorStore {
            options: self
                .connect_options
                .clone()
                .options([("synchronous_commit", "off")])
                // Named, so that an operator (and a test) can tell it in pg_stat_activity.
                .application_name(&format!("fraiseql cursor {}", self.options.listener_id)),
            listener_id: self.options.listener_id.clone(),
            conn: tokio::sync::Mutex::new(None),
            committed: self.committed.clone(),
            health: self.health.clone(),
            metrics: self
                .reader
                .metrics
                .clone()
                .expect("set before the source runs"),
        })
    }

    async fn fetch(
        &mut self,
        _max: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<PgDelivery, BatchEnd>> {
        match self.read(shutdown).await {
            Ok(fetched) => Ok(fetched),
            Err(e) => {
                self.lost();
                Err(Error::Transport(format!(
                    "postgres source `{}`: {e}; reconnecting",
                    self.options.listener_id
                )))
            }
        }
    }

    async fn rewind(&mut self) {
        self.reader.read_after = *self.committed.lock().expect("cursor lock");
        self.reader.caught_up = false;
    }

    async fn close(&mut self) {
        if let Some(pruning) = self.reader.pruning.take() {
            let _ = pruning.await;
        }
        if let Some(conn) = self.reader.conn.take() {
            // Closing the session releases the advisory lock at once.
            let _ = conn.close().await;
        }
        if let Some(listener) = self.reader.listener.take() {
            listener.abort();
            let _ = listener.await;
        }
        self.health
            .listener_connected
            .store(false, Ordering::Relaxed);
        self.health.role.store(ROLE_STOPPED, Ordering::Relaxed);
    }
}

/// A change (a change-log row or a WAL change), as an event or as undecodable input;
/// acknowledged with its batch's checkpoint.
pub struct PgDelivery {
    payload: Payload,
    attempts_made: u32,
    suspect: bool,
}

impl PgDelivery {
    pub(crate) fn new(payload: Payload, suspect: bool) -> Self {
        PgDelivery {
            payload,
            attempts_made: 0,
            suspect,
        }
    }
}

impl Delivery for PgDelivery {
    fn payload(&self) -> &Payload {
        &self.payload
    }

    fn attempts_made(&self) -> u32 {
        self.attempts_made
    }

    fn suspect(&self) -> bool {
        self.suspect
    }

    /// Acknowledged with its batch: the cursor moves once the batch is done.
    async fn ack(self, _how: Settled) {}

    /// The loop rewinds the source: the row is read again.
    async fn redeliver(self) {}
}

/// Stores the cursor on a connection of its own (`synchronous_commit = off`: a cursor update
/// lost in a crash only redelivers a batch, and EffectivelyOnce keys are committed durably
/// elsewhere), so it can move while the reader waits for changes. Storing from outside the
/// reader's locked session is safe: the cursor never moves backwards, and only over rows this
/// instance has finished.
struct CursorStore {
    options: PgConnectOptions,
    listener_id: String,
    conn: tokio::sync::Mutex<Option<PgConnection>>,
    committed: Arc<std::sync::Mutex<Cursor>>,
    health: Arc<SourceHealth>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl Committer<BatchEnd> for CursorStore {
    async fn commit(&self, end: BatchEnd) -> Result<()> {
        let mut conn = self.conn.lock().await;
        // A connection the server closed (a restart, pg_terminate_backend) is found dead only
        // when used: store again on a new one before giving up. A cursor not stored stays
        // behind until a later batch stores one, so an idle reader would look stalled.
        let mut attempt = 0;
        loop {
            match self.store(&mut conn, end.cursor).await {
                Ok(()) => break,
                Err(e) if attempt + 1 < COMMIT_ATTEMPTS => {
                    tracing::debug!(
                        "cannot store the cursor ({e}); trying again on a new connection"
                    );
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Err(e) => return Err(Error::Transport(format!("cannot store the cursor: {e}"))),
            }
        }
        {
            let mut committed = self.committed.lock().expect("cursor lock");
            *committed = (*committed).max(end.cursor);
        }
        self.health
            .delivered
            .fetch_add(end.events, Ordering::Relaxed);
        self.health.progressed();
        self.metrics.source_batches.inc();
        Ok(())
    }
}

/// Tries to store a batch's cursor this many times, each on a live connection.
const COMMIT_ATTEMPTS: u32 = 3;

impl CursorStore {
    /// Stores `cursor` on the store's connection, connecting first if it has none; a failed
    /// store drops the connection.
    async fn store(
        &self,
        conn: &mut Option<PgConnection>,
        cursor: Cursor,
    ) -> std::result::Result<(), sqlx::Error> {
        if conn.is_none() {
            *conn = Some(PgConnection::connect_with(&self.options).await?);
        }
        let stored =
            save_cursor(conn.as_mut().expect("connected"), &self.listener_id, cursor).await;
        if stored.is_err() {
            *conn = None;
        }
        stored
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

fn batch_sql() -> String {
    format!(
        // `txid_text`, not `txid`: ORDER BY resolves a name to an output column first, and
        // ordering by the text would put txid 1000 before 999 (and skip 999's rows when the
        // batch limit cuts between them).
        "SELECT id, txid::text AS txid_text, entity, event, table_name, new, old, backfill, traceparent, \
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
    let (new, old) = change_rows(kind, json("new")?, json("old")?)?;
    let backfill = json("backfill")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("column backfill: {e}"))?;
    let traceparent = row
        .try_get::<Option<String>, _>("traceparent")
        .ok()
        .flatten();
    Ok(Event {
        id: id.to_string(),
        entity: text("entity")?,
        event: kind,
        table: text("table_name")?,
        timestamp: text("committed_at")?,
        new,
        old,
        backfill,
        traceparent,
    })
}

/// The rows a change must carry, as the capture triggers write them: an INSERT a `new` row,
/// an UPDATE a `new` row (and an `old` one, or none), a DELETE an `old` row; each a JSON
/// object. A hand-written row with anything else is not a change an observer can use.
fn check_rows(kind: EventKind, new: Option<&Value>, old: Option<&Value>) -> Result<(), String> {
    let shape = |column: &str, v: Option<&Value>, required: bool| match v {
        Some(Value::Object(_)) => Ok(()),
        None if !required => Ok(()),
        None => Err(format!(
            "column {column} is NULL, but {} needs a row there",
            match kind {
                EventKind::Insert => "an INSERT",
                EventKind::Update => "an UPDATE",
                EventKind::Delete => "a DELETE",
            }
        )),
        Some(other) => Err(format!(
            "column {column} must be a JSON object (a row), found {}",
            json_kind(other)
        )),
    };
    match kind {
        EventKind::Insert => shape("new", new, true)?,
        EventKind::Update => {
            shape("new", new, true)?;
            shape("old", old, false)?;
        }
        EventKind::Delete => shape("old", old, true)?,
    }
    Ok(())
}

/// The rows of a change of `kind`, checked by [`check_rows`]. A row the kind does not carry (a
/// `new` on a DELETE, an `old` on an INSERT: only a hand-written row has one) is dropped, as
/// the NATS and Redis codec drops it, so that [`Event::row`] is the change's own row.
pub(crate) fn change_rows(
    kind: EventKind,
    new: Option<Value>,
    old: Option<Value>,
) -> Result<(Option<Value>, Option<Value>), String> {
    check_rows(kind, new.as_ref(), old.as_ref())?;
    Ok(match kind {
        EventKind::Insert => (new, None),
        EventKind::Update => (new, old),
        EventKind::Delete => (None, old),
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
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

/// Keeps `listener_id`'s cursor alive (a running reader holds its rows, moving or not), then
/// deletes, in batches, the change-log rows at or before the slowest cursor among those
/// alive within `retention`. Returns the rows deleted.
async fn prune(
    pool: &PgPool,
    listener_id: &str,
    retention: Duration,
) -> std::result::Result<u64, sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {CURSOR_TABLE} AS c (listener_id) VALUES ($1) \
         ON CONFLICT (listener_id) DO UPDATE SET updated_at = now()"
    ))
    .bind(listener_id)
    .execute(pool)
    .await?;
    let delete = format!(
        "WITH floor AS (SELECT last_txid, last_id FROM {CURSOR_TABLE} \
                        WHERE updated_at > now() - make_interval(secs => $1) \
                        ORDER BY last_txid, last_id LIMIT 1) \
         DELETE FROM {CHANGE_LOG_TABLE} WHERE id IN ( \
           SELECT l.id FROM {CHANGE_LOG_TABLE} l, floor f \
           WHERE (l.txid, l.id) <= (f.last_txid, f.last_id) \
           ORDER BY l.txid, l.id LIMIT {PRUNE_BATCH})"
    );
    let mut total = 0;
    loop {
        let deleted = sqlx::query(&delete)
            .bind(retention.as_secs_f64())
            .execute(pool)
            .await?
            .rows_affected();
        total += deleted;
        if deleted < PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// The oldest transaction on the server that has written and not ended (the one whose id
/// bounds what the change log can deliver), as `/health` shows it: never its parameters, at
/// most 100 characters of its statement.
async fn oldest_open_transaction(pool: &PgPool) -> std::result::Result<Option<Value>, sqlx::Error> {
    type Row = (
        i32,
        Option<String>,
        Option<String>,
        Option<f64>,
        Option<String>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT pid, datname::text, application_name, \
                EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8, left(query, 100), state \
         FROM pg_stat_activity \
         WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() \
         ORDER BY age(backend_xid) DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(pid, database, application, age, query, state)| {
        json!({
            "pid": pid,
            "database": database,
            "application_name": application,
            "transaction_age_secs": age.map(|a| (a * 10.0).round() / 10.0),
            "query": query,
            "state": state,
        })
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_must_carry_rows_as_objects() {
        let row = json!({"id": "o1"});
        assert!(check_rows(EventKind::Insert, Some(&row), None).is_ok());
        assert!(check_rows(EventKind::Update, Some(&row), Some(&row)).is_ok());
        assert!(check_rows(EventKind::Update, Some(&row), None).is_ok());
        assert!(check_rows(EventKind::Delete, None, Some(&row)).is_ok());
        let err = check_rows(EventKind::Insert, None, None).unwrap_err();
        assert_eq!(err, "column new is NULL, but an INSERT needs a row there");
        let err = check_rows(EventKind::Insert, Some(&json!([1, 2])), None).unwrap_err();
        assert_eq!(
            err,
            "column new must be a JSON object (a row), found an array"
        );
        let err = check_rows(EventKind::Update, Some(&json!("str")), None).unwrap_err();
        assert!(err.ends_with("found a string"), "{err}");
        let err = check_rows(EventKind::Update, Some(&row), Some(&json!(7))).unwrap_err();
        assert!(err.starts_with("column old must be"), "{err}");
        assert!(check_rows(EventKind::Delete, Some(&row), None).is_err());
        // A JSON null in the column is a row that is not one.
        assert!(check_rows(EventKind::Insert, Some(&Value::Null), None).is_err());
    }

    /// Found by the `changelog` fuzz target: a DELETE whose `new` column held a jsonb `null`
    /// became an event whose row (`Event::row`, what conditions and templates read) was that
    /// `null` rather than the deleted row.
    #[test]
    fn a_row_the_change_does_not_carry_is_dropped() {
        let row = json!({"id": "ord_1"});
        let (new, old) =
            change_rows(EventKind::Delete, Some(Value::Null), Some(row.clone())).unwrap();
        assert_eq!((new, old), (None, Some(row.clone())));
        let (new, old) =
            change_rows(EventKind::Insert, Some(row.clone()), Some(json!([1]))).unwrap();
        assert_eq!((new, old), (Some(row.clone()), None));
        let both = change_rows(EventKind::Update, Some(row.clone()), Some(row.clone())).unwrap();
        assert_eq!(both, (Some(row.clone()), Some(row)));
        assert!(change_rows(EventKind::Delete, Some(json!({"id": 1})), None).is_err());
    }

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
