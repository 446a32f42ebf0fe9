//! Configuration: `fraiseql.toml` plus the runtime file `fraiseql-observer.toml`, merged into
//! one typed [`Config`].
//!
//! Precedence for NATS settings, lowest to highest: defaults < `fraiseql.toml`
//! (`[observers] nats_url` is shorthand for `[observers.nats] url`) < `fraiseql-observer.toml`
//! (`[transport]`, `[transport.nats]`, `[transport.nats.jetstream]`) < the `FRAISEQL_NATS_*`
//! environment variables. `[transport] backend` overrides `[observers] backend`.
//!
//! Every string value may contain `${VAR}` or `${VAR:-default}`, replaced from the environment
//! when the file is loaded (`*_env` keys hold variable *names* and are not interpolated).
//! Integer and boolean keys also accept a string made of such references
//! (`http_port = "${PORT:-8080}"`).
//!
//! Loading collects every problem instead of stopping at the first; each [`ConfigError`]
//! names the file, the dotted key, the line and what was expected. An unknown key anywhere is
//! an error with a did-you-mean.
//!
//! This module is self-contained (`std`, `toml`, `strsim`, `nkeys`): NATS authentication files
//! are checked with [`nats_auth`], the parser the connection uses too.

mod error;
mod handler;
mod interp;
mod load;
pub mod nats_auth;
mod node;
mod reader;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

pub use error::{ConfigError, ConfigErrors};

impl Config {
    /// The CloudEvents `source`: `[observers.cloudevents] source`, else the database it
    /// captures (`postgresql://host:port/db`, without credentials), else `urn:fraiseql`.
    pub fn cloudevents_source(&self) -> String {
        if let Some(source) = &self.observers.cloudevents_source {
            return source.clone();
        }
        let from_database = self.database.url.as_deref().and_then(|u| {
            let url = url::Url::parse(u).ok()?;
            let host = url.host_str()?;
            let port = url.port().map_or_else(String::new, |p| format!(":{p}"));
            Some(format!("postgresql://{host}{port}{}", url.path()))
        });
        from_database.unwrap_or_else(|| "urn:fraiseql".to_owned())
    }
}

/// A CloudEvents `source`: a URI reference (RFC 3986), e.g. `https://shop.example/orders`,
/// `/orders` or `urn:shop:orders`.
pub fn check_uri_reference(s: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c);
    if s.is_empty() {
        return Err("expected a URI reference (e.g. \"https://shop.example/orders\"), found an empty string".into());
    }
    if let Some(bad) = s.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "expected a URI reference (e.g. \"https://shop.example/orders\"), found {} ({bad:?} \
             is not allowed in a URI; percent-encode it)",
            node::quote_short(s)
        ));
    }
    let bytes = s.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)))
        {
            return Err(format!(
                "expected a URI reference, found {} (a '%' must start a %XX escape)",
                node::quote_short(s)
            ));
        }
    }
    Ok(())
}

/// The closest of `options` to a mistyped `input`, if one is close enough (the did-you-mean of
/// every name the user types).
pub fn suggest_from<'a>(input: &str, options: &[&'a str]) -> Option<&'a str> {
    reader::suggest(input, options)
}

/// Message when the NATS backend has no server URL (verbatim from the product spec).
pub const NATS_URL_REQUIRED: &str = "NATS transport requires nats.url to be set";
/// Message when `run_bridge = true` without the NATS backend (verbatim from the product spec).
pub const RUN_BRIDGE_REQUIRES_NATS: &str = "run_bridge=true requires transport=nats";

/// Idempotency table used by `effectively_once` when none is named.
pub const DEFAULT_IDEMPOTENCY_TABLE: &str = "fraiseql_observer_idempotency";
/// Default PostgreSQL NOTIFY channel.
pub const DEFAULT_NOTIFY_CHANNEL: &str = "fraiseql_changes";
/// Default publication of logical capture.
pub const DEFAULT_PUBLICATION: &str = "fraiseql";
/// Default alarm threshold for the WAL a replication slot keeps: 1 GiB.
pub const DEFAULT_MAX_RETAINED_WAL: u64 = 1 << 30;
/// Default webhook timeout.
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 10_000;
/// Default SMTP port.
pub const DEFAULT_SMTP_PORT: u16 = 587;

