//! The `postgres` source with logical capture: changes read from a replication slot
//! (pgoutput, through `pgwire-replication`), decoded into events ([`decode`]), driven by the
//! one delivery loop like every source.
//!
//! # Order and acknowledgement
//!
//! pgoutput sends each transaction whole, after it committed, in commit order; a transaction
//! still open anywhere on the server holds nothing back. A batch is up to `batch_size`
//! changes; its checkpoint is the end LSN of the last transaction it completes (none if it
//! ends inside one). The delivery loop stores checkpoints in fetch order once every delivery
//! of the batch, and of every batch before it, is done: the committer records the LSN, and
//! the reader reports it to the server as the slot's confirmed position (a standby status
//! update, at most every [`STATUS_INTERVAL`]). So the slot moves only past changes every
//! observer finished or dead-lettered; after a crash, PostgreSQL sends again everything after
//! the confirmed position: at-least-once, with the same event ids.
//!
//! While nothing of ours is in flight, the server's keepalives carry how far it has read the
//! WAL; that position is confirmed too (through the loop, after what came before), so a slot
//! whose tables are quiet does not hold back the WAL of a busy server.
//!
//! # One reader per slot
//!
//! PostgreSQL lets one session stream a slot at a time. An instance whose slot is in use
//! stands by and tries again every `poll_interval`; when the active one dies, its session
//! ends, the slot is free, and a standby takes over from the confirmed position.
//!
//! # Memory
//!
//! The replication client's channel holds at most `2 × batch_size` messages and the loop
//! reads one batch ahead, so a transaction of any size streams through in bounded memory: the
//! server keeps what does not fit in `logical_decoding_work_mem` on its disk until it is read
//! (pgoutput protocol 1: transactions are not streamed while they run, so nothing
//! uncommitted ever reaches the engine).

pub(crate) mod decode;
pub(crate) mod value;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use pgwire_replication::{
    FeedbackObserver, Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgSslMode};
use sqlx::Connection;
use tokio::sync::{watch, Mutex, Notify};

pub use decode::{lsn_text, BACKFILL_PREFIX};
use decode::{Decoder, Tables, Target};

use crate::config::Config;
use crate::engine::Engine;
use crate::error::{ConnectErrorKind, Error, Result};
use crate::metrics::Metrics;
use crate::schema::Schema;
use crate::status::HealthSource;
use crate::transport::delivery::{self, sleep_or_stop, Committer, Fetch, Source};
use crate::transport::ledger::Ledger;
use crate::transport::postgres::{publish_first, PgDelivery};
use crate::transport::Publisher;

/// How long a fetch waits for the rest of a transaction it has the start of before it hands
/// what it has.
const REST_OF_TRANSACTION_WAIT: Duration = Duration::from_millis(100);

/// How often the confirmed position is reported to the server (at most).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the slot's retained WAL and lag are read for `/health` and `/metrics`.
const SLOT_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a graceful stop waits for the last confirmed position to reach the server.
const FINAL_FEEDBACK_WAIT: Duration = Duration::from_secs(3);
/// How often a session's watcher asks whether its server is shutting down.
const SHUTDOWN_CHECK_EVERY: Duration = Duration::from_secs(1);

/// How the source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalOptions {
    /// The reader's name (listener id, bridge or forwarder name), for logs and dead letters.
    pub reader: String,
    pub slot: String,
    pub publication: String,
    /// Changes per batch (at least 1).
    pub batch_size: usize,
    /// How often a standby tries to take the slot, and the longest a fetch waits.
    pub poll_interval: Duration,
    /// Events processed at once (at least 1).
    pub max_concurrency: usize,
    /// Deliver no UPDATE whose new row equals the old one.
    pub skip_unchanged_updates: bool,
    /// `/health` turns 503 past this much WAL kept by the slot.
    pub max_retained_wal: u64,
}

impl LogicalOptions {
    /// The observers' listener: `[observers] max_concurrency` and `[observers.postgres]`.
    pub fn from_config(config: &Config) -> Self {
        let pg = &config.observers.postgres;
        Self::for_reader(config, &pg.listener_id, pg.batch_size, pg.poll_interval_ms)
    }

