//! The `nats` transport: JetStream publishing and a durable pull consumer.
//!
//! - [`connect`] opens the client (comma-separated URLs, credentials in the URL or from a
//!   credentials or nkey file, TLS, retry on the initial connect, reconnects forever) and
//!   checks that JetStream is enabled.
//! - [`ensure_stream`] / [`ensure_consumer`] create or update the stream over
//!   `{subject_prefix}.>` and the durable pull consumer with the configured limits.
//! - [`NatsPublisher`] publishes events to `{prefix}.{entity_lowercase}.{event_lowercase}` with
//!   `Nats-Msg-Id = event.id` (server-side deduplication within the duplicate window) and
//!   waits for every PubAck.
//! - [`NatsSource`] pulls from the durable consumer, runs [`Engine::process`] with bounded
//!   concurrency and acknowledges each message only after processing returned.
//!
//! The message body is [`super::codec`]'s.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    context::PublishAckFuture,
    message::{AckKind, PublishMessage},
    stream::{self, RetentionPolicy, StorageType, Stream},
};
use async_nats::{Client, ConnectOptions, HeaderMap, ServerAddr};
use futures::{FutureExt, StreamExt};

use super::codec::{decode_body, encode_body, subject_for};
use super::delivery::{
    self, Committer, Delivery, Fetch, NoCheckpoints, Payload, Settled, Source, Undecodable,
};
use super::partitions;
use super::Publisher;
use crate::redact::redact_url;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::NatsConfig;
use crate::engine::Engine;
use crate::error::{ConnectErrorKind, Error, PublishErrorKind, Result};
use crate::event::Event;
use crate::order::OrderKeys;
use crate::retry::{Backoff, RetryPolicy, PUBLISH_RETRY};
use crate::status::HealthSource;

/// Unacknowledged messages a consumer may hand out at once (across all instances).
pub const DEFAULT_MAX_ACK_PENDING: i64 = 1024;
/// Publishes kept in flight by [`NatsPublisher::publish_all`].
pub const DEFAULT_PUBLISH_WINDOW: usize = 4096;
/// PubAcks outstanding on a publisher's JetStream context (async-nats waits for room beyond).
pub const MAX_ACKS_IN_FLIGHT: usize = 8192;
/// The initial connect, until the server answers.
const CONNECT_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(5));
/// The CloudEvents 1.0 attributes of `event` as NATS headers (binary content mode): the
/// message body, unchanged, is the event's `data`.
fn cloudevents_headers(headers: &mut HeaderMap, event: &Event, source: &str) {
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", event.id.as_str());
    headers.insert("ce-source", source);
    headers.insert(
        "ce-type",
        crate::action::webhook::cloudevent_type(event).as_str(),
    );
    headers.insert("ce-time", event.timestamp.as_str());
    if let Some(key) = event.key() {
        headers.insert("ce-subject", key.as_str());
    }
    headers.insert("content-type", "application/json");
}

/// On a backfilled row: the backfill's id (the body carries `"backfill"` too).
pub const BACKFILL_HEADER: &str = "Fraiseql-Backfill";

/// `NATS/1.0\r\n` + `Nats-Msg-Id: ` + id + `\r\n\r\n`: what the one header adds to a message.
const MSG_ID_HEADER_OVERHEAD: usize = 10 + 13 + 4;
/// See [`NatsPublisher`]'s `check_above`.
const SMALL_MESSAGE: usize = 32 * 1024;

// ---------------------------------------------------------------------------------------------
// Metrics

/// NATS metrics (`fraiseql_nats_*`). Cheap to clone handles; register them once.
#[derive(Clone, Debug)]
pub struct NatsMetrics {
    /// `fraiseql_nats_messages_published_total`: publishes confirmed by a PubAck.
    pub published: Counter,
    /// `fraiseql_nats_messages_received_total`: messages pulled from the consumer.
    pub received: Counter,
    /// `fraiseql_nats_subscriptions_active`: running consumer loops.
    pub subscriptions_active: Gauge,
    /// `fraiseql_nats_jetstream_pending`: messages received and not yet acknowledged.
    pub jetstream_pending: Gauge,
    /// `fraiseql_nats_publish_latency_seconds`: send → PubAck, per attempt that succeeded.
    pub publish_latency: Histogram,
    /// `fraiseql_nats_partitions_owned`: partitions this instance holds the lease of.
    pub partitions_owned: Gauge,
}

impl Default for NatsMetrics {
    fn default() -> Self {
        NatsMetrics {
            published: Counter::default(),
            received: Counter::default(),
            subscriptions_active: Gauge::default(),
            jetstream_pending: Gauge::default(),
            // 100 µs … ~6.5 s
            publish_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            partitions_owned: Gauge::default(),
        }
    }
}