/// What a command needs to know of a config before loading it whole (`fraiseql run
/// --embedded` decides from it what to start and which variable to point at it), read even
/// when something else in the files is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFacts {
    /// After `[transport] backend` in the runtime file.
    pub backend: Backend,
    /// `backend = "nats"` or `run_bridge = true`.
    pub uses_nats: bool,
    /// The NATS URL after every override, if one could be read.
    pub nats_url: Option<String>,
    /// The variable the database URL is read from (`DATABASE_URL` when the file sets none,
    /// `VAR` for `url = "${VAR}"`); `None` when the file sets a URL of its own.
    pub database_url_env: Option<String>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    /// `[database]`
    pub database: DatabaseConfig,
    /// `[observers]`
    pub observers: ObserversConfig,
}

/// `[database]`
#[derive(Clone, PartialEq, Eq, Default)]
pub struct DatabaseConfig {
    /// `url`, else the `DATABASE_URL` environment variable.
    pub url: Option<String>,
}

/// `[observers]`
#[derive(Clone, PartialEq, Eq)]
pub struct ObserversConfig {
    /// `enabled` (default true)
    pub enabled: bool,
    /// `backend` (default postgres); `[transport] backend` overrides it.
    pub backend: Backend,
    /// `redis_url`; required by the redis backend.
    pub redis_url: Option<String>,
    /// `max_dlq_size`; `None` = unbounded (the default).
    pub max_dlq_size: Option<usize>,
    /// `run_bridge` (default false): forward the PostgreSQL change log to NATS.
    pub run_bridge: bool,
    /// `http_port` for `/health` and `/metrics` (default 8080).
    pub http_port: u16,
    /// `http_host`: the address the status server binds (default `127.0.0.1`: this machine
    /// only; `0.0.0.0` for every interface).
    pub http_host: String,
    /// `auto_install` the change-capture SQL at startup (default true).
    pub auto_install: bool,
    /// `max_concurrency`: actions running at once (default 256).
    pub max_concurrency: usize,
    /// `ordering`: the default of observers that do not say (default `per_key`).
    pub ordering: Ordering,
    /// `shutdown_timeout_secs`: how long a stop waits for the events being processed (default
    /// 30); what has not finished is left unacknowledged and delivered again.
    pub shutdown_timeout_secs: u64,
    /// `blocked_after_secs`: `/health` turns 503, naming the observer, event and key, when an
    /// event has been processed for this long (default 60).
    pub blocked_after_secs: u64,
    /// `admin_token_env`: the variable holding the token the console's mutations (retry,
    /// purge) need as `Authorization: Bearer …`; `None`: the console is read-only.
    pub admin_token_env: Option<String>,
    /// `queue_capacity`: bounded event queue (default 10 000).
    pub queue_capacity: usize,
    /// `notify_channel` (default `fraiseql_changes`).
    pub notify_channel: String,
    /// `[observers.nats]`, merged with `[transport.nats]` and `FRAISEQL_NATS_*`.
    pub nats: NatsConfig,
    /// `[observers.bridge]`
    pub bridge: BridgeConfig,
    /// `[observers.postgres]`: the change-log reader of the postgres backend.
    pub postgres: PostgresConfig,
    /// `[observers.redis]` (the URL is `redis_url`).
    pub redis: RedisConfig,
    /// `[[observers.handlers]]`, in definition order.
    pub handlers: Vec<HandlerConfig>,
    /// `[observers.cloudevents] source`: the `source` of every CloudEvent (webhooks with
    /// `format = "cloudevents"`, the bridge); `None` = derived from the database.
    pub cloudevents_source: Option<String>,
    /// `[observers.telemetry]`: spans exported over OTLP.
    pub telemetry: TelemetryConfig,
}