    /// Another reader of the same database (the bridge, the Redis forwarder).
    pub fn for_reader(
        config: &Config,
        reader: &str,
        batch_size: usize,
        poll_interval_ms: u64,
    ) -> Self {
        let pg = &config.observers.postgres;
        LogicalOptions {
            reader: reader.to_owned(),
            slot: crate::capture::logical::slot_name(reader),
            publication: pg.publication.clone(),
            batch_size: batch_size.max(1),
            poll_interval: Duration::from_millis(poll_interval_ms.max(10)),
            max_concurrency: config.observers.max_concurrency.max(1),
            skip_unchanged_updates: pg.skip_unchanged_updates,
            max_retained_wal: pg.max_retained_wal,
        }
    }
}

const ROLE_STARTING: u8 = 0;
const ROLE_STANDBY: u8 = 1;
const ROLE_ACTIVE: u8 = 2;
const ROLE_RECONNECTING: u8 = 3;
const ROLE_STOPPED: u8 = 4;

/// Shared state behind `/health`.
struct SlotHealth {
    reader: String,
    slot: String,
    publication: String,
    role: AtomicU8,
    streaming: AtomicBool,
    database_ok: AtomicBool,
    /// Bytes of WAL the slot keeps on the server (-1: not read yet).
    retained: AtomicI64,
    /// Bytes of WAL between the server's position and the slot's confirmed one.
    lag: AtomicI64,
    max_retained: u64,
    over_retained: AtomicBool,
    delivered: AtomicU64,
    confirmed: AtomicU64,
}

impl SlotHealth {
    fn role(&self) -> &'static str {
        match self.role.load(Ordering::Relaxed) {
            ROLE_STANDBY => "standby",
            ROLE_ACTIVE => "active",
            ROLE_RECONNECTING => "reconnecting",
            ROLE_STOPPED => "stopped",
            _ => "starting",
        }
    }
}