impl NatsMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric under its spec name (counters get `_total` from the encoder).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fraiseql_nats_messages_published",
            "Total messages published to NATS",
            self.published.clone(),
        );
        registry.register(
            "fraiseql_nats_messages_received",
            "Total messages received from NATS",
            self.received.clone(),
        );
        registry.register(
            "fraiseql_nats_subscriptions_active",
            "Currently active subscriptions",
            self.subscriptions_active.clone(),
        );
        registry.register(
            "fraiseql_nats_jetstream_pending",
            "Messages pending acknowledgement",
            self.jetstream_pending.clone(),
        );
        registry.register(
            "fraiseql_nats_publish_latency_seconds",
            "Histogram of publish latency",
            self.publish_latency.clone(),
        );
        registry.register(
            "fraiseql_nats_partitions_owned",
            "Partitions of the stream this instance owns ([observers.nats] partitions)",
            self.partitions_owned.clone(),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Connection

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the comma-separated server list and the credentials embedded in it.
fn parse_servers(urls: &str) -> Result<(Vec<ServerAddr>, ConnectOptions)> {
    let mut addrs = Vec::new();
    let mut options = ConnectOptions::new();
    let mut have_auth = false;
    for part in urls.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let addr: ServerAddr = part.parse().map_err(|e| {
            Error::connect(
                ConnectErrorKind::InvalidSettings,
                format!(
                    "invalid NATS server URL {} (observers.nats.url): {e}",
                    redact_url(part)
                ),
            )
        })?;
        if !have_auth {
            if let Some(user) = addr.username() {
                let user = percent_decode(user);
                options = match addr.password() {
                    Some(pass) => options.user_and_password(user, percent_decode(pass)),
                    None => options.token(user),
                };
                have_auth = true;
            }
        }
        addrs.push(addr);
    }
    if addrs.is_empty() {
        return Err(Error::connect(
            ConnectErrorKind::InvalidSettings,
            crate::config::NATS_URL_REQUIRED,
        ));
    }
    Ok((addrs, options))
}

/// The last "Permissions Violation" the server reported on a connection. NATS answers a
/// forbidden publish (a JetStream API request, say) with an asynchronous -ERR and no reply,
/// so without this a missing permission would look like a timeout.
#[derive(Default)]
struct PermissionWatch {
    last: std::sync::Mutex<Option<String>>,
    seen: tokio::sync::Notify,
}

impl PermissionWatch {
    fn record(&self, message: &str) {
        *self.last.lock().expect("permission lock") = Some(message.trim_matches('\'').to_owned());
        self.seen.notify_waiters();
    }

    fn last(&self) -> Option<String> {
        self.last.lock().expect("permission lock").clone()
    }
}

/// `tls_ca_file` / `tls_cert_file` + `tls_key_file`: any of them makes TLS required (a
/// `tls://` URL does too, by itself).
fn with_tls(options: ConnectOptions, config: &NatsConfig) -> ConnectOptions {
    let mut options = options;
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.into());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.into(), key.into());
    }
    if config.tls_ca_file.is_some() || config.tls_cert_file.is_some() {
        options = options.require_tls(true);
    }
    options
}

/// `credentials_file` (a user JWT, the nonce signed with its seed) or `nkey_file` (the nonce
/// signed with a user seed). The files were checked when the config was read; a file that has
/// since become unreadable stops the start-up. Returns the options and how the client
/// authenticates, for the error when the server refuses it.
async fn with_auth(
    options: ConnectOptions,
    config: &NatsConfig,
) -> Result<(ConnectOptions, Option<String>)> {
    if let Some(path) = &config.credentials_file {
        let options = options.credentials_file(path).await.map_err(|e| {
            Error::connect(
                ConnectErrorKind::InvalidSettings,
                format!("observers.nats.credentials_file: cannot use {path:?}: {e}"),
            )
        })?;
        return Ok((options, Some(format!("credentials_file {path:?}"))));
    }
    if let Some(path) = &config.nkey_file {
        let seed = crate::config::nats_auth::read_nkey_seed(path).map_err(|e| {
            Error::connect(
                ConnectErrorKind::InvalidSettings,
                format!("observers.nats.nkey_file: {e}"),
            )
        })?;
        let how = format!("nkey_file {path:?}, public key {}", seed.public_key());
        return Ok((options.nkey(seed.seed().to_string()), Some(how)));
    }
    Ok((options, None))
}

/// What the README's "NATS permissions" section grants, for the error that names a missing one.
pub fn minimal_permissions(subject_prefix: &str) -> String {
    format!(
        "publish [\"$JS.API.>\", \"$JS.ACK.>\", \"{subject_prefix}.>\"], subscribe [\"_INBOX.>\"]"
    )
}

fn permission_error(masked: &str, violation: &str, subject_prefix: &str) -> Error {
    Error::connect(
        ConnectErrorKind::Permission,
        format!(
            "the NATS server at {masked} denied a permission fraiseql needs: {violation}. \
             The user needs at least {} (see the README, NATS permissions)",
            minimal_permissions(subject_prefix)
        ),
    )
}

/// The kind of a failed connect, and whether trying again can help (authentication and TLS
/// setup problems will not fix themselves).
fn connect_failure(e: &async_nats::ConnectError) -> (ConnectErrorKind, bool) {
    use async_nats::ConnectErrorKind as K;
    match e.kind() {
        K::AuthorizationViolation | K::Authentication => (ConnectErrorKind::Authentication, false),
        K::Tls => (ConnectErrorKind::Tls, false),
        K::ServerParse => (ConnectErrorKind::InvalidSettings, false),
        _ => (ConnectErrorKind::Unreachable, true),
    }
}