/// `[observers.telemetry]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `otlp_endpoint`: an OTLP/HTTP collector (`http://127.0.0.1:4318`); `None` = no spans.
    pub otlp_endpoint: Option<String>,
    /// `service_name` (default `fraiseql`).
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "fraiseql".to_owned(),
        }
    }
}

/// Where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// PostgreSQL change log + LISTEN/NOTIFY (default).
    #[default]
    Postgres,
    /// NATS JetStream durable consumer.
    Nats,
    /// Redis Stream + consumer group.
    Redis,
    /// In-process bus (tests, embedding).
    InMemory,
}

impl Backend {
    /// `"postgres" | "nats" | "redis" | "in_memory"`
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Nats => "nats",
            Backend::Redis => "redis",
            Backend::InMemory => "in_memory",
        }
    }

    /// Parses a backend name, any case; `in-memory` and `postgresql` are accepted too.
    pub fn parse(s: &str) -> Option<Backend> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "postgres" | "postgresql" => Some(Backend::Postgres),
            "nats" => Some(Backend::Nats),
            "redis" => Some(Backend::Redis),
            "in_memory" | "inmemory" | "memory" => Some(Backend::InMemory),
            _ => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::parse(s).ok_or_else(|| {
            format!("expected one of \"postgres\", \"nats\", \"redis\", \"in_memory\", found {s:?}")
        })
    }
}

/// NATS settings after merging every source.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. No default: the nats backend requires it.
    pub url: Option<String>,
    /// default `fraiseql.mutation`
    pub subject_prefix: String,
    /// default `fraiseql_observer_worker`
    pub consumer_name: String,
    /// default `fraiseql_events`
    pub stream_name: String,
    /// PEM file of the CA that signed the server's certificate (else the system roots).
    /// Any `tls_*` key (or a `tls://` URL) makes TLS required.
    pub tls_ca_file: Option<String>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    /// A NATS credentials file (`.creds`: the user JWT and its nkey seed), for servers in
    /// operator (decentralized JWT) mode.
    pub credentials_file: Option<String>,
    /// A file holding a user nkey seed (`SU…`), for servers that list the user's public nkey.
    pub nkey_file: Option<String>,
    /// Partitions of the stream (default 0: none). With N > 0 each change is published to
    /// `{subject}.{partition}`, partition = its order key modulo N, and the instances sharing
    /// the consumer share the partitions, one owner each: per-key order across instances.
    pub partitions: u32,
    /// `[*.nats.jetstream]`
    pub jetstream: JetStreamConfig,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: None,
            subject_prefix: "fraiseql.mutation".to_string(),
            consumer_name: "fraiseql_observer_worker".to_string(),
            stream_name: "fraiseql_events".to_string(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            credentials_file: None,
            nkey_file: None,
            partitions: 0,
            jetstream: JetStreamConfig::default(),
        }
    }
}

/// JetStream stream and consumer limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// Duplicate window, minutes (default 5, at least 1).
    pub dedup_window_minutes: u64,
    /// Max message age, days (default 7; 0 = no age limit).
    pub max_age_days: u64,
    /// default 10 000 000; -1 = unlimited
    pub max_msgs: i64,
    /// default 10 737 418 240 (10 GiB); -1 = unlimited
    pub max_bytes: i64,
    /// Ack wait, seconds (default 30, at least 1).
    pub ack_wait_secs: u64,
    /// Max deliveries (default 3); -1 = unlimited
    pub max_deliver: i64,
    /// Copies of the stream on a JetStream cluster (default 1; 3 or 5 on a cluster of that
    /// many servers or more).
    pub replicas: u64,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            dedup_window_minutes: 5,
            max_age_days: 7,
            max_msgs: 10_000_000,
            max_bytes: 10_737_418_240,
            ack_wait_secs: 30,
            max_deliver: 3,
            replicas: 1,
        }
    }
}

/// `[observers.bridge]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    /// default `pg_to_nats`
    pub transport_name: String,
    /// default 100
    pub batch_size: usize,
    /// default 1
    pub poll_interval_secs: u64,
    /// default: `[observers] notify_channel` (itself `fraiseql_changes` by default)
    pub notify_channel: String,
    /// `format`: what the bridge publishes — the spec's JSON (default), or the same body as
    /// a CloudEvents 1.0 event in binary mode (`ce-*` headers).
    pub format: MessageFormat,
}