impl HealthSource for SlotHealth {
    fn observers(&self) -> Value {
        let role = self.role();
        json!({
            "transport": "postgres",
            "capture": "logical",
            "connected": self.database_ok.load(Ordering::Relaxed)
                && (role != "active" || self.streaming.load(Ordering::Relaxed)),
            "listener_id": self.reader,
            "slot": self.slot,
            "publication": self.publication,
            "role": role,
            "retained_wal_bytes": self.retained.load(Ordering::Relaxed).max(0),
            "lag_bytes": self.lag.load(Ordering::Relaxed).max(0),
            "max_retained_wal_bytes": self.max_retained,
            "confirmed_lsn": lsn_text(self.confirmed.load(Ordering::Relaxed)),
            "stalled": self.over_retained.load(Ordering::Relaxed),
            "events_delivered": self.delivered.load(Ordering::Relaxed),
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
        let streaming = self.role() != "active" || self.streaming.load(Ordering::Relaxed);
        self.database_ok.load(Ordering::Relaxed)
            && streaming
            && !self.over_retained.load(Ordering::Relaxed)
    }
}

/// The position every delivery before it has been settled to, shared by the committer (which
/// raises it) and the reader (which reports it to the server).
#[derive(Default)]
struct Confirmed {
    lsn: AtomicU64,
    raised: Notify,
}

/// The replication session of the active reader.
struct Stream {
    /// Shared with the session's [`release_on_server_shutdown`] watcher, which may end it.
    client: Arc<Mutex<ReplicationClient>>,
    decoder: Decoder,
    /// The confirmed position last handed to the client.
    reported: u64,
    _watcher: AbortOnDrop,
}

/// Ends a task when the session that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The logical-capture reader. See the module documentation.
pub struct LogicalSource {
    pool: PgPool,
    url: String,
    options: LogicalOptions,
    tables: Arc<Tables>,
    health: Arc<SlotHealth>,
    confirmed: Arc<Confirmed>,
    batch_publisher: Option<Arc<dyn Publisher>>,
    stream: Option<Stream>,
    /// Where a new session starts: the end of the last whole transaction handed to the loop
    /// (what is in the loop is not asked for again), or the confirmed position after a rewind.
    resume_from: u64,
    /// The last checkpoint handed to the loop.
    handed: u64,
    announced_standby: bool,
    slot_checked: Option<Instant>,
    metrics: Option<Arc<Metrics>>,
    /// Where it records how far it has handed changes out (none for a forwarder).
    ledger: Option<Arc<Ledger>>,
    /// Changes in this range were handed out by a run that did not end cleanly: suspect.
    suspect: Option<(Position, Position)>,
    /// Where the batch handed last started: it may still be under way with the next.
    previous_start: Option<Position>,
}

impl LogicalSource {
    /// A source over `pool` (the process's pool, for the slot's health); the replication
    /// session is made from `url`. Checks that the slot exists and resolves the schema's
    /// tables as the server names them.
    pub async fn new(
        pool: PgPool,
        url: &str,
        schema: &Schema,
        options: LogicalOptions,
    ) -> Result<LogicalSource> {
        let tables = resolve_tables(&pool, schema).await?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
        )
        .bind(&options.slot)
        .fetch_one(&pool)
        .await
        .map_err(|e| Error::Transport(format!("looking up replication slot: {e}")))?;
        if !exists {
            return Err(Error::connect(
                ConnectErrorKind::NotSetUp,
                format!(
                    "replication slot `{}` does not exist: run `fraiseql db install` (or enable \
                     [observers] auto_install) first",
                    options.slot
                ),
            ));
        }
        let health = Arc::new(SlotHealth {
            reader: options.reader.clone(),
            slot: options.slot.clone(),
            publication: options.publication.clone(),
            role: AtomicU8::new(ROLE_STARTING),
            streaming: AtomicBool::new(false),
            database_ok: AtomicBool::new(true),
            retained: AtomicI64::new(-1),
            lag: AtomicI64::new(-1),
            max_retained: options.max_retained_wal,
            over_retained: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
        });
        let ledger = Ledger::open(pool.clone(), format!("wal:{}", options.reader)).await?;
        let suspect = handed_before(&ledger, &options.reader).await;
        Ok(LogicalSource {
            pool,
            url: url.to_owned(),
            options,
            tables: Arc::new(tables),
            health,
            confirmed: Arc::default(),
            batch_publisher: None,
            stream: None,
            resume_from: 0,
            handed: 0,
            announced_standby: false,
            slot_checked: None,
            metrics: None,
            ledger: Some(Arc::new(ledger)),
            suspect,
            previous_start: None,
        })
    }

    /// Makes this source a forwarder's (see [`crate::transport::postgres::PostgresSource::with_batch_publisher`]).
    pub fn with_batch_publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.batch_publisher = Some(publisher);
        self.ledger = None;
        self
    }

    pub fn health(&self) -> Arc<dyn HealthSource> {
        self.health.clone()
    }

    /// Runs until `shutdown` turns true; the events in flight finish and their position is
    /// confirmed before it returns.
    pub async fn run(mut self, engine: Arc<Engine>, shutdown: watch::Receiver<bool>) -> Result<()> {
        self.metrics = Some(engine.metrics().clone());
        let max_concurrency = self.options.max_concurrency;
        delivery::run(self, engine, max_concurrency, shutdown).await
    }

