//! The `redis` transport: a Redis Stream shared by every instance through one consumer group.
//!
//! - [`connect`] opens a [`ConnectionManager`] (reconnects with backoff on its own) from
//!   `redis_url`: `redis://` or `rediss://` (TLS), `user:password@`, `/db`. The initial
//!   connect is retried until it succeeds, except for authentication errors.
//! - [`RedisPublisher`] appends events with `XADD {stream} MAXLEN ~ {maxlen} * id … entity …
//!   event … payload …` and returns once Redis replied (the write is then acknowledged).
//! - [`RedisSource`] reads through the consumer group with `XREADGROUP` (the group is created
//!   with `MKSTREAM` if missing), runs [`Engine::process`] with bounded concurrency and
//!   `XACK`s an entry only when processing returned. Entries left pending by a dead instance
//!   are taken over with `XAUTOCLAIM` once idle for `claim_idle_secs`; an entry whose delivery
//!   count exceeds `max_deliver` is dead-lettered (for every observer it matches) and acked;
//!   a malformed entry is dead-lettered with the reason and acked. While an event is being
//!   processed its entry is re-claimed by its own consumer every `claim_idle_secs / 2`
//!   (`XCLAIM … JUSTID`, which resets the idle time without counting a delivery), so a slow
//!   action is not mistaken for a dead instance.
//!
//! Entry fields: `id` (stable event id), `entity`, `event` (`INSERT|UPDATE|DELETE`) and
//! `payload`: the JSON body the NATS publisher sends (`"subject"` holds the stream name).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamPendingCountReply,
    StreamReadReply,
};
use redis::{Client, ErrorKind, RedisError, Value};
use serde_json::{json, Map};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::bridge::Publisher;
use crate::config::RedisConfig;
use crate::dlq::DlqEntry;
use crate::engine::Engine;
use crate::error::{ConnectErrorKind, Error, PublishErrorKind, Result};
use crate::event::{now_rfc3339, Event, EventKind};
use crate::metrics::RedisMetrics;
use crate::retry::{Backoff, RetryPolicy, PUBLISH_RETRY};
use crate::status::HealthSource;
use crate::transport::nats::{decode_body, encode_body, mask_url};

/// Time allowed for a reply, on top of `block_ms` for `XREADGROUP`.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The initial connect, and reads after a failure, until Redis answers.
const CONNECT_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(5));
/// `XACK` of a processed entry; one not acked is redelivered (at least once).
const ACK_RETRY: RetryPolicy =
    RetryPolicy::exponential(4, Duration::from_millis(100), Duration::from_secs(1));

// ---------------------------------------------------------------------------------------------
// Connection

fn redis_err(what: &str, e: &RedisError) -> Error {
    Error::Transport(format!("Redis: cannot {what}: {e}"))
}