/// The form of what the bridge publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MessageFormat {
    #[default]
    Json,
    /// The JSON body as the event's data, its attributes in `ce-*` headers (binary mode).
    CloudEvents,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            transport_name: "pg_to_nats".to_string(),
            batch_size: 100,
            poll_interval_secs: 1,
            notify_channel: DEFAULT_NOTIFY_CHANNEL.to_string(),
            format: MessageFormat::Json,
        }
    }
}

/// `[observers.postgres]`: how the postgres backend reads the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The cursor's name (default `fraiseql`). Instances with the same id share the work,
    /// one active at a time; another id reads every change again, independently.
    pub listener_id: String,
    /// Change-log rows read per batch (default 500).
    pub batch_size: usize,
    /// The safety-net poll, and the only wake-up when `listen = false` (default 1000 ms).
    pub poll_interval_ms: u64,
    /// LISTEN for the triggers' wake-ups (default true). With false, the triggers send no
    /// NOTIFY at all (cheaper writers) and changes are found by polling.
    pub listen: bool,
    /// Capture no change-log row for an UPDATE that changes nothing (default true).
    pub skip_unchanged_updates: bool,
    /// `capture`: read the WAL (logical replication) or the trigger-written change log
    /// (default `auto`: logical where the server and the role allow it).
    pub capture: Capture,
    /// `publication`: the publication logical capture reads (default `fraiseql`).
    pub publication: String,
    /// `max_retained_wal`: `/health` turns 503 when a replication slot of this process keeps
    /// more WAL than this on the server (default 1 GiB).
    pub max_retained_wal: u64,
    /// `retention` (trigger capture): consumed change-log rows are deleted; a cursor that has
    /// not moved (nor been kept alive by a running reader) for this long stops holding rows
    /// back (default 7 days).
    pub retention: std::time::Duration,
    /// `stall_warning_secs`: delivery held back this long is reported, with what holds it
    /// (default 30).
    pub stall_warning_secs: u64,
}

/// How row changes are captured from PostgreSQL (`[observers.postgres] capture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Capture {
    /// Logical when `wal_level = logical` and the role may replicate, triggers otherwise.
    #[default]
    Auto,
    /// A publication and a replication slot (pgoutput): nothing waits on other transactions.
    Logical,
    /// Triggers writing `fraiseql_change_log`, read by cursor.
    Trigger,
}

impl Capture {
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Auto => "auto",
            Capture::Logical => "logical",
            Capture::Trigger => "trigger",
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            listener_id: "fraiseql".to_string(),
            batch_size: 500,
            poll_interval_ms: 1000,
            listen: true,
            skip_unchanged_updates: true,
            capture: Capture::Auto,
            publication: DEFAULT_PUBLICATION.to_string(),
            max_retained_wal: DEFAULT_MAX_RETAINED_WAL,
            retention: std::time::Duration::from_secs(7 * 86_400),
            stall_warning_secs: 30,
        }
    }
}

/// `[observers.redis]`: the stream, the consumer group and the forwarder. The server, user,
/// password, database number and TLS (`rediss://`) all come from `[observers] redis_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// The stream every change is appended to (default `fraiseql:changes`).
    pub stream: String,
    /// The consumer group shared by every instance (default `fraiseql`).
    pub group: String,
    /// `XADD … MAXLEN ~ maxlen` (default 1 000 000).
    pub maxlen: u64,
    /// Entries pending longer than this are reclaimed from their consumer (default 30).
    pub claim_idle_secs: u64,
    /// Deliveries before an entry is dead-lettered (default 5).
    pub max_deliver: u64,
    /// How long one `XREADGROUP` blocks waiting for entries (default 2000).
    pub block_ms: u64,
    /// Entries read per `XREADGROUP` (default 256).
    pub batch_size: usize,
    /// Listener id (cursor and advisory lock) of the PostgreSQL → Redis forwarder
    /// (default `pg_to_redis`).
    pub forwarder_name: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            stream: "fraiseql:changes".to_string(),
            group: "fraiseql".to_string(),
            maxlen: 1_000_000,
            claim_idle_secs: 30,
            max_deliver: 5,
            block_ms: 2_000,
            batch_size: 256,
            forwarder_name: "pg_to_redis".to_string(),
        }
    }
}