/// Connects to NATS and checks that JetStream is enabled. The initial connect is retried
/// (with backoff, up to 5 s between attempts) until it succeeds; after that the client
/// reconnects forever on its own. Logs the spec's startup lines.
pub async fn connect(config: &NatsConfig) -> Result<Client> {
    let urls = config
        .url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
        .ok_or_else(|| {
            Error::connect(
                ConnectErrorKind::InvalidSettings,
                crate::config::NATS_URL_REQUIRED,
            )
        })?;
    let masked = redact_url(urls);
    // tls:// and tls_required servers need a rustls provider.
    super::use_ring_for_tls();
    let permissions = Arc::new(PermissionWatch::default());
    let mut backoff = Backoff::new(CONNECT_RETRY);
    let client = loop {
        let (addrs, options) = parse_servers(urls)?;
        let options = with_tls(options, config);
        let (options, auth) = with_auth(options, config).await?;
        let watch = permissions.clone();
        let options = options
            .name("fraiseql-observers")
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let watch = watch.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("[observers] nats: disconnected; reconnecting")
                        }
                        async_nats::Event::Connected => {
                            tracing::info!("[observers] nats: connected")
                        }
                        async_nats::Event::ServerError(async_nats::ServerError::Other(m))
                            if m.contains("Permissions Violation") =>
                        {
                            tracing::error!("[observers] nats: {m}");
                            watch.record(&m);
                        }
                        other => tracing::debug!("[observers] nats: {other}"),
                    }
                }
            });
        match options.connect(addrs).await {
            Ok(client) => break client,
            Err(e) => {
                let (kind, retry) = connect_failure(&e);
                if !retry {
                    let auth =
                        auth.map_or_else(String::new, |a| format!(" (authenticating with {a})"));
                    return Err(Error::connect(
                        kind,
                        format!("cannot connect to NATS at {masked}: {e}{auth}"),
                    ));
                }
                let delay = backoff.next_delay();
                tracing::warn!(
                    "[observers] cannot connect to NATS at {masked}: {e}; retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
        }
    };
    tracing::info!("[observers] transport: nats ({masked})");
    let checked = tokio::select! {
        r = jetstream_info(&client) => r,
        () = permissions.seen.notified() => Err(String::new()),
    };
    if let Some(violation) = permissions.last() {
        return Err(permission_error(
            &masked,
            &violation,
            &config.subject_prefix,
        ));
    }
    match checked {
        Ok(()) => tracing::info!("[observers] JetStream enabled: true"),
        Err(e) => {
            tracing::info!("[observers] JetStream enabled: false");
            return Err(Error::connect(
                ConnectErrorKind::NoJetStream,
                format!(
                    "JetStream is not available on the NATS server at {masked} \
                     (start nats-server with -js): {e}"
                ),
            ));
        }
    }
    tracing::info!("[observers] stream: {}", config.stream_name);
    Ok(client)
}

/// `$JS.API.INFO`: fails when JetStream is not enabled for this account. Parsed loosely so
/// that any server version (2.2+) answers.
async fn jetstream_info(client: &Client) -> std::result::Result<(), String> {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request("$JS.API.INFO", Vec::new().into()),
    )
    .await
    .map_err(|_| "no answer from $JS.API.INFO".to_string())?
    .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    match v.get("error") {
        Some(err) => Err(err
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("JetStream error")
            .to_string()),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Stream and consumer

/// The stream configuration derived from `config` (limits retention, file storage).
pub fn stream_config(config: &NatsConfig) -> stream::Config {
    let j = &config.jetstream;
    stream::Config {
        name: config.stream_name.clone(),
        subjects: vec![format!("{}.>", config.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: Duration::from_secs(j.max_age_days.saturating_mul(86_400)),
        max_messages: j.max_msgs,
        max_bytes: j.max_bytes,
        duplicate_window: Duration::from_secs(j.dedup_window_minutes.max(1).saturating_mul(60)),
        num_replicas: usize::try_from(j.replicas.clamp(1, 5)).unwrap_or(1),
        ..Default::default()
    }
}

fn js_err(what: &str, name: &str, e: impl std::fmt::Display) -> Error {
    Error::Transport(format!("JetStream: cannot {what} `{name}`: {e}"))
}

/// Creates the stream, or updates an existing one to the configured subjects, limits and
/// replicas (JetStream moves an existing stream to more or fewer copies). Settings that JetStream
/// cannot change on an existing stream (storage, retention) are compared first and a
/// mismatch is reported naming the setting.
pub async fn ensure_stream(js: &jetstream::Context, config: &NatsConfig) -> Result<Stream> {
    let want = stream_config(config);
    let name = want.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| js_err("read stream", &name, e))?;
            let current = info.config.clone();
            if current.storage != want.storage {
                return Err(Error::connect(
                    ConnectErrorKind::NotSetUp,
                    format!(
                        "JetStream stream `{name}` exists with storage {:?}, expected {:?}; \
                         storage cannot be changed on an existing stream: delete the stream or \
                         use another stream_name",
                        current.storage, want.storage
                    ),
                ));
            }
            if current.retention != want.retention {
                return Err(Error::connect(
                    ConnectErrorKind::NotSetUp,
                    format!(
                        "JetStream stream `{name}` exists with retention {:?}, expected {:?}; \
                         retention cannot be changed on an existing stream: delete the stream \
                         or use another stream_name",
                        current.retention, want.retention
                    ),
                ));
            }
            let mut updated = current.clone();
            for s in &want.subjects {
                if !updated.subjects.contains(s) {
                    updated.subjects.push(s.clone());
                }
            }
            updated.max_age = want.max_age;
            updated.max_messages = want.max_messages;
            updated.max_bytes = want.max_bytes;
            updated.duplicate_window = want.duplicate_window;
            updated.num_replicas = want.num_replicas;
            if updated != current {
                js.update_stream(&updated)
                    .await
                    .map_err(|e| js_err("update stream", &name, e))?;
                tracing::info!("[observers] JetStream stream `{name}` updated");
            }
            js.get_stream(&name)
                .await
                .map_err(|e| js_err("open stream", &name, e))
        }
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref je)
                    if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !not_found {
                return Err(js_err("look up stream", &name, e));
            }
            let created = js
                .create_stream(want)
                .await
                .map_err(|e| js_err("create stream", &name, e))?;
            tracing::info!("[observers] JetStream stream `{name}` created");
            Ok(created)
        }
    }
}