    /// Opens a replication session unless another instance streams the slot. False: standby.
    async fn open(&mut self) -> Result<bool> {
        let active: Option<Option<i32>> =
            sqlx::query_scalar("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&self.options.slot)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| Error::Transport(format!("looking up the replication slot: {e}")))?;
        match active {
            None => {
                return Err(Error::connect(
                    ConnectErrorKind::NotSetUp,
                    format!(
                        "replication slot `{}` was dropped: run `fraiseql db install` to \
                         create it again (changes made meanwhile were not captured)",
                        self.options.slot
                    ),
                ))
            }
            Some(Some(_)) => return Ok(self.stand_by()),
            Some(None) => {}
        }
        let config = self.session_config()?;
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| session_error(&self.options.slot, &e))?;
        if let Err(e) = client.wait_started().await {
            if e.to_string().contains("SQLSTATE 55006") {
                // Taken by another instance between the check and the start.
                return Ok(self.stand_by());
            }
            return Err(session_error(&self.options.slot, &e));
        }
        tracing::info!(
            "[observers] {}: streaming replication slot `{}` (publication `{}`) from {}",
            self.options.reader,
            self.options.slot,
            self.options.publication,
            if self.resume_from == 0 {
                "its confirmed position".to_owned()
            } else {
                lsn_text(self.resume_from)
            }
        );
        self.announced_standby = false;
        self.health.role.store(ROLE_ACTIVE, Ordering::Relaxed);
        self.health.streaming.store(true, Ordering::Relaxed);
        let client = Arc::new(Mutex::new(client));
        let watcher = tokio::spawn(release_on_server_shutdown(
            (*self.pool.connect_options()).clone(),
            Arc::downgrade(&client),
            self.options.reader.clone(),
        ));
        self.stream = Some(Stream {
            client,
            decoder: Decoder::new(self.tables.clone(), self.options.skip_unchanged_updates),
            reported: 0,
            _watcher: AbortOnDrop(watcher),
        });
        Ok(true)
    }

    fn stand_by(&mut self) -> bool {
        if !self.announced_standby {
            tracing::info!(
                "[observers] {}: another instance streams replication slot `{}`; standing by",
                self.options.reader,
                self.options.slot
            );
            self.announced_standby = true;
        }
        self.health.role.store(ROLE_STANDBY, Ordering::Relaxed);
        false
    }