/// One observer declared in TOML (or built by the Python front).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerConfig {
    /// Unique name; also the listener id of its idempotency keys.
    pub name: String,
    /// Entity type, e.g. `Order`.
    pub entity: String,
    /// Table, default `tb_` + snake_case(entity).
    pub table: String,
    /// `"INSERT" | "UPDATE" | "DELETE"`
    pub event: String,
    /// Condition source, compiled elsewhere.
    pub condition: Option<String>,
    /// Retry policy of its actions.
    pub retry: RetryConfig,
    /// Delivery strategy.
    pub checkpoint: CheckpointConfig,
    /// At least one action.
    pub actions: Vec<ActionConfig>,
    /// `timeout_ms`: how long one call of the observer's own function (a Python handler)
    /// may take; `None` = 30 s.
    pub timeout_ms: Option<u64>,
    /// `ordering`: `None` = `[observers] ordering`.
    pub ordering: Option<Ordering>,
    /// `order_key`: the columns whose values make the key changes are ordered by (default
    /// `["id"]`).
    pub order_key: Option<Vec<String>>,
    /// Where it was declared, e.g. `fraiseql.toml:12`.
    pub origin: String,
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// default 3, at least 1 (1 = no retry)
    pub max_attempts: u32,
    /// default exponential
    pub backoff_strategy: BackoffStrategy,
    /// default 100
    pub initial_delay_ms: u64,
    /// default 30 000; at least `initial_delay_ms`
    pub max_delay_ms: u64,
    /// default true
    pub jitter: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_strategy: BackoffStrategy::Exponential,
            initial_delay_ms: 100,
            max_delay_ms: 30_000,
            jitter: true,
        }
    }
}

/// How the delay grows between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackoffStrategy {
    /// Always `initial_delay_ms`.
    Fixed,
    /// `initial_delay_ms * attempt`
    Linear,
    /// `initial_delay_ms * 2^(attempt-1)` (default)
    #[default]
    Exponential,
}

impl BackoffStrategy {
    /// `"fixed" | "linear" | "exponential"`
    pub fn as_str(self) -> &'static str {
        match self {
            BackoffStrategy::Fixed => "fixed",
            BackoffStrategy::Linear => "linear",
            BackoffStrategy::Exponential => "exponential",
        }
    }
}

impl fmt::Display for BackoffStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Delivery strategy of a handler.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CheckpointConfig {
    /// May run more than once for one event (default).
    #[default]
    AtLeastOnce,
    /// Records (listener id, event id) in `idempotency_table` before running the actions.
    EffectivelyOnce {
        /// A checked SQL identifier, optionally `schema.table`.
        idempotency_table: String,
    },
}

impl CheckpointConfig {
    /// `"at_least_once" | "effectively_once"`
    pub fn as_str(&self) -> &'static str {
        match self {
            CheckpointConfig::AtLeastOnce => "at_least_once",
            CheckpointConfig::EffectivelyOnce { .. } => "effectively_once",
        }
    }

    /// The idempotency table, for `EffectivelyOnce`.
    pub fn idempotency_table(&self) -> Option<&str> {
        match self {
            CheckpointConfig::AtLeastOnce => None,
            CheckpointConfig::EffectivelyOnce { idempotency_table } => Some(idempotency_table),
        }
    }
}

/// One action of a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionConfig {
    /// HTTP POST
    Webhook(WebhookConfig),
    /// Slack incoming webhook
    Slack(SlackConfig),
    /// SMTP
    Email(EmailConfig),
}