/// The durable pull consumer's configuration.
pub fn consumer_config(config: &NatsConfig) -> pull::Config {
    let j = &config.jetstream;
    pull::Config {
        durable_name: Some(config.consumer_name.clone()),
        description: Some("fraiseql observers".to_string()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(j.ack_wait_secs.max(1)),
        // One more than configured: a message delivered `max_deliver` times without an ack
        // (each run that took it was killed) comes once more, and the engine dead-letters it
        // without running it. At `max_deliver` the server would drop it without a word.
        max_deliver: if j.max_deliver > 0 {
            j.max_deliver.saturating_add(1)
        } else {
            j.max_deliver
        },
        max_ack_pending: DEFAULT_MAX_ACK_PENDING,
        ..Default::default()
    }
}

/// Creates the durable pull consumer `consumer_name` on `stream`, or updates it.
pub async fn ensure_consumer(stream: &Stream, config: &NatsConfig) -> Result<PullConsumer> {
    stream
        .create_consumer(consumer_config(config))
        .await
        .map_err(|e| js_err("create consumer", &config.consumer_name, e))
}

// ---------------------------------------------------------------------------------------------
// Publisher

/// Publishes events to JetStream and waits for their PubAcks.
#[derive(Clone)]
pub struct NatsPublisher {
    js: jetstream::Context,
    client: Client,
    /// Messages up to this size are not checked against the server's `max_payload`
    /// (reading the server info copies it; small messages cannot exceed any sane limit).
    check_above: usize,
    prefix: String,
    metrics: NatsMetrics,
    window: usize,
    /// `[observers.bridge] format = "cloudevents"`: the events' `source`; each message then
    /// carries its CloudEvents attributes as `ce-*` headers (binary mode, the JSON body is
    /// the event's data).
    cloudevents: Option<String>,
    /// `[observers.nats] partitions` (0: none): each event goes to `{subject}.{partition}`.
    partitions: u32,
    /// What keys the partitions: the engine's order keys (else each row's `id`).
    order: Arc<OrderKeys>,
}

impl NatsPublisher {
    /// What a config asks of the published messages: CloudEvents attributes in headers with
    /// `[observers.bridge] format = "cloudevents"`.
    pub fn for_config(mut self, config: &crate::config::Config) -> Self {
        self.cloudevents = (config.observers.bridge.format
            == crate::config::MessageFormat::CloudEvents)
            .then(|| config.cloudevents_source());
        self
    }

    /// A publisher on `client` for `config.subject_prefix`. The stream must exist
    /// ([`ensure_stream`]).
    pub fn new(client: Client, config: &NatsConfig, metrics: NatsMetrics) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .max_ack_inflight(MAX_ACKS_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let limit = client.server_info().max_payload;
        NatsPublisher {
            js,
            check_above: if limit == 0 {
                SMALL_MESSAGE
            } else {
                limit.min(SMALL_MESSAGE)
            },
            client,
            prefix: config.subject_prefix.clone(),
            metrics,
            window: DEFAULT_PUBLISH_WINDOW,
            cloudevents: None,
            partitions: config.partitions,
            order: Arc::default(),
        }
    }

    /// Partitions by the engine's order keys, so that the changes an engine orders together
    /// land in one partition (without it: by each row's `id`).
    pub fn with_order_keys(mut self, order: Arc<OrderKeys>) -> Self {
        self.order = order;
        self
    }

    /// Where `event` is published: `{prefix}.{entity}.{event}`, and `.{partition}` when the
    /// stream is partitioned.
    fn subject(&self, event: &Event) -> Result<(String, Option<u32>)> {
        let subject = subject_for(&self.prefix, event)?;
        if self.partitions == 0 {
            return Ok((subject, None));
        }
        Ok((subject, Some(self.order.partition(event, self.partitions))))
    }

    /// Connects to `config`'s server and creates or updates the stream first, so that no
    /// publish goes to a subject no stream captures (an application's own publisher).
    pub async fn connect(config: &NatsConfig, metrics: NatsMetrics) -> Result<Self> {
        let client = connect(config).await?;
        let js = jetstream::new(client.clone());
        ensure_stream(&js, config).await?;
        Ok(NatsPublisher::new(client, config, metrics))
    }

    /// Publishes kept in flight by [`Self::publish_all`] (at least 1).
    pub fn with_window(mut self, window: usize) -> Self {
        // Beyond the context's PubAck limit, a send would wait for an ack nobody awaits yet.
        self.window = window.clamp(1, MAX_ACKS_IN_FLIGHT);
        self
    }

    pub fn metrics(&self) -> &NatsMetrics {
        &self.metrics
    }

    /// Publishes one event and waits for its PubAck, with [`PUBLISH_RETRY`] and the same
    /// `Nats-Msg-Id` each time (so a retry of a publish that was in fact stored is
    /// deduplicated by the server). A change too large for the server fails at once.
    pub async fn publish(&self, event: &Event) -> Result<()> {
        let retryable = |e: &Error| matches!(e, Error::Publish(p) if p.kind().is_retryable());
        PUBLISH_RETRY
            .run(|_| self.publish_once(event), retryable)
            .await
            .map_err(|(e, attempts)| match e {
                Error::Publish(p) if attempts > 1 => Error::publish(
                    p.kind(),
                    format!("{} (after {attempts} attempts)", p.message()),
                ),
                other => other,
            })
    }

    /// One attempt: sends the event and waits for its PubAck.
    pub async fn publish_once(&self, event: &Event) -> Result<()> {
        let started = Instant::now();
        let ack = self.send(event).await?;
        ack.await.map_err(|e| ack_error(event, &e))?;
        self.record_published(started);
        Ok(())
    }

    /// Sends one event without waiting for its PubAck. A message larger than the server's
    /// `max_payload` is refused here: sent, it would make the server close the connection
    /// (and every publish in flight on it would fail with it).
    async fn send(&self, event: &Event) -> Result<PublishAckFuture> {
        let (subject, partition) = self.subject(event)?;
        // The body names the subject without the partition: consumers of the stream see
        // the same body whether it is partitioned or not.
        let payload = encode_body(&subject, event)?;
        let subject = match partition {
            Some(p) => format!("{subject}.{p}"),
            None => subject,
        };
        self.check_size(&subject, event, payload.len())?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
        if let Some(backfill) = &event.backfill {
            headers.insert(BACKFILL_HEADER, backfill.id.as_str());
        }
        if let Some(source) = &self.cloudevents {
            cloudevents_headers(&mut headers, event, source);
        }
        if let Some(traceparent) = crate::telemetry::outgoing(event) {
            headers.insert("traceparent", traceparent.as_str());
        }
        self.js
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(payload.into())
                    .headers(headers),
            )
            .await
            .map_err(|e| {
                Error::publish(
                    PublishErrorKind::Failed,
                    format!("cannot publish event {}: {e}", event.id),
                )
            })
    }

    fn check_size(&self, subject: &str, event: &Event, payload: usize) -> Result<()> {
        let backfill = event
            .backfill
            .as_ref()
            .map_or(0, |b| BACKFILL_HEADER.len() + 4 + b.id.len());
        // ce-* headers: the names and the fixed values, the id, source, type, time and key.
        let cloudevents = self.cloudevents.as_ref().map_or(0, |source| {
            160 + event.id.len()
                + source.len()
                + event.entity.len()
                + event.timestamp.len()
                + event.key().map_or(0, |k| k.len())
        });
        let traceparent = event.traceparent.as_ref().map_or(0, |_| 70);
        let size = payload
            + MSG_ID_HEADER_OVERHEAD
            + event.id.len()
            + backfill
            + cloudevents
            + traceparent;
        if size <= self.check_above {
            return Ok(());
        }
        // Read now: after a reconnect the server may be another one, with another limit.
        let limit = self.client.server_info().max_payload;
        if limit == 0 || size <= limit {
            return Ok(());
        }
        Err(Error::publish(
            PublishErrorKind::TooLarge,
            format!(
                "event {} is {size} bytes on `{subject}`, more than the NATS server's \
                 max_payload of {limit} bytes; publish smaller rows or raise max_payload in the \
                 server's configuration (see the README, Large changes)",
                event.id
            ),
        ))
    }

    fn record_published(&self, started: Instant) {
        self.metrics
            .publish_latency
            .observe(started.elapsed().as_secs_f64());
        self.metrics.published.inc();
    }

    /// Publishes every event with up to `window` PubAcks outstanding and waits for all of
    /// them. A publish that failed is retried ([`Self::publish`], same `Nats-Msg-Id`) after
    /// the others; an error is returned if any event could not be published.
    pub async fn publish_all(&self, events: &[Event]) -> Result<()> {
        let mut failed = 0usize;
        let mut first: Option<Error> = None;
        for i in self.publish_pipelined(events).await {
            if let Err(e) = self.publish(&events[i]).await {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(Error::publish(
                PublishErrorKind::Failed,
                format!(
                    "{failed} of {} events were not published; first error: {e}",
                    events.len()
                ),
            )),
        }
    }

    /// One attempt for each event, with up to `window` PubAcks outstanding; returns the
    /// indices of the events whose publish was not confirmed. Events are sent in order and
    /// their acks awaited oldest first, as a hand-written async-nats publisher would: an ack
    /// that arrives before it is awaited wakes nobody.
    pub async fn publish_pipelined<E: Borrow<Event> + Sync>(&self, events: &[E]) -> Vec<usize> {
        let mut in_flight: VecDeque<(usize, Instant, PublishAckFuture)> =
            VecDeque::with_capacity(self.window.min(events.len()));
        let mut unconfirmed = Vec::new();
        for (i, event) in events.iter().map(Borrow::borrow).enumerate() {
            if in_flight.len() >= self.window {
                let (j, started, ack) = in_flight.pop_front().expect("the window is full");
                if !self.settle(j, started, ack, &mut unconfirmed).await {
                    self.settle_together(&mut in_flight, &mut unconfirmed).await;
                }
            }
            match self.send(event).await {
                Ok(ack) => in_flight.push_back((i, Instant::now(), ack)),
                Err(e) => {
                    tracing::debug!("publish of event {} failed: {e}", event.id);
                    unconfirmed.push(i);
                }
            }
        }
        while let Some((j, started, ack)) = in_flight.pop_front() {
            if !self.settle(j, started, ack, &mut unconfirmed).await {
                self.settle_together(&mut in_flight, &mut unconfirmed).await;
            }
        }
        unconfirmed.sort_unstable();
        unconfirmed
    }

    /// Awaits one PubAck of [`Self::publish_pipelined`]; a failed one is set aside. True
    /// if it was confirmed.
    async fn settle(
        &self,
        index: usize,
        started: Instant,
        ack: PublishAckFuture,
        unconfirmed: &mut Vec<usize>,
    ) -> bool {
        self.record_ack(index, started, ack.await, unconfirmed)
    }

    /// Counts a confirmed publish, or sets the event aside as unconfirmed. True if confirmed.
    fn record_ack<T, E: std::fmt::Display>(
        &self,
        index: usize,
        started: Instant,
        result: std::result::Result<T, E>,
        unconfirmed: &mut Vec<usize>,
    ) -> bool {
        match result {
            Ok(_) => {
                self.record_published(started);
                true
            }
            Err(e) => {
                tracing::debug!("a publish was not confirmed: {e}");
                unconfirmed.push(index);
                false
            }
        }
    }

    /// After a PubAck that did not come: the connection most likely dropped, and with it the
    /// acks of everything sent before the drop. A PubAck's timeout runs from when it is first
    /// awaited, so awaiting them one after another waits one timeout each (19 lost acks held
    /// the bridge for 190 s after a nats-server restart): the rest are awaited together.
    async fn settle_together(
        &self,
        in_flight: &mut VecDeque<(usize, Instant, PublishAckFuture)>,
        unconfirmed: &mut Vec<usize>,
    ) {
        let waiting = in_flight
            .drain(..)
            .map(|(j, started, ack)| async move { (j, started, ack.await) });
        for (j, started, result) in futures::future::join_all(waiting).await {
            self.record_ack(j, started, result, unconfirmed);
        }
    }
}

/// A PubAck that did not come: timed out, or the server refused the message.
fn ack_error(event: &Event, e: &jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind as K;
    let kind = match e.kind() {
        K::TimedOut => PublishErrorKind::TimedOut,
        _ => PublishErrorKind::Failed,
    };
    Error::publish(
        kind,
        format!("event {} was not confirmed by JetStream: {e}", event.id),
    )
}

#[async_trait::async_trait]
impl Publisher for NatsPublisher {
    fn kind(&self) -> &'static str {
        "nats_publish"
    }

    fn describe(&self) -> String {
        "JetStream publish".to_owned()
    }

    async fn publish(&self, event: &Event) -> Result<()> {
        self.publish_once(event).await
    }

    async fn publish_batch(&self, events: &[&Event]) -> Option<Vec<usize>> {
        Some(self.publish_pipelined(events).await)
    }
}