/// Errors that retrying will not fix (bad password, bad URL).
fn is_fatal(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// Connects to `url` and pings. `response_timeout` bounds each reply (blocking reads need
/// more than their block time). Retries the first connect with backoff up to 5 s between
/// attempts, logging each failure (URL masked); afterwards the manager reconnects on its
/// own (a few attempts with backoff, then again on the next command — the source's loops
/// keep issuing commands, with their own backoff).
pub async fn connect(url: &str, response_timeout: Duration) -> Result<ConnectionManager> {
    // rediss:// needs a rustls provider; `ring` is the one this crate builds with.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let masked = mask_url(url);
    let client = Client::open(url).map_err(|e| {
        Error::connect(
            ConnectErrorKind::InvalidSettings,
            format!("invalid Redis URL {masked} (observers.redis_url): {e}"),
        )
    })?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout))
        .set_max_delay(CONNECT_RETRY.max_delay)
        .set_number_of_retries(6);
    let mut backoff = Backoff::new(CONNECT_RETRY);
    loop {
        let attempt = async {
            let mut conn =
                ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await?;
            Ok::<_, RedisError>(conn)
        };
        match attempt.await {
            Ok(conn) => return Ok(conn),
            Err(e) if is_fatal(&e) => {
                let kind = match e.kind() {
                    ErrorKind::InvalidClientConfig => ConnectErrorKind::InvalidSettings,
                    _ if e.code() == Some("NOPERM") => ConnectErrorKind::Permission,
                    _ => ConnectErrorKind::Authentication,
                };
                return Err(Error::connect(
                    kind,
                    format!("cannot connect to Redis at {masked}: {e}"),
                ));
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    "[observers] cannot connect to Redis at {masked}: {e}; retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// `XGROUP CREATE {stream} {group} 0 MKSTREAM`; an existing group (`BUSYGROUP`) is fine.
/// A new group starts at the beginning of the stream, so entries appended before any
/// instance ran are processed too.
pub async fn ensure_group(conn: &mut ConnectionManager, config: &RedisConfig) -> Result<()> {
    let created = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&config.stream)
        .arg(&config.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(conn)
        .await;
    match created {
        Ok(()) => {
            tracing::info!(
                "[observers] Redis consumer group `{}` created on `{}`",
                config.group,
                config.stream
            );
            Ok(())
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(redis_err(
            &format!("create consumer group `{}`", config.group),
            &e,
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher

/// Appends events to the stream.
#[derive(Clone)]
pub struct RedisPublisher {
    conn: ConnectionManager,
    stream: String,
    maxlen: u64,
    metrics: RedisMetrics,
}

impl RedisPublisher {
    pub fn new(conn: ConnectionManager, config: &RedisConfig, metrics: RedisMetrics) -> Self {
        RedisPublisher {
            conn,
            stream: config.stream.clone(),
            maxlen: config.maxlen,
            metrics,
        }
    }

    /// `XADD` with the event's fields, with [`PUBLISH_RETRY`]. Returns the entry id.
    pub async fn publish(&self, event: &Event) -> Result<String> {
        PUBLISH_RETRY
            .run(|_| self.publish_once(event), |_| true)
            .await
            .map_err(|(e, _)| e)
    }

    /// One `XADD`. Returns the entry id.
    pub async fn publish_once(&self, event: &Event) -> Result<String> {
        let payload = String::from_utf8(encode_body(&self.stream, event)?).map_err(|e| {
            Error::publish(
                PublishErrorKind::Invalid,
                format!("cannot encode event {}: {e}", event.id),
            )
        })?;
        let id = self.xadd(event, &payload).await.map_err(|e| {
            let kind = if e.is_timeout() {
                PublishErrorKind::TimedOut
            } else {
                PublishErrorKind::Failed
            };
            Error::publish(
                kind,
                format!(
                    "cannot append event {} to Redis stream `{}`: {e}",
                    event.id, self.stream
                ),
            )
        })?;
        self.metrics.forwarded.inc();
        Ok(id)
    }

    async fn xadd(&self, event: &Event, payload: &str) -> redis::RedisResult<String> {
        redis::cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*")
            .arg("id")
            .arg(&event.id)
            .arg("entity")
            .arg(&event.entity)
            .arg("event")
            .arg(event.event.as_str())
            .arg("payload")
            .arg(payload)
            .query_async(&mut self.conn.clone())
            .await
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    fn kind(&self) -> &'static str {
        "redis_xadd"
    }

    fn describe(&self) -> String {
        format!("Redis XADD {}", self.stream)
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.publish_once(event).await.map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// Health

/// `/health` view: connected as of the last command of the reader.
pub struct RedisHealth {
    connected: Arc<AtomicBool>,
    stream: String,
}

impl HealthSource for RedisHealth {
    fn observers(&self) -> serde_json::Value {
        json!({
            "transport": "redis",
            "connected": self.connected.load(Ordering::Acquire),
            "stream": self.stream,
        })
    }

    fn healthy(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

// ---------------------------------------------------------------------------------------------
// Entries

/// A string field of an entry.
fn field(entry: &StreamId, name: &str) -> Option<String> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

/// Rebuilds the event from an entry's `payload` (the event id: the `id` field, else the
/// entry id).
pub fn decode_entry(entry: &StreamId) -> std::result::Result<Event, String> {
    let payload = field(entry, "payload").ok_or("missing field \"payload\"")?;
    let id = field(entry, "id")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| entry.id.clone());
    decode_body(payload.as_bytes(), Some(id))
}

/// What a malformed entry leaves in the DLQ: its raw fields under `new`.
fn malformed_event(entry: &StreamId, stream: &str) -> Event {
    let fields: Map<String, serde_json::Value> = entry
        .map
        .keys()
        .map(|k| (k.clone(), json!(field(entry, k))))
        .collect();
    Event {
        id: field(entry, "id").unwrap_or_else(|| entry.id.clone()),
        entity: field(entry, "entity").unwrap_or_default(),
        event: field(entry, "event")
            .and_then(|e| e.parse().ok())
            .unwrap_or(EventKind::Insert),
        table: String::new(),
        timestamp: now_rfc3339(),
        new: Some(json!({"stream": stream, "entry_id": entry.id, "fields": fields})),
        old: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer

/// Runs the engine on the entries of the consumer group.
pub struct RedisSource {
    /// Blocking `XREADGROUP` only: a blocked read must not delay acks on a shared pipeline.
    reader: ConnectionManager,
    /// Acks, claims, pending queries.
    ops: ConnectionManager,
    config: RedisConfig,
    consumer: String,
    metrics: RedisMetrics,
    max_concurrency: usize,
    connected: Arc<AtomicBool>,
}

impl RedisSource {
    /// Connects twice (reader, operations), ensures the group and picks a consumer name
    /// unique to this process.
    pub async fn connect(
        url: &str,
        config: &RedisConfig,
        metrics: RedisMetrics,
        max_concurrency: usize,
    ) -> Result<RedisSource> {
        let block = Duration::from_millis(config.block_ms);
        let reader = connect(url, block + RESPONSE_TIMEOUT).await?;
        let mut ops = connect(url, RESPONSE_TIMEOUT).await?;
        ensure_group(&mut ops, config).await?;
        let consumer = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Ok(RedisSource {
            reader,
            ops,
            config: config.clone(),
            consumer,
            metrics,
            max_concurrency: max_concurrency.max(1),
            connected: Arc::new(AtomicBool::new(true)),
        })
    }

    /// This instance's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// `/health`: `{"transport":"redis","connected":…,"stream":…}`, 503 while disconnected.
    pub fn health(&self) -> Arc<dyn HealthSource> {
        Arc::new(RedisHealth {
            connected: self.connected.clone(),
            stream: self.config.stream.clone(),
        })
    }

    /// Reads, reclaims and processes until `shutdown` turns true (or its sender is dropped),
    /// then waits for the events being processed. Entries read but not started stay pending
    /// and are reclaimed by another instance after `claim_idle_secs`.
    pub async fn run(self, engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let shared = Arc::new(Shared {
            engine,
            ops: self.ops.clone(),
            config: self.config.clone(),
            consumer: self.consumer.clone(),
            metrics: self.metrics.clone(),
            permits: Arc::new(Semaphore::new(self.max_concurrency)),
        });
        tracing::info!(
            "[observers] redis: reading `{}` as `{}` in group `{}`",
            self.config.stream,
            self.consumer,
            self.config.group
        );
        let mut tasks = JoinSet::new();
        let reclaimer = tokio::spawn(reclaim_loop(shared.clone(), shutdown.clone()));
        let mut reader = self.reader.clone();
        let mut backoff = Backoff::new(CONNECT_RETRY);
        loop {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                p = shared.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown_signal(&mut shutdown) => break,
            };
            let count = (shared.permits.available_permits() + 1).min(self.config.batch_size);
            let read = tokio::select! {
                r = read_new(&mut reader, &shared, count) => r,
                _ = shutdown_signal(&mut shutdown) => break,
            };
            match read {
                Ok(entries) => {
                    self.connected.store(true, Ordering::Release);
                    backoff.reset();
                    spawn_all(&mut tasks, &shared, entries, first, |_| 1).await;
                }
                Err(e) => {
                    drop(first);
                    self.connected.store(false, Ordering::Release);
                    self.on_read_error(&e).await;
                    if sleep_or_shutdown(&mut shutdown, backoff.next_delay()).await {
                        break;
                    }
                }
            }
        }
        // The reclaimer sees the same shutdown and finishes the entries it took over.
        if let Err(e) = reclaimer.await {
            tracing::error!("redis source: the reclaimer failed: {e}");
        }
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tracing::error!("redis source: an entry task failed: {e}");
            }
        }
        leave_group(&shared).await;
        Ok(())
    }

    async fn on_read_error(&self, e: &RedisError) {
        if e.code() == Some("NOGROUP") {
            tracing::warn!(
                "redis source: group `{}` on `{}` is gone; creating it again",
                self.config.group,
                self.config.stream
            );
            if let Err(e) = ensure_group(&mut self.ops.clone(), &self.config).await {
                tracing::warn!("{e}");
            }
        } else {
            tracing::warn!(
                "redis source `{}`: cannot read: {e}; retrying",
                self.config.stream
            );
        }
    }
}

struct Shared {
    engine: Arc<Engine>,
    ops: ConnectionManager,
    config: RedisConfig,
    consumer: String,
    metrics: RedisMetrics,
    permits: Arc<Semaphore>,
}

type Permit = tokio::sync::OwnedSemaphorePermit;

/// `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS stream >`: new entries for this consumer.
async fn read_new(
    reader: &mut ConnectionManager,
    shared: &Shared,
    count: usize,
) -> redis::RedisResult<Vec<StreamId>> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&shared.config.group)
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(shared.config.block_ms)
        .arg("STREAMS")
        .arg(&shared.config.stream)
        .arg(">")
        .query_async(reader)
        .await?;
    Ok(reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default())
}

/// Spawns one task per entry; `first` is the permit already held for the first one.
async fn spawn_all(
    tasks: &mut JoinSet<()>,
    shared: &Arc<Shared>,
    entries: Vec<StreamId>,
    first: Permit,
    delivered: impl Fn(&StreamId) -> u64,
) {
    let mut first = Some(first);
    for entry in entries {
        let permit = match first.take() {
            Some(p) => p,
            None => shared
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed"),
        };
        let count = delivered(&entry);
        let shared = shared.clone();
        tasks.spawn(async move {
            handle(entry, count, &shared).await;
            drop(permit);
        });
    }
}

async fn handle(entry: StreamId, delivered: u64, shared: &Shared) {
    shared.metrics.received.inc();
    shared.metrics.pending.inc();
    let acked = match decode_entry(&entry) {
        Err(reason) => malformed(&entry, &reason, delivered, shared).await,
        Ok(event) if delivered > shared.config.max_deliver => {
            over_max_deliver(&event, delivered, shared).await;
            true
        }
        Ok(event) => process(&entry, &event, delivered, shared).await,
    };
    if acked {
        ack(shared, &entry.id).await;
    }
    shared.metrics.pending.dec();
}

/// Dead-letters a malformed entry with the reason. True: ack it.
async fn malformed(entry: &StreamId, reason: &str, delivered: u64, shared: &Shared) -> bool {
    let stream = &shared.config.stream;
    tracing::error!(
        "redis: dead-lettering malformed entry {} of `{stream}`: {reason}",
        entry.id
    );
    let dlq_entry = DlqEntry {
        id: 0,
        event: malformed_event(entry, stream),
        observer: format!("redis:{stream}"),
        action_index: 0,
        action: "redis decode".to_owned(),
        error: format!("malformed entry {}: {reason}", entry.id),
        attempts: u32::try_from(delivered).unwrap_or(u32::MAX),
        first_failed_at: now_rfc3339(),
        last_failed_at: now_rfc3339(),
    };
    match shared.engine.dlq().push(dlq_entry).await {
        Ok(_) => {
            shared.engine.metrics().dlq_size.inc();
            shared.metrics.dead_lettered.inc();
            true
        }
        Err(e) => {
            // Not acked: it stays pending and is tried again after claim_idle_secs.
            tracing::error!("redis: cannot dead-letter entry {}: {e}", entry.id);
            false
        }
    }
}

async fn over_max_deliver(event: &Event, delivered: u64, shared: &Shared) {
    let reason = format!(
        "delivered {delivered} times (max_deliver = {}) without being acknowledged",
        shared.config.max_deliver
    );
    tracing::error!("redis: event {}: {reason}; dead-lettering it", event.id);
    let attempts = u32::try_from(delivered).unwrap_or(u32::MAX);
    shared
        .engine
        .dead_letter_event(event, &reason, attempts)
        .await;
    shared.metrics.dead_lettered.inc();
}

/// Runs the engine, re-claiming the entry now and then so that it does not look idle. True:
/// ack it (processing returned); false after a panic (it stays pending, to be redelivered).
async fn process(entry: &StreamId, event: &Event, delivered: u64, shared: &Shared) -> bool {
    let processing = AssertUnwindSafe(shared.engine.process(event)).catch_unwind();
    tokio::pin!(processing);
    let every =
        Duration::from_millis(shared.config.claim_idle_secs * 500).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            r = &mut processing => {
                if r.is_err() {
                    tracing::error!(
                        "redis: processing event {} panicked (delivery {delivered}); it will be redelivered",
                        event.id
                    );
                }
                return r.is_ok();
            }
            _ = ticker.tick() => touch(shared, &entry.id).await,
        }
    }
}

/// `XCLAIM … 0 id JUSTID`: resets the idle time of an entry this consumer is working on.
async fn touch(shared: &Shared, id: &str) {
    let r = redis::cmd("XCLAIM")
        .arg(&shared.config.stream)
        .arg(&shared.config.group)
        .arg(&shared.consumer)
        .arg(0)
        .arg(id)
        .arg("JUSTID")
        .query_async::<Value>(&mut shared.ops.clone())
        .await;
    if let Err(e) = r {
        tracing::debug!("redis: cannot refresh entry {id}: {e}");
    }
}

/// `XACK`, with [`ACK_RETRY`]; an entry not acked is redelivered (at least once).
async fn ack(shared: &Shared, id: &str) {
    let xack = |_| async {
        redis::cmd("XACK")
            .arg(&shared.config.stream)
            .arg(&shared.config.group)
            .arg(id)
            .query_async::<i64>(&mut shared.ops.clone())
            .await
    };
    if let Err((e, _)) = ACK_RETRY.run(xack, |_| true).await {
        tracing::warn!("redis: cannot acknowledge entry {id}: {e}; it will be redelivered");
    }
}

/// On a clean stop, removes this instance's consumer from the group if it holds no pending
/// entry (each start has a consumer name of its own, so they would pile up). Entries it still
/// holds keep it in the group until another instance reclaims them.
async fn leave_group(shared: &Shared) {
    let mut conn = shared.ops.clone();
    let held: redis::RedisResult<StreamPendingCountReply> = redis::cmd("XPENDING")
        .arg(&shared.config.stream)
        .arg(&shared.config.group)
        .arg("-")
        .arg("+")
        .arg(1)
        .arg(&shared.consumer)
        .query_async(&mut conn)
        .await;
    if !matches!(held, Ok(ref r) if r.ids.is_empty()) {
        return;
    }
    let removed = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&shared.config.stream)
        .arg(&shared.config.group)
        .arg(&shared.consumer)
        .query_async::<i64>(&mut conn)
        .await;
    if let Err(e) = removed {
        tracing::debug!("redis: cannot remove consumer {}: {e}", shared.consumer);
    }
}

// ---------------------------------------------------------------------------------------------
// Reclaiming

/// Every `claim_idle_secs / 2`: takes over entries idle for `claim_idle_secs`.
async fn reclaim_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(shared.config.claim_idle_secs * 500);
    let mut tasks = JoinSet::new();
    loop {
        if sleep_or_shutdown(&mut shutdown, every).await {
            break;
        }
        while tasks.try_join_next().is_some() {}
        if let Err(e) = reclaim_once(&shared, &mut tasks).await {
            tracing::warn!("redis: cannot reclaim idle entries: {e}");
        }
        if let Err(e) = forget_dead_consumers(&shared).await {
            tracing::debug!("redis: cannot list the group's consumers: {e}");
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// One pass of `XAUTOCLAIM` over the whole pending list, a batch at a time.
async fn reclaim_once(shared: &Arc<Shared>, tasks: &mut JoinSet<()>) -> redis::RedisResult<()> {
    let mut start = "0-0".to_owned();
    loop {
        let first = shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let reply = autoclaim(shared, &start).await?;
        for id in &reply.deleted_ids {
            tracing::error!(
                "redis: pending entry {id} of `{}` was trimmed from the stream before it was \
                 acknowledged (raise [observers.redis] maxlen)",
                shared.config.stream
            );
        }
        if !reply.claimed.is_empty() {
            shared.metrics.reclaimed.inc_by(reply.claimed.len() as u64);
            tracing::info!(
                "redis: reclaimed {} idle entries of `{}`",
                reply.claimed.len(),
                shared.config.stream
            );
            let counts = delivery_counts(shared, &reply.claimed).await;
            spawn_all(tasks, shared, reply.claimed, first, |e| {
                counts.iter().find(|(id, _)| *id == e.id).map_or(1, |c| c.1)
            })
            .await;
        }
        if reply.next_stream_id == "0-0" {
            return Ok(());
        }
        start = reply.next_stream_id;
    }
}

/// Deletes consumers that hold nothing and have not read for `10 × claim_idle_secs` (at least
/// 5 minutes): instances that were killed, once their entries were reclaimed. A live
/// instance reads every `block_ms`, and would be recreated by its next read anyway.
async fn forget_dead_consumers(shared: &Shared) -> redis::RedisResult<()> {
    let idle_ms = (shared.config.claim_idle_secs * 10_000).max(300_000);
    let mut conn = shared.ops.clone();
    let info: StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&shared.config.stream)
        .arg(&shared.config.group)
        .query_async(&mut conn)
        .await?;
    for c in info.consumers {
        if c.pending == 0 && c.idle as u64 > idle_ms && c.name != shared.consumer {
            redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&shared.config.stream)
                .arg(&shared.config.group)
                .arg(&c.name)
                .query_async::<i64>(&mut conn)
                .await?;
            tracing::info!("redis: removed idle consumer `{}` from the group", c.name);
        }
    }
    Ok(())
}

async fn autoclaim(shared: &Shared, start: &str) -> redis::RedisResult<StreamAutoClaimReply> {
    redis::cmd("XAUTOCLAIM")
        .arg(&shared.config.stream)
        .arg(&shared.config.group)
        .arg(&shared.consumer)
        .arg(shared.config.claim_idle_secs * 1000)
        .arg(start)
        .arg("COUNT")
        .arg(
            shared
                .config
                .batch_size
                .min(shared.permits.available_permits() + 1),
        )
        .query_async(&mut shared.ops.clone())
        .await
}

/// Delivery counts of just-claimed entries (`XPENDING` per entry, pipelined).
async fn delivery_counts(shared: &Shared, claimed: &[StreamId]) -> Vec<(String, u64)> {
    let queries = claimed.iter().map(|e| async move {
        let reply: redis::RedisResult<StreamPendingCountReply> = redis::cmd("XPENDING")
            .arg(&shared.config.stream)
            .arg(&shared.config.group)
            .arg(&e.id)
            .arg(&e.id)
            .arg(1)
            .query_async(&mut shared.ops.clone())
            .await;
        let count = reply
            .ok()
            .and_then(|r| r.ids.first().map(|p| p.times_delivered as u64))
            .unwrap_or(1);
        (e.id.clone(), count)
    });
    futures::future::join_all(queries).await
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fraiseql".to_owned())
}

/// Resolves when shutdown is requested or the sender is gone.
async fn shutdown_signal(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Sleeps `delay`; true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(rx: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *rx.borrow(),
        _ = shutdown_signal(rx) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
                .collect(),
            milliseconds_elapsed_from_delivery: None,
            delivered_count: None,
        }
    }

    #[test]
    fn an_entry_carries_the_nats_body_and_the_event_id() {
        let event = Event::new(
            "Order",
            EventKind::Update,
            "tb_order",
            Some(json!({"id": "o1", "total": 5})),
            Some(json!({"id": "o1", "total": 4})),
        );
        let payload = String::from_utf8(encode_body("s", &event).unwrap()).unwrap();
        let decoded = decode_entry(&entry(&[("id", &event.id), ("payload", &payload)])).unwrap();
        assert_eq!(decoded, event);
    }

    #[test]
    fn the_entry_id_stands_in_for_a_missing_event_id() {
        let payload = r#"{"event":"INSERT","entity":"Order","data":{"id":"o1"}}"#;
        assert_eq!(
            decode_entry(&entry(&[("payload", payload)])).unwrap().id,
            "1-0"
        );
    }

    #[test]
    fn malformed_entries_say_why_and_keep_their_fields() {
        let e = entry(&[("payload", "{nope"), ("entity", "Order")]);
        assert!(decode_entry(&e).unwrap_err().starts_with("invalid JSON"));
        let err = decode_entry(&entry(&[("x", "y")])).unwrap_err();
        assert_eq!(err, "missing field \"payload\"");
        let dead = malformed_event(&e, "s");
        assert_eq!(dead.entity, "Order");
        assert_eq!(dead.new.unwrap()["fields"]["payload"], "{nope");
    }
}