impl ActionConfig {
    /// `"webhook" | "slack" | "email"`
    pub fn kind(&self) -> &'static str {
        match self {
            ActionConfig::Webhook(_) => "webhook",
            ActionConfig::Slack(_) => "slack",
            ActionConfig::Email(_) => "email",
        }
    }
}

/// `type = "webhook"`. Exactly one of `url` / `url_env` is set.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Literal URL (after `${VAR}` interpolation).
    pub url: Option<String>,
    /// Name of the variable holding the URL, read when the action runs.
    pub url_env: Option<String>,
    /// Headers in declaration order (values interpolated).
    pub headers: Vec<(String, String)>,
    /// Mustache body; `None` = the standard JSON payload.
    pub body_template: Option<String>,
    /// Name of the variable holding the HMAC-SHA256 secret of the original
    /// `X-Fraiseql-Signature` header.
    pub secret_env: Option<String>,
    /// Name of the variable holding the Standard Webhooks signing secret(s): `whsec_…`
    /// (base64), several separated by spaces while one is being rotated.
    pub signing_secret_env: Option<String>,
    /// `format`: the spec's JSON body (default) or a CloudEvents 1.0 structured event.
    pub format: WebhookFormat,
    /// `source` of the CloudEvents (default: `[observers.cloudevents] source`, else derived
    /// from the database).
    pub source: Option<String>,
    /// default 10 000
    pub timeout_ms: u64,
}

/// Whether an observer sees the changes of one key in commit order (`ordering`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Changes of one key, one at a time, in commit order; different keys in parallel.
    #[default]
    PerKey,
    /// Any order, all in parallel.
    None,
}

/// The body a webhook sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    /// `{"event","table","timestamp","data":{"new","old"},"id"}`, or the `body_template`.
    #[default]
    Json,
    /// A CloudEvents 1.0 event in structured mode (`application/cloudevents+json`).
    CloudEvents,
}

/// `type = "slack"`. Exactly one of `webhook_url` / `webhook_url_env` is set.
#[derive(Clone, PartialEq, Eq)]
pub struct SlackConfig {
    /// Literal incoming-webhook URL.
    pub webhook_url: Option<String>,
    /// Name of the variable holding it.
    pub webhook_url_env: Option<String>,
    /// `#channel` or `@user`
    pub channel: Option<String>,
    /// Message text with `{field}` substitution.
    pub message: String,
}

/// `type = "email"`. Exactly one of `smtp_host` / `smtp_host_env` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailConfig {
    /// Sender
    pub from: String,
    /// Recipients (at least one)
    pub to: Vec<String>,
    /// Subject with `{field}` substitution
    pub subject: String,
    /// Body with `{field}` substitution
    pub body_template: String,
    /// SMTP host
    pub smtp_host: Option<String>,
    /// Name of the variable holding the SMTP host
    pub smtp_host_env: Option<String>,
    /// default 587
    pub smtp_port: u16,
    /// Name of the variable holding the SMTP user
    pub smtp_user_env: Option<String>,
    /// Name of the variable holding the SMTP password
    pub smtp_password_env: Option<String>,
    /// default required
    pub tls: EmailTls,
}

/// SMTP TLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EmailTls {
    /// TLS required (default)
    #[default]
    Required,
    /// STARTTLS when offered
    Opportunistic,
    /// Plain text
    None,
}

impl EmailTls {
    /// `"required" | "opportunistic" | "none"`
    pub fn as_str(self) -> &'static str {
        match self {
            EmailTls::Required => "required",
            EmailTls::Opportunistic => "opportunistic",
            EmailTls::None => "none",
        }
    }
}