// ---------------------------------------------------------------------------------------------
// Health

/// `/health` view of a NATS connection.
pub struct NatsHealth {
    client: Client,
    stream: String,
    /// With `partitions`: how many, and those this instance owns.
    partitions: Option<(u32, partitions::Owned)>,
}

impl NatsHealth {
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        NatsHealth {
            client,
            stream: stream.into(),
            partitions: None,
        }
    }

    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl HealthSource for NatsHealth {
    fn observers(&self) -> Value {
        let mut view = json!({
            "transport": "nats",
            "connected": self.connected(),
            "stream": self.stream,
        });
        if let Some((count, owned)) = &self.partitions {
            view["partitions"] = json!({
                "count": count,
                "owned": *owned.lock().expect("owned lock"),
            });
        }
        view
    }

    fn healthy(&self) -> bool {
        self.connected()
    }
}

// ---------------------------------------------------------------------------------------------
// Consumer

/// The durable pull consumer as a [`Source`] of the one delivery loop: each message is acked
/// only after its observers finished or were dead-lettered, kept alive with a progress ack
/// every `ack_wait / 2` while they run, and terminated once dead-lettered.
pub struct NatsSource {
    client: Client,
    config: NatsConfig,
    metrics: NatsMetrics,
    max_concurrency: usize,
    batch_size: usize,
    mode: Mode,
    /// The partitions owned, for `/health` (empty without partitions).
    owned: partitions::Owned,
}

