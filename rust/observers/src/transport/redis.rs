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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamPendingCountReply,
    StreamReadReply,
};
use redis::{Client, ErrorKind, RedisError, Value};
use serde_json::{json, Map};
use tokio::sync::watch;

use super::delivery::{
    self, Committer, Delivery, Fetch, NoCheckpoints, Payload, Settled, Source, Undecodable,
};
use crate::config::RedisConfig;
use crate::engine::Engine;
use crate::error::{ConnectErrorKind, Error, PublishErrorKind, Result};
use crate::event::Event;
use crate::metrics::RedisMetrics;
use crate::redact::redact_url;
use crate::retry::{Backoff, RetryPolicy, PUBLISH_RETRY};
use crate::status::HealthSource;
use crate::transport::codec::{decode_body, encode_body};
use crate::transport::Publisher;

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
    // rediss:// needs a rustls provider.
    super::use_ring_for_tls();
    let masked = redact_url(url);
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

/// What can be kept of an entry that does not decode: its fields, where it was, and the
/// payload's bytes as they are.
fn undecodable(entry: &StreamId, stream: &str, reason: String) -> Undecodable {
    let fields: Map<String, serde_json::Value> = entry
        .map
        .keys()
        .map(|k| (k.clone(), json!(field(entry, k))))
        .collect();
    let raw = entry.map.get("payload").and_then(|v| match v {
        Value::BulkString(bytes) => Some(bytes.clone()),
        _ => None,
    });
    Undecodable {
        id: field(entry, "id").unwrap_or_else(|| entry.id.clone()),
        context: json!({"stream": stream, "entry_id": entry.id, "fields": fields}),
        raw,
        reason: format!("malformed entry {}: {reason}", entry.id),
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer

/// The consumer group as a [`Source`] of the one delivery loop: new entries are read with
/// `XREADGROUP`, and every `claim_idle_secs / 2` a fetch first takes over entries idle for
/// `claim_idle_secs` (`XAUTOCLAIM`, a page at a time), so entries a dead instance left
/// pending go through the same loop.
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
    /// When the next reclaiming pass starts, and where the current one has got to.
    next_reclaim: tokio::time::Instant,
    reclaim_from: Option<String>,
    /// Shared by every delivery, to acknowledge and keep its entry.
    group: Arc<GroupHandle>,
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
        let group = Arc::new(GroupHandle {
            ops: ops.clone(),
            stream: config.stream.clone(),
            group: config.group.clone(),
            consumer: consumer.clone(),
            pending: metrics.pending.clone(),
            dead_lettered: metrics.dead_lettered.clone(),
        });
        let source = RedisSource {
            reader,
            ops,
            config: config.clone(),
            consumer,
            metrics,
            max_concurrency: max_concurrency.max(1),
            connected: Arc::new(AtomicBool::new(true)),
            next_reclaim: tokio::time::Instant::now(),
            reclaim_from: None,
            group,
        };
        Ok(RedisSource {
            next_reclaim: tokio::time::Instant::now() + source.reclaim_every(),
            ..source
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
    pub async fn run(self, engine: Arc<Engine>, shutdown: watch::Receiver<bool>) -> Result<()> {
        tracing::info!(
            "[observers] redis: reading `{}` as `{}` in group `{}`",
            self.config.stream,
            self.consumer,
            self.config.group
        );
        let max_concurrency = self.max_concurrency;
        delivery::run(self, engine, max_concurrency, shutdown).await
    }

    fn reclaim_every(&self) -> Duration {
        Duration::from_millis(self.config.claim_idle_secs * 500).max(Duration::from_millis(100))
    }

    /// One page of the reclaiming pass that is due, if one is.
    async fn reclaim(&mut self, max: usize) -> redis::RedisResult<Vec<(StreamId, u64)>> {
        if self.reclaim_from.is_none() {
            if tokio::time::Instant::now() < self.next_reclaim {
                return Ok(Vec::new());
            }
            self.reclaim_from = Some("0-0".to_owned());
            if let Err(e) = self.forget_dead_consumers().await {
                tracing::debug!("redis: cannot list the group's consumers: {e}");
            }
        }
        let start = self
            .reclaim_from
            .clone()
            .unwrap_or_else(|| "0-0".to_owned());
        let count = self.config.batch_size.min(max).max(1);
        let reply = match self.autoclaim(&start, count).await {
            Ok(reply) => reply,
            Err(e) => {
                self.reclaim_from = None;
                self.next_reclaim = tokio::time::Instant::now() + self.reclaim_every();
                return Err(e);
            }
        };
        for id in &reply.deleted_ids {
            tracing::error!(
                "redis: pending entry {id} of `{}` was trimmed from the stream before it was \
                 acknowledged (raise [observers.redis] maxlen)",
                self.config.stream
            );
        }
        if reply.next_stream_id == "0-0" {
            self.reclaim_from = None;
            self.next_reclaim = tokio::time::Instant::now() + self.reclaim_every();
        } else {
            self.reclaim_from = Some(reply.next_stream_id.clone());
        }
        if reply.claimed.is_empty() {
            return Ok(Vec::new());
        }
        self.metrics.reclaimed.inc_by(reply.claimed.len() as u64);
        tracing::info!(
            "redis: reclaimed {} idle entries of `{}`",
            reply.claimed.len(),
            self.config.stream
        );
        let counts = self.delivery_counts(&reply.claimed).await;
        Ok(reply
            .claimed
            .into_iter()
            .map(|e| {
                let n = counts.iter().find(|(id, _)| *id == e.id).map_or(1, |c| c.1);
                (e, n)
            })
            .collect())
    }

    /// `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS stream >`: new entries for this consumer.
    async fn read_new(&mut self, count: usize) -> redis::RedisResult<Vec<StreamId>> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(self.config.block_ms)
            .arg("STREAMS")
            .arg(&self.config.stream)
            .arg(">")
            .query_async(&mut self.reader)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
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
        }
    }

    fn delivery(&self, entry: StreamId, delivered: u64) -> RedisDelivery {
        self.metrics.received.inc();
        self.metrics.pending.inc();
        let payload = match decode_entry(&entry) {
            Ok(event) => Payload::Event(event),
            Err(reason) => Payload::Undecodable(undecodable(&entry, &self.config.stream, reason)),
        };
        RedisDelivery {
            entry_id: entry.id,
            payload,
            delivered,
            group: self.group.clone(),
        }
    }

    /// Deletes consumers that hold nothing and have not read for `10 × claim_idle_secs` (at
    /// least 5 minutes): instances that were killed, once their entries were reclaimed. A
    /// live instance reads every `block_ms`, and would be recreated by its next read anyway.
    async fn forget_dead_consumers(&self) -> redis::RedisResult<()> {
        let idle_ms = (self.config.claim_idle_secs * 10_000).max(300_000);
        let mut conn = self.ops.clone();
        let info: StreamInfoConsumersReply = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .query_async(&mut conn)
            .await?;
        for c in info.consumers {
            if c.pending == 0 && c.idle as u64 > idle_ms && c.name != self.consumer {
                redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(&self.config.stream)
                    .arg(&self.config.group)
                    .arg(&c.name)
                    .query_async::<i64>(&mut conn)
                    .await?;
                tracing::info!("redis: removed idle consumer `{}` from the group", c.name);
            }
        }
        Ok(())
    }

    async fn autoclaim(
        &self,
        start: &str,
        count: usize,
    ) -> redis::RedisResult<StreamAutoClaimReply> {
        redis::cmd("XAUTOCLAIM")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(self.config.claim_idle_secs * 1000)
            .arg(start)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.ops.clone())
            .await
    }

    /// Delivery counts of just-claimed entries (`XPENDING` per entry, pipelined).
    async fn delivery_counts(&self, claimed: &[StreamId]) -> Vec<(String, u64)> {
        let queries = claimed.iter().map(|e| async move {
            let reply: redis::RedisResult<StreamPendingCountReply> = redis::cmd("XPENDING")
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&e.id)
                .arg(&e.id)
                .arg(1)
                .query_async(&mut self.ops.clone())
                .await;
            let count = reply
                .ok()
                .and_then(|r| r.ids.first().map(|p| p.times_delivered as u64))
                .unwrap_or(1);
            (e.id.clone(), count)
        });
        futures::future::join_all(queries).await
    }

    /// On a clean stop, removes this instance's consumer from the group if it holds no
    /// pending entry (each start has a consumer name of its own, so they would pile up).
    /// Entries it still holds keep it in the group until another instance reclaims them.
    async fn leave_group(&self) {
        let mut conn = self.ops.clone();
        let held: redis::RedisResult<StreamPendingCountReply> = redis::cmd("XPENDING")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(&self.consumer)
            .query_async(&mut conn)
            .await;
        if !matches!(held, Ok(ref r) if r.ids.is_empty()) {
            return;
        }
        let removed = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .query_async::<i64>(&mut conn)
            .await;
        if let Err(e) = removed {
            tracing::debug!("redis: cannot remove consumer {}: {e}", self.consumer);
        }
    }
}