    fn session_config(&self) -> Result<ReplicationConfig> {
        let invalid = |e: String| Error::connect(ConnectErrorKind::InvalidSettings, e);
        let options = self.pool.connect_options();
        let url = url::Url::parse(&self.url).map_err(|e| invalid(format!("database url: {e}")))?;
        let password = match url.password() {
            Some(p) => percent_decode(p),
            None => std::env::var("PGPASSWORD").unwrap_or_default(),
        };
        let query = |key: &str| {
            url.query_pairs()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.into_owned())
        };
        let database = options.get_database().unwrap_or(options.get_username());
        let mut config = match options.get_socket() {
            Some(dir) => ReplicationConfig::unix(
                dir.display().to_string(),
                options.get_port(),
                options.get_username(),
                password,
                database,
                &self.options.slot,
                self.options.publication.as_str(),
            ),
            None => ReplicationConfig::new(
                options.get_host(),
                options.get_username(),
                password,
                database,
                &self.options.slot,
                self.options.publication.as_str(),
            )
            .with_port(options.get_port())
            .with_tls(tls_config(
                options.get_ssl_mode(),
                query("sslrootcert").or_else(|| std::env::var("PGSSLROOTCERT").ok()),
            )),
        };
        let health = self.health.clone();
        config = config
            .with_start_lsn(Lsn(self.resume_from))
            .with_ack_lsn(Lsn(self.confirmed.lsn.load(Ordering::SeqCst)))
            .with_status_interval(STATUS_INTERVAL)
            .with_buffer_size(self.options.batch_size.saturating_mul(2).max(64))
            .with_application_name(format!("fraiseql {}", self.options.reader))
            // Values arrive as text in the forms `value::to_json` reads.
            .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=3")
            .with_feedback_observer(FeedbackObserver::new(move |_| {
                health.database_ok.store(true, Ordering::Relaxed);
            }));
        Ok(config)
    }

    /// Records in the ledger the changes that may be under way once the batch at
    /// `positions` is handed out, before it is.
    async fn record_handed(&mut self, positions: &[Position]) -> Result<()> {
        let (Some(&first), Some(&last)) = (positions.first(), positions.last()) else {
            return Ok(());
        };
        let from = self.previous_start.map_or(first, |p| p.min(first));
        if let Some(ledger) = &self.ledger {
            ledger
                .handed(&position_text(from), &position_text(last))
                .await?;
        }
        self.previous_start = Some(first);
        if self.suspect.is_some_and(|(_, to)| to <= last) {
            self.suspect = None;
        }
        Ok(())
    }

    /// Reports the confirmed position to the server through the session's `client` if it
    /// moved.
    fn report_confirmed(&mut self, client: &ReplicationClient) {
        let confirmed = self.confirmed.lsn.load(Ordering::SeqCst);
        if let Some(stream) = &mut self.stream {
            if confirmed > stream.reported {
                client.update_applied_lsn(Lsn(confirmed));
                stream.reported = confirmed;
            }
        }
    }

    /// One fetch with a session open: waits for the first message (or the poll interval),
    /// then takes what has arrived, up to a batch.
    async fn read(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<PgDelivery, SlotCheckpoint>> {
        let client = self
            .stream
            .as_ref()
            .expect("a session is open")
            .client
            .clone();
        let mut client = client.lock().await;
        let first = loop {
            self.report_confirmed(&client);
            tokio::select! {
                event = client.recv() => break event,
                () = self.confirmed.raised.notified() => continue,
                stop = sleep_or_stop(shutdown, self.options.poll_interval) => {
                    let _ = stop;
                    return Ok(Fetch::Idle);
                }
            }
        };
        let mut batch = Batch::default();
        let mut next = Some(first);
        while let Some(event) = next {
            match event {
                Ok(Some(event)) => self.take(event, &mut batch),
                Ok(None) => return Err(Error::Transport("the replication session ended".into())),
                Err(e) => return Err(session_error(&self.options.slot, &e)),
            }
            if batch.payloads.len() >= self.options.batch_size {
                break;
            }
            let stream = self.stream.as_mut().expect("a session is open");
            next = match client.recv().now_or_never() {
                Some(event) => Some(event),
                // Half a transaction has arrived: its end follows at once, and only its end
                // lets the slot move. Handing half would leave the position behind what
                // was processed (a stop then, or a crash, delivers it again).
                None if stream.decoder.in_transaction() => {
                    tokio::time::timeout(REST_OF_TRANSACTION_WAIT, client.recv())
                        .await
                        .ok()
                }
                None => None,
            };
        }
        drop(client);
        let Batch {
            payloads,
            positions,
            checkpoint,
            committed,
        } = batch;
        if let Some(end) = committed {
            self.resume_from = self.resume_from.max(end);
        }
        let checkpoint = checkpoint.filter(|lsn| *lsn > self.handed);
        if payloads.is_empty() && checkpoint.is_none() {
            return Ok(Fetch::Idle);
        }
        if let Some(lsn) = checkpoint {
            self.handed = lsn;
        }
        let events = payloads.len() as u64;
        let deliveries: Vec<PgDelivery> = payloads
            .into_iter()
            .zip(&positions)
            .map(|(payload, at)| {
                let suspect = self
                    .suspect
                    .is_some_and(|(from, to)| from <= *at && *at <= to);
                PgDelivery::new(payload, suspect)
            })
            .collect();
        if let Err(e) = self.record_handed(&positions).await {
            // Not handed: streamed again by a new session.
            self.rewind().await;
            return Err(e);
        }
        let deliveries = match &self.batch_publisher {
            Some(publisher) => publish_first(publisher.as_ref(), deliveries).await,
            None => deliveries,
        };
        Ok(Fetch::Batch(
            deliveries,
            SlotCheckpoint {
                lsn: checkpoint,
                events,
            },
        ))
    }

    /// One replication event into the batch being gathered.
    fn take(&mut self, event: ReplicationEvent, batch: &mut Batch) {
        let stream = self.stream.as_mut().expect("a session is open");
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => stream.decoder.begin(final_lsn.0, commit_time_micros),
            ReplicationEvent::XLogData { data, .. } => {
                stream.decoder.message(data, &mut batch.payloads);
                batch.note_positions(stream.decoder.last_position());
            }
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == decode::BACKFILL_PREFIX => {
                stream.decoder.backfill(&content, &mut batch.payloads);
                batch.note_positions(stream.decoder.last_position());
            }
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == decode::TRACEPARENT_PREFIX => stream.decoder.traceparent(&content),
            ReplicationEvent::Commit { end_lsn, .. } => {
                stream.decoder.commit();
                batch.committed = Some(end_lsn.0);
                batch.checkpoint = Some(end_lsn.0);
            }
            // The server has sent everything before `wal_end`: with no transaction under way,
            // nothing of ours lies before it that has not been handed to the loop.
            ReplicationEvent::KeepAlive { wal_end, .. } if !stream.decoder.in_transaction() => {
                batch.checkpoint = Some(batch.checkpoint.unwrap_or(0).max(wal_end.0));
            }
            _ => {}
        }
    }

    /// The slot's retained WAL and lag, into `/health` and the metrics, at most once per
    /// [`SLOT_CHECK_EVERY`]; logs when it crosses `max_retained_wal`.
    async fn check_slot(&mut self) {
        if self
            .slot_checked
            .is_some_and(|t| t.elapsed() < SLOT_CHECK_EVERY)
        {
            return;
        }
        self.slot_checked = Some(Instant::now());
        let read: std::result::Result<Option<(i64, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8, \
             COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.options.slot)
        .fetch_optional(&self.pool)
        .await;
        let (retained, lag) = match read {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                self.health.database_ok.store(false, Ordering::Relaxed);
                tracing::debug!("[observers] {}: reading the slot: {e}", self.options.reader);
                return;
            }
        };
        self.health.database_ok.store(true, Ordering::Relaxed);
        self.health.retained.store(retained, Ordering::Relaxed);
        self.health.lag.store(lag, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics.slot_retained_wal_bytes.set(retained);
            metrics.slot_lag_bytes.set(lag);
        }
        let over = u64::try_from(retained).unwrap_or(0) > self.options.max_retained_wal;
        if let Some(metrics) = &self.metrics {
            metrics.source_stalled.set(i64::from(over));
        }
        let was = self.health.over_retained.swap(over, Ordering::Relaxed);
        if over && !was {
            tracing::error!(
                "[observers] {}: replication slot `{}` keeps {} MiB of WAL on the server, more \
                 than max_retained_wal ({} MiB); /health is 503 until it is consumed. If this \
                 install is retired, drop the slot: SELECT pg_drop_replication_slot('{}')",
                self.options.reader,
                self.options.slot,
                retained >> 20,
                self.options.max_retained_wal >> 20,
                self.options.slot
            );
        } else if was && !over {
            tracing::info!(
                "[observers] {}: replication slot `{}` is back under max_retained_wal",
                self.options.reader,
                self.options.slot
            );
        }
    }

    /// The session failed: a new one on the next fetch.
    fn lost(&mut self) {
        if let Some(stream) = self.stream.take() {
            // Held only by the watcher, which is ending the session itself.
            if let Ok(mut client) = stream.client.try_lock() {
                client.abort();
            }
        }
        self.health.streaming.store(false, Ordering::Relaxed);
        self.health.role.store(ROLE_RECONNECTING, Ordering::Relaxed);
    }
}