/// One durable consumer, or one per partition (`[observers.nats] partitions`).
enum Mode {
    // Boxed: both are large (a consumer caches its info).
    Single {
        consumer: Box<PullConsumer>,
        messages: Option<Box<pull::Stream>>,
    },
    Partitioned {
        consumers: Vec<PullConsumer>,
        leases: Box<async_nats::jetstream::kv::Store>,
        /// Taken when the source runs.
        share: Option<partitions::Share>,
    },
}

impl NatsSource {
    /// Ensures the stream and the durable consumer, and binds to it. `max_concurrency` bounds
    /// the events processed at once (and the messages pulled ahead of processing).
    pub async fn new(
        client: Client,
        config: &NatsConfig,
        metrics: NatsMetrics,
        max_concurrency: usize,
    ) -> Result<NatsSource> {
        let js = jetstream::new(client.clone());
        let stream = ensure_stream(&js, config).await?;
        let mut consumers = partitions::ensure_consumers(&js, &stream, config).await?;
        let mode = if config.partitions == 0 {
            Mode::Single {
                consumer: Box::new(consumers.remove(0)),
                messages: None,
            }
        } else {
            Mode::Partitioned {
                consumers,
                leases: Box::new(partitions::open_bucket(&js, config).await?),
                share: None,
            }
        };
        let max_concurrency = max_concurrency.max(1);
        Ok(NatsSource {
            client,
            config: config.clone(),
            metrics,
            max_concurrency,
            batch_size: max_concurrency.clamp(1, 256),
            mode,
            owned: partitions::Owned::default(),
        })
    }