impl ObserversConfig {
    /// Defaults, with the given backend.
    pub fn default_with_backend(backend: Backend) -> Self {
        Self {
            enabled: true,
            backend,
            redis_url: None,
            max_dlq_size: None,
            run_bridge: false,
            http_port: 8080,
            http_host: "127.0.0.1".to_string(),
            auto_install: true,
            max_concurrency: 256,
            ordering: Ordering::PerKey,
            shutdown_timeout_secs: 30,
            blocked_after_secs: 60,
            admin_token_env: None,
            queue_capacity: 10_000,
            notify_channel: DEFAULT_NOTIFY_CHANNEL.to_string(),
            nats: NatsConfig::default(),
            bridge: BridgeConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            handlers: Vec::new(),
            cloudevents_source: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Default for ObserversConfig {
    fn default() -> Self {
        Self::default_with_backend(Backend::Postgres)
    }
}

impl Config {
    /// Defaults only (in-memory use, tests). No validation: `Backend::Nats` here has no URL.
    pub fn default_with_backend(backend: Backend) -> Config {
        Config {
            database: DatabaseConfig::default(),
            observers: ObserversConfig::default_with_backend(backend),
        }
    }

    /// Builds the configuration from file texts. `main` is `fraiseql.toml`, `runtime` is
    /// `fraiseql-observer.toml`, each as `(label used in messages, text)`; either may be absent.
    /// `env` reads environment variables (`${VAR}`, `FRAISEQL_NATS_*`, `DATABASE_URL`).
    pub fn from_sources(
        main: Option<(&str, &str)>,
        runtime: Option<(&str, &str)>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        load::from_sources(main, runtime, env)
    }

    /// [`ConfigFacts`] of the file texts, whatever else is wrong in them.
    pub fn facts(
        main: Option<(&str, &str)>,
        runtime: Option<(&str, &str)>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> ConfigFacts {
        load::facts(main, runtime, env)
    }

    /// Reads the files and builds the configuration with the process environment. A path that
    /// is given but cannot be read is an error naming it; pass `None` for an absent file.
    pub fn load(main: Option<&Path>, runtime: Option<&Path>) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut read = |path: Option<&Path>| -> Option<(String, String)> {
            let path = path?;
            let label = path.display().to_string();
            match std::fs::read_to_string(path) {
                Ok(text) => Some((label, text)),
                Err(e) => {
                    errors.push(ConfigError::new(
                        label,
                        "",
                        None,
                        format!("cannot read configuration file: {e}"),
                    ));
                    None
                }
            }
        };
        let main_src = read(main);
        let runtime_src = read(runtime);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let env = |name: &str| std::env::var(name).ok();
        Config::from_sources(
            main_src.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
            runtime_src.as_ref().map(|(l, t)| (l.as_str(), t.as_str())),
            &env,
        )
    }
}

fn finish<T>(value: Option<T>, errors: Vec<ConfigError>) -> Result<T, ConfigErrors> {
    match value {
        Some(v) if errors.is_empty() => Ok(v),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Parses one handler (same keys as a `[[observers.handlers]]` table). Errors name `origin`
/// as their file and keys relative to the handler (`retry.max_attempts`); `origin` is also
/// the handler's [`HandlerConfig::origin`].
pub fn parse_handler(
    value: &toml::Value,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HandlerConfig, ConfigErrors> {
    read_handler(&node::Node::from_value(value), origin, env, false)
}

/// An observer declared in a host language (`@fraiseql.subscription`, `fraiseql.observer`)
/// as the values it was given, read with the same keys and checks as a
/// `[[observers.handlers]]` table. `own_action`: it has a function of its own to run, so it
/// needs no `actions`.
pub fn parse_declared_handler(
    value: &serde_json::Value,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
    own_action: bool,
) -> Result<HandlerConfig, ConfigErrors> {
    read_handler(&node::Node::from_json(value), origin, env, own_action)
}

fn read_handler(
    node: &node::Node,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
    own_action: bool,
) -> Result<HandlerConfig, ConfigErrors> {
    let mut ctx = reader::Ctx::new(origin, env);
    let h = handler::handler(&mut ctx, node, "", Some(origin), own_action);
    finish(h, ctx.finish())
}

/// Parses one action table (`{ type = "webhook", ... }`).
pub fn parse_action(
    value: &toml::Value,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ActionConfig, ConfigErrors> {
    let node = node::Node::from_value(value);
    let mut ctx = reader::Ctx::new(origin, env);
    let a = handler::action(&mut ctx, &node, "");
    finish(a, ctx.finish())
}

/// Parses a retry table. Strings are not interpolated from the environment here (a `${VAR}`
/// without default is reported as unset).
pub fn parse_retry(value: &toml::Value, origin: &str) -> Result<RetryConfig, ConfigErrors> {
    let node = node::Node::from_value(value);
    let no_env = |_: &str| None;
    let mut ctx = reader::Ctx::new(origin, &no_env);
    let r = handler::retry(&mut ctx, &node, "");
    finish(r, ctx.finish())
}

/// Parses a checkpoint: a table `{ strategy = "...", idempotency_table = "..." }` or the
/// strategy name as a string.
pub fn parse_checkpoint(
    value: &toml::Value,
    origin: &str,
) -> Result<CheckpointConfig, ConfigErrors> {
    let node = node::Node::from_value(value);
    let no_env = |_: &str| None;
    let mut ctx = reader::Ctx::new(origin, &no_env);
    let c = handler::checkpoint(&mut ctx, &node, "");
    finish(c, ctx.finish())
}

/// Checks a SQL identifier for direct use in SQL text: `[A-Za-z_][A-Za-z0-9_]*`, at most 63
/// characters, optionally qualified as `schema.table`. The error explains what is wrong.
pub fn validate_sql_identifier(name: &str) -> Result<(), String> {
    const RULE: &str = "expected a SQL identifier: letters, digits and _, not starting with a \
                        digit, at most 63 characters, optionally qualified as schema.table";
    let shown = node::quote_short(name);
    if name.is_empty() {
        return Err(format!("{RULE}, found an empty string"));
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(format!("{RULE}, found {shown} (more than one '.')"));
    }
    for part in parts {
        if part.is_empty() {
            return Err(format!("{RULE}, found {shown} (empty name around '.')"));
        }
        if let Some(bad) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
        {
            return Err(format!("{RULE}, found {shown} ({bad:?} is not allowed)"));
        }
        if part.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("{RULE}, found {shown} (starts with a digit)"));
        }
        if part.len() > 63 {
            return Err(format!("{RULE}, found {shown} ({} characters)", part.len()));
        }
    }
    Ok(())
}

pub(crate) use crate::redact::redact_url;

struct Redacted<'a>(Option<&'a str>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(u) => f.debug_tuple("Some").field(&redact_url(u)).finish(),
            None => f.write_str("None"),
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &Redacted(self.url.as_deref()))
            .finish()
    }
}

impl fmt::Debug for ObserversConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObserversConfig")
            .field("enabled", &self.enabled)
            .field("backend", &self.backend)
            .field("redis_url", &Redacted(self.redis_url.as_deref()))
            .field("max_dlq_size", &self.max_dlq_size)
            .field("run_bridge", &self.run_bridge)
            .field("http_port", &self.http_port)
            .field("auto_install", &self.auto_install)
            .field("max_concurrency", &self.max_concurrency)
            .field("queue_capacity", &self.queue_capacity)
            .field("notify_channel", &self.notify_channel)
            .field("nats", &self.nats)
            .field("bridge", &self.bridge)
            .field("redis", &self.redis)
            .field("handlers", &self.handlers)
            .finish()
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &Redacted(self.url.as_deref()))
            .field("subject_prefix", &self.subject_prefix)
            .field("consumer_name", &self.consumer_name)
            .field("stream_name", &self.stream_name)
            .field("credentials_file", &self.credentials_file)
            .field("nkey_file", &self.nkey_file)
            .field("partitions", &self.partitions)
            .field("jetstream", &self.jetstream)
            .finish()
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, _)| (k.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("WebhookConfig")
            .field("url", &Redacted(self.url.as_deref()))
            .field("url_env", &self.url_env)
            .field("headers", &headers)
            .field("body_template", &self.body_template)
            .field("secret_env", &self.secret_env)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackConfig")
            .field("webhook_url", &Redacted(self.webhook_url.as_deref()))
            .field("webhook_url_env", &self.webhook_url_env)
            .field("channel", &self.channel)
            .field("message", &self.message)
            .finish()
    }
}