/// What one fetch gathers.
#[derive(Default)]
struct Batch {
    payloads: Vec<delivery::Payload>,
    /// Where each payload is in the stream.
    positions: Vec<Position>,
    checkpoint: Option<u64>,
    /// The end of the last transaction it completes: where a new session resumes once the
    /// batch is handed to the loop (not before: a session lost while a batch is gathered
    /// drops the batch, and its transactions must be streamed again).
    committed: Option<u64>,
}

/// Where a change is in the stream: its transaction's commit LSN and its place in it.
pub type Position = (u64, u32);

impl Batch {
    /// The payloads added last came from the message at `position`.
    fn note_positions(&mut self, position: Option<Position>) {
        self.positions
            .resize(self.payloads.len(), position.unwrap_or((u64::MAX, 0)));
    }
}

/// `commit LSN:place`, as the delivery ledger keeps it.
fn position_text((commit, place): Position) -> String {
    format!("{commit}:{place}")
}

fn parse_position(text: &str) -> Option<Position> {
    let (commit, place) = text.split_once(':')?;
    Some((commit.parse().ok()?, place.parse().ok()?))
}

/// Where a batch lets the slot move (the end of the last transaction it completes, or a
/// keepalive's position), and how many events it held.
pub struct SlotCheckpoint {
    lsn: Option<u64>,
    events: u64,
}