    /// Messages requested per pull (default: `max_concurrency`, at most 256).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// `/health`: `{"transport":"nats","connected":…,"stream":…}`, unhealthy while disconnected.
    pub fn health(&self) -> Arc<dyn HealthSource> {
        let mut health = NatsHealth::new(self.client.clone(), self.config.stream_name.clone());
        if self.config.partitions > 0 {
            health.partitions = Some((self.config.partitions, self.owned.clone()));
        }
        Arc::new(health)
    }

    /// Pulls and processes until `shutdown` turns true (or its sender is dropped), then waits
    /// for the events being processed and returns. Messages pulled but not started are
    /// handed back (nak) for redelivery.
    pub async fn run(mut self, engine: Arc<Engine>, shutdown: watch::Receiver<bool>) -> Result<()> {
        if let Mode::Partitioned {
            consumers,
            leases,
            share,
        } = &mut self.mode
        {
            *share = Some(partitions::Share::start(
                (**leases).clone(),
                &self.config,
                consumers.clone(),
                self.batch_size,
                self.owned.clone(),
                self.metrics.partitions_owned.clone(),
                shutdown.clone(),
            ));
        }
        self.metrics.subscriptions_active.inc();
        let max_concurrency = self.max_concurrency;
        delivery::run(self, engine, max_concurrency, shutdown).await
    }