#[async_trait]
impl Source for RedisSource {
    type Delivery = RedisDelivery;
    type Checkpoint = ();

    fn name(&self) -> String {
        format!("redis:{}", self.config.stream)
    }

    fn max_deliver(&self) -> u64 {
        self.config.max_deliver
    }

    /// While an event is processed its entry is re-claimed by its own consumer, so a slow
    /// action is not mistaken for a dead instance.
    fn progress_every(&self) -> Option<Duration> {
        Some(self.reclaim_every())
    }

    fn committer(&self) -> Arc<dyn Committer<()>> {
        Arc::new(NoCheckpoints)
    }

    async fn fetch(
        &mut self,
        max: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<RedisDelivery, ()>> {
        match self.reclaim(max).await {
            Ok(claimed) if !claimed.is_empty() => {
                let deliveries = claimed
                    .into_iter()
                    .map(|(entry, n)| self.delivery(entry, n))
                    .collect();
                return Ok(Fetch::Batch(deliveries, ()));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("redis: cannot reclaim idle entries: {e}"),
        }
        let count = max.min(self.config.batch_size).max(1);
        let read = tokio::select! {
            r = self.read_new(count) => r,
            // An entry read by the abandoned XREADGROUP stays pending: it is reclaimed.
            _ = shutdown.wait_for(|stop| *stop) => return Ok(Fetch::Idle),
        };
        match read {
            Ok(entries) => {
                self.connected.store(true, Ordering::Release);
                if entries.is_empty() {
                    return Ok(Fetch::Idle);
                }
                let deliveries = entries.into_iter().map(|e| self.delivery(e, 1)).collect();
                Ok(Fetch::Batch(deliveries, ()))
            }
            Err(e) => {
                self.connected.store(false, Ordering::Release);
                self.on_read_error(&e).await;
                Err(redis_err(&format!("read `{}`", self.config.stream), &e))
            }
        }
    }

    async fn close(&mut self) {
        self.leave_group().await;
    }
}

/// What a delivery needs to acknowledge or keep its entry.
struct GroupHandle {
    ops: ConnectionManager,
    stream: String,
    group: String,
    consumer: String,
    pending: prometheus_client::metrics::gauge::Gauge,
    dead_lettered: prometheus_client::metrics::counter::Counter,
}

/// One entry of the group.
pub struct RedisDelivery {
    entry_id: String,
    payload: Payload,
    delivered: u64,
    group: Arc<GroupHandle>,
}

impl Drop for RedisDelivery {
    fn drop(&mut self) {
        self.group.pending.dec();
    }
}

impl Delivery for RedisDelivery {
    fn payload(&self) -> &Payload {
        &self.payload
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    /// `XACK`, with `ACK_RETRY`; an entry not acked is redelivered (at least once).
    async fn ack(self, how: Settled) {
        if how == Settled::DeadLettered {
            self.group.dead_lettered.inc();
        }
        let g = &self.group;
        let id = &self.entry_id;
        let xack = |_| async {
            redis::cmd("XACK")
                .arg(&g.stream)
                .arg(&g.group)
                .arg(id)
                .query_async::<i64>(&mut g.ops.clone())
                .await
        };
        if let Err((e, _)) = ACK_RETRY.run(xack, |_| true).await {
            tracing::warn!("redis: cannot acknowledge entry {id}: {e}; it will be redelivered");
        }
    }

    /// Left pending: reclaimed after `claim_idle_secs`, by this instance or another.
    async fn redeliver(self) {}

    /// `XCLAIM … 0 id JUSTID`: resets the idle time of the entry without counting a delivery.
    async fn progress(&self) {
        let g = &self.group;
        let r = redis::cmd("XCLAIM")
            .arg(&g.stream)
            .arg(&g.group)
            .arg(&g.consumer)
            .arg(0)
            .arg(&self.entry_id)
            .arg("JUSTID")
            .query_async::<Value>(&mut g.ops.clone())
            .await;
        if let Err(e) = r {
            tracing::debug!("redis: cannot refresh entry {}: {e}", self.entry_id);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

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
    fn malformed_entries_say_why_and_keep_their_fields_and_bytes() {
        let e = entry(&[("payload", "{nope"), ("entity", "Order")]);
        let reason = decode_entry(&e).unwrap_err();
        assert!(reason.starts_with("invalid JSON"));
        let err = decode_entry(&entry(&[("x", "y")])).unwrap_err();
        assert_eq!(err, "missing field \"payload\"");
        let dead = undecodable(&e, "s", reason);
        assert_eq!(dead.context["fields"]["payload"], "{nope");
        assert_eq!(dead.context["fields"]["entity"], "Order");
        assert_eq!(dead.raw.as_deref(), Some(&b"{nope"[..]));
        assert!(dead.reason.starts_with("malformed entry 1-0: invalid JSON"));
    }
}