#[async_trait]
impl Source for LogicalSource {
    type Delivery = PgDelivery;
    type Checkpoint = SlotCheckpoint;

    fn name(&self) -> String {
        format!("postgres:{}", self.options.reader)
    }

    /// PostgreSQL sends a change again only after a reconnect: a panic dead-letters it at
    /// once.
    fn max_deliver(&self) -> u64 {
        1
    }

    fn read_ahead(&self) -> Option<usize> {
        Some(1)
    }

    fn ledger(&self) -> Option<Arc<Ledger>> {
        self.ledger.clone()
    }

    fn committer(&self) -> Arc<dyn Committer<SlotCheckpoint>> {
        Arc::new(SlotCommitter {
            confirmed: self.confirmed.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone().expect("set before the source runs"),
        })
    }

    async fn fetch(
        &mut self,
        _max: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<PgDelivery, SlotCheckpoint>> {
        self.check_slot().await;
        if self.stream.is_none() {
            let opened = self.open().await;
            match opened {
                Ok(true) => {}
                Ok(false) => {
                    sleep_or_stop(shutdown, self.options.poll_interval).await;
                    return Ok(Fetch::Idle);
                }
                Err(e) => {
                    self.lost();
                    return Err(e);
                }
            }
        }
        let read = self.read(shutdown).await;
        if read.is_err() {
            self.lost();
        }
        read
    }

    /// A delivery could not be settled: start a new session at the confirmed position.
    async fn rewind(&mut self) {
        self.lost();
        self.resume_from = self.confirmed.lsn.load(Ordering::SeqCst);
        self.handed = self.resume_from;
    }

    async fn close(&mut self) {
        if let Some(client) = self.stream.as_ref().map(|s| s.client.clone()) {
            let mut client = client.lock().await;
            self.report_confirmed(&client);
            self.stream = None;
            // Give the last confirmed position its standby status update before the end.
            let deadline = Instant::now() + FINAL_FEEDBACK_WAIT;
            while client.feedback_pending_since().is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tokio::time::timeout(FINAL_FEEDBACK_WAIT, client.shutdown()).await;
        }
        self.health.streaming.store(false, Ordering::Relaxed);
        self.health.role.store(ROLE_STOPPED, Ordering::Relaxed);
    }
}

/// Ends the replication session when its server shuts down. PostgreSQL's fast shutdown ends
/// every other session at once but keeps a walsender until its client has confirmed all the
/// WAL it was sent, and the reader cannot confirm changes still being processed — least of
/// all while they wait for this same database (an EffectivelyOnce key, a dead letter, a
/// handler's own queries): the server would wait on the engine, for minutes. So a connection
/// of the session's own asks the server once a second; when it answers that it is shutting
/// down (SQLSTATE 57P01 on that connection, 57P03 to a new one), the session is dropped, the
/// server stops, and the reader starts a new session from where it was once it is back.
async fn release_on_server_shutdown(
    options: PgConnectOptions,
    client: Weak<Mutex<ReplicationClient>>,
    reader: String,
) {
    let mut conn: Option<PgConnection> = None;
    loop {
        tokio::time::sleep(SHUTDOWN_CHECK_EVERY).await;
        let failed = match &mut conn {
            Some(c) => sqlx::query("SELECT 1").execute(&mut *c).await.err(),
            None => match PgConnection::connect_with(&options).await {
                Ok(c) => {
                    conn = Some(c);
                    None
                }
                Err(e) => Some(e),
            },
        };
        let Some(e) = failed else { continue };
        conn = None;
        let code = e.as_database_error().and_then(|d| d.code());
        if !matches!(code.as_deref(), Some("57P01" | "57P03")) {
            continue;
        }
        let Some(client) = client.upgrade() else {
            return;
        };
        tracing::warn!(
            "[observers] {reader}: PostgreSQL is shutting down ({e}); ending the replication \
             session so that it can (a new one starts where this one was once it is back)"
        );
        client.lock().await.abort();
        return;
    }
}

/// The changes a run of `reader` that did not end cleanly may have left under way.
async fn handed_before(ledger: &Ledger, reader: &str) -> Option<(Position, Position)> {
    let (from, to) = match ledger.handed_before().await {
        Ok(handed) => handed?,
        Err(e) => {
            tracing::warn!("[observers] {reader}: {e}");
            return None;
        }
    };
    let range = (parse_position(&from)?, parse_position(&to)?);
    tracing::warn!(
        "[observers] {reader}: the last run stopped without finishing the changes from {} \
         (change {}) to {} (change {}); each is run alone, and one that stops the engine again \
         and again is dead-lettered",
        Lsn(range.0 .0),
        range.0 .1,
        Lsn(range.1 .0),
        range.1 .1
    );
    Some(range)
}

/// Raises the confirmed position; the reader reports it to the server.
struct SlotCommitter {
    confirmed: Arc<Confirmed>,
    health: Arc<SlotHealth>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl Committer<SlotCheckpoint> for SlotCommitter {
    async fn commit(&self, checkpoint: SlotCheckpoint) -> Result<()> {
        if let Some(lsn) = checkpoint.lsn {
            self.confirmed.lsn.fetch_max(lsn, Ordering::SeqCst);
            self.health.confirmed.fetch_max(lsn, Ordering::Relaxed);
            self.confirmed.raised.notify_one();
        }
        self.health
            .delivered
            .fetch_add(checkpoint.events, Ordering::Relaxed);
        self.metrics.source_batches.inc();
        Ok(())
    }
}

/// Each captured table as the server names it (`schema`, `table`), with the entities
/// declared on it.
async fn resolve_tables(pool: &PgPool, schema: &Schema) -> Result<Tables> {
    let mut tables = Tables::new();
    for entity in schema.entities() {
        let quoted = crate::capture::quote_identifier(&entity.table).map_err(|msg| {
            Error::Schema(format!(
                "table of entity `{}` ({:?}): {msg}",
                entity.name, entity.table
            ))
        })?;
        let found: Option<(String, String)> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
        )
        .bind(&quoted)
        .fetch_optional(pool)
        .await
        .map_err(|e| Error::Transport(format!("looking up table {}: {e}", entity.table)))?;
        let Some(key) = found else {
            return Err(Error::connect(
                ConnectErrorKind::NotSetUp,
                format!(
                    "table `{}` of entity `{}` does not exist",
                    entity.table, entity.name
                ),
            ));
        };
        tables.entry(key).or_default().push(Target {
            entity: entity.name.clone(),
            table: entity.table.clone(),
        });
    }
    Ok(tables)
}

fn tls_config(mode: PgSslMode, root: Option<String>) -> TlsConfig {
    let root = root.map(std::path::PathBuf::from);
    match mode {
        PgSslMode::Disable => TlsConfig::disabled(),
        PgSslMode::Allow | PgSslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::default()
        },
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa => TlsConfig::verify_ca(root),
        PgSslMode::VerifyFull => TlsConfig::verify_full(root),
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn session_error(slot: &str, e: &pgwire_replication::PgWireError) -> Error {
    use pgwire_replication::PgWireError as E;
    let message = format!("replication slot `{slot}`: {e}");
    match e {
        E::Auth(_) => Error::connect(ConnectErrorKind::Authentication, message),
        E::Tls(_) => Error::connect(ConnectErrorKind::Tls, message),
        E::Server(s) if s.contains("SQLSTATE 42501") => {
            Error::connect(ConnectErrorKind::Permission, message)
        }
        E::Io(_) => Error::connect(ConnectErrorKind::Unreachable, message),
        _ => Error::Transport(message),
    }
}