    /// The pull stream ended or failed: make sure the stream and consumer exist again.
    async fn resubscribe(&mut self) {
        let Mode::Single { consumer, messages } = &mut self.mode else {
            return;
        };
        *messages = None;
        let js = jetstream::new(self.client.clone());
        if let Ok(stream) = ensure_stream(&js, &self.config).await {
            match ensure_consumer(&stream, &self.config).await {
                Ok(bound) => **consumer = bound,
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    fn delivery(
        &self,
        message: jetstream::Message,
        unsettled: Option<partitions::Unsettled>,
    ) -> NatsDelivery {
        self.metrics.received.inc();
        self.metrics.jetstream_pending.inc();
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let payload = match decode_body(&message.payload, fallback_id(&message)) {
            Ok(event) => Payload::Event(event),
            Err(reason) => Payload::Undecodable(undecodable(&message, reason)),
        };
        NatsDelivery {
            message,
            payload,
            delivered: u64::try_from(delivered).unwrap_or(1),
            pending: self.metrics.jetstream_pending.clone(),
            unsettled,
        }
    }
}

#[async_trait::async_trait]
impl Source for NatsSource {
    type Delivery = NatsDelivery;
    type Checkpoint = ();

    fn name(&self) -> String {
        format!("nats:{}", self.config.stream_name)
    }

    fn max_deliver(&self) -> u64 {
        u64::try_from(self.config.jetstream.max_deliver)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(u64::MAX)
    }

    fn progress_every(&self) -> Option<Duration> {
        let ack_wait = Duration::from_secs(self.config.jetstream.ack_wait_secs.max(1));
        Some((ack_wait / 2).max(Duration::from_millis(100)))
    }

    fn committer(&self) -> Arc<dyn Committer<()>> {
        Arc::new(NoCheckpoints)
    }

    async fn fetch(
        &mut self,
        max: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<NatsDelivery, ()>> {
        match &mut self.mode {
            Mode::Single { .. } => self.fetch_single(max, shutdown).await,
            Mode::Partitioned { share, .. } => {
                let share = share.as_mut().expect("started by run");
                let first = tokio::select! {
                    m = share.messages.recv() => m,
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(Fetch::Idle),
                };
                let Some(first) = first else {
                    return Ok(Fetch::Idle);
                };
                let mut ready = vec![first];
                while ready.len() < max {
                    match share.messages.try_recv() {
                        Ok(pulled) => ready.push(pulled),
                        Err(_) => break,
                    }
                }
                let deliveries = ready
                    .into_iter()
                    .map(|p| self.delivery(p.message, Some(p.unsettled)))
                    .collect();
                Ok(Fetch::Batch(deliveries, ()))
            }
        }
    }

    async fn close(&mut self) {
        match &mut self.mode {
            Mode::Single { messages, .. } => *messages = None,
            Mode::Partitioned { share, .. } => {
                if let Some(share) = share.take() {
                    share.finish().await;
                }
            }
        }
        self.metrics.subscriptions_active.dec();
    }
}

impl NatsSource {
    /// One fetch from the single durable consumer.
    async fn fetch_single(
        &mut self,
        max: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<NatsDelivery, ()>> {
        let Mode::Single { consumer, messages } = &mut self.mode else {
            unreachable!("fetch_single on a partitioned source");
        };
        if messages.is_none() {
            let pulled = consumer
                .stream()
                .max_messages_per_batch(self.batch_size)
                .expires(Duration::from_secs(5))
                .heartbeat(Duration::from_secs(2))
                .messages()
                .await
                .map_err(|e| {
                    Error::Transport(format!(
                        "cannot pull from consumer `{}`: {e}",
                        self.config.consumer_name
                    ))
                })?;
            *messages = Some(Box::new(pulled));
        }
        let messages = messages.as_mut().expect("just opened");
        let first = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(Fetch::Idle),
        };
        let first = match first {
            Some(Ok(message)) => message,
            None => {
                self.resubscribe().await;
                return Err(Error::Transport(format!(
                    "the pull from consumer `{}` ended; subscribing again",
                    self.config.consumer_name
                )));
            }
            Some(Err(e)) => {
                use async_nats::jetstream::consumer::pull::MessagesErrorKind as K;
                if matches!(e.kind(), K::MissingHeartbeat) {
                    // Nobody serves the pull any more (the consumer's leader died, say): a
                    // new pull goes to whoever leads it now. Kept, the stream could wait for
                    // ever without a message or an error.
                    tracing::info!(
                        "nats source `{}`: {e}; pulling again",
                        self.config.consumer_name
                    );
                    if let Mode::Single { messages, .. } = &mut self.mode {
                        *messages = None;
                    }
                    return Ok(Fetch::Idle);
                }
                if matches!(e.kind(), K::Pull | K::Other) {
                    tracing::debug!("nats source `{}`: {e}", self.config.consumer_name);
                    return Ok(Fetch::Idle);
                }
                self.resubscribe().await;
                return Err(Error::Transport(format!(
                    "consumer `{}`: {e}; subscribing again",
                    self.config.consumer_name
                )));
            }
        };
        let mut ready = vec![first];
        // Whatever has arrived already joins the batch; nothing more is waited for.
        while ready.len() < max {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => ready.push(message),
                _ => break,
            }
        }
        let deliveries = ready.into_iter().map(|m| self.delivery(m, None)).collect();
        Ok(Fetch::Batch(deliveries, ()))
    }
}

/// One message of the consumer.
pub struct NatsDelivery {
    message: jetstream::Message,
    payload: Payload,
    delivered: u64,
    /// `fraiseql_nats_jetstream_pending`, lowered when the delivery is dropped.
    pending: Gauge,
    /// Its partition's count of unsettled messages, lowered when the delivery is dropped.
    unsettled: Option<partitions::Unsettled>,
}

impl NatsDelivery {
    /// Answers the server; a partition's message that could not be answered stays
    /// unsettled (see [`partitions::Unsettled`]).
    async fn reply(&mut self, kind: AckKind) {
        match self.message.ack_with(kind).await {
            Ok(()) => {
                if let Some(unsettled) = &mut self.unsettled {
                    unsettled.settled();
                }
            }
            Err(e) => tracing::warn!(
                "nats: cannot acknowledge a message on `{}` ({kind:?}): {e}; it will be \
                 redelivered",
                self.message.subject
            ),
        }
    }
}

impl Drop for NatsDelivery {
    fn drop(&mut self) {
        self.pending.dec();
    }
}

impl Delivery for NatsDelivery {
    fn payload(&self) -> &Payload {
        &self.payload
    }

    fn delivered(&self) -> u64 {
        self.delivered
    }

    async fn ack(mut self, how: Settled) {
        // A dead-lettered message is terminated: the server never hands it out again.
        let kind = match how {
            Settled::Processed => AckKind::Ack,
            Settled::DeadLettered => AckKind::Term,
        };
        self.reply(kind).await;
    }

    async fn redeliver(mut self) {
        // Of a partition: at once, so that it comes before anything newer of its key, to
        // whoever pulls the partition next.
        let delay = match self.unsettled {
            Some(_) => None,
            None => Some(Duration::from_secs(1)),
        };
        self.reply(AckKind::Nak(delay)).await;
    }

    async fn progress(&self) {
        if let Err(e) = self.message.ack_with(AckKind::Progress).await {
            tracing::debug!("nats: cannot signal progress: {e}");
        }
    }
}

/// The message id for an entry of a message: `Nats-Msg-Id`, else `stream:sequence`.
fn fallback_id(message: &jetstream::Message) -> Option<String> {
    if let Some(v) = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_string())
        .filter(|v| !v.is_empty())
    {
        return Some(v);
    }
    message
        .info()
        .ok()
        .map(|i| format!("{}:{}", i.stream, i.stream_sequence))
}

fn undecodable(message: &jetstream::Message, reason: String) -> Undecodable {
    let sequence = message.info().ok().map(|i| i.stream_sequence);
    Undecodable {
        id: fallback_id(message).unwrap_or_else(|| message.subject.to_string()),
        context: json!({"subject": message.subject.as_str(), "stream_sequence": sequence}),
        raw: Some(message.payload.to_vec()),
        reason,
    }
}
