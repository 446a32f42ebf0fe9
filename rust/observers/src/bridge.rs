//! Forwarding the PostgreSQL change log to a message transport: the PostgreSQL → NATS bridge
//! (`run_bridge = true`, `{prefix}.{entity}.{event}` with `Nats-Msg-Id` = event id) and the
//! PostgreSQL → Redis forwarder (`backend = "redis"` with a database: `XADD` to the stream
//! with the event id as a field).
//!
//! Both are the PostgreSQL source under its own cursor (a listener id of their own) driving
//! an engine whose only observers publish through a [`Publisher`]: one per captured (entity,
//! event). So forwarding inherits the source's guarantees — no change skipped, one active
//! forwarder among instances (advisory lock), the cursor moved only after the batch is done
//! — and "done" here means confirmed by the transport (a PubAck, an `XADD` reply). A change is
//! sent at most [`BRIDGE_ATTEMPTS`] times in all: a NATS batch is published pipelined (the
//! first attempt of each of its changes), and only what was not confirmed goes through the
//! engine for the remaining attempts. A change that still fails, or that can never be sent
//! (larger than the server's `max_payload`), is dead-lettered; retrying it publishes again with
//! the same event id, which NATS's duplicate window and EffectivelyOnce observers absorb.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::action::{Action, ActionError, FailureReason};
use crate::checkpoint::MemoryIdempotencyStores;
use crate::checkpoint::{CheckpointStrategy, ListenerConfig};
use crate::config::{Backend, Config};
use crate::dlq::DeadLetterQueue;
use crate::engine::{Engine, ObserverSpec};
use crate::error::{ConnectErrorKind, DeadLetterErrorKind, Error, PublishErrorKind, Result};
use crate::event::{Event, EventKind};
use crate::metrics::{Metrics, RedisMetrics};
use crate::order::OrderKeys;
use crate::retry::RetryPolicy;
use crate::schema::Schema;
use crate::transport::nats::{NatsMetrics, NatsPublisher};
use crate::transport::postgres::PostgresOptions;
use crate::transport::redis::RedisPublisher;
use crate::transport::Publisher;

/// Publishes the event and waits for the transport's confirmation.
pub struct PublishAction {
    publisher: Arc<dyn Publisher>,
}

#[async_trait]
impl Action for PublishAction {
    fn kind(&self) -> &'static str {
        self.publisher.kind()
    }

    fn describe(&self) -> String {
        self.publisher.describe()
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        self.publisher.publish(event).await.map_err(publish_failure)
    }
}

/// A failed publish as an action failure: a message that can never be sent (too large, not
/// encodable) goes to the dead-letter queue at once.
fn publish_failure(e: Error) -> ActionError {
    let message = e.to_string();
    match e {
        Error::Publish(p) => match p.kind() {
            PublishErrorKind::TooLarge | PublishErrorKind::Invalid => {
                ActionError::permanent(message).with_reason(FailureReason::InvalidMessage)
            }
            PublishErrorKind::TimedOut => {
                ActionError::retryable(message).with_reason(FailureReason::Timeout)
            }
            PublishErrorKind::Failed => {
                ActionError::retryable(message).with_reason(FailureReason::Connection)
            }
        },
        _ => ActionError::retryable(message),
    }
}

/// Sends of one change by a forwarder, in all (the pipelined batch publish counts as the
/// first).
pub const BRIDGE_ATTEMPTS: u32 = 8;

/// Publishes that keep failing are retried for about 35 s (0.5, 1, 2, 4, 8, 10, 10 s apart)
/// before the change is dead-lettered: long enough to ride through a JetStream cluster
/// electing a new stream leader after its leader died (4 to 9 s in nats-server, measured
/// dead-lettering every change written meanwhile with the 3 s this was before) or a server
/// restarting.
pub const BRIDGE_RETRY: RetryPolicy = RetryPolicy::exponential(
    BRIDGE_ATTEMPTS,
    Duration::from_millis(500),
    Duration::from_secs(10),
);

/// One publishing observer per entity of `schema` and event kind.
pub fn bridge_observers(
    schema: &Schema,
    publisher: Arc<dyn Publisher>,
    transport_name: &str,
) -> Vec<ObserverSpec> {
    let action: Arc<dyn Action> = Arc::new(PublishAction { publisher });
    let mut specs = Vec::new();
    for entity in schema.entities() {
        for kind in EventKind::ALL {
            let name = format!("{transport_name}:{}:{}", entity.name, kind.as_lower());
            let listener = ListenerConfig::new(name, CheckpointStrategy::AtLeastOnce);
            specs.push(
                ObserverSpec::new(listener, entity.name.clone(), kind)
                    .retry(BRIDGE_RETRY)
                    .action(action.clone()),
            );
        }
    }
    specs
}

/// The source options of a forwarder: its own cursor (`listener_id`), and the channel, batch
/// size and poll interval of `[observers.bridge]`.
pub fn bridge_options(config: &Config, listener_id: &str) -> PostgresOptions {
    let bridge = &config.observers.bridge;
    PostgresOptions {
        listener_id: listener_id.to_owned(),
        notify_channel: bridge.notify_channel.clone(),
        batch_size: bridge.batch_size,
        poll_interval: Duration::from_secs(bridge.poll_interval_secs.max(1)),
        listen: true,
        max_concurrency: config.observers.max_concurrency,
        retention: config.observers.postgres.retention,
        stall_after: Duration::from_secs(config.observers.postgres.stall_warning_secs.max(1)),
    }
}

/// The forwarder a config runs, by its listener id and target: the NATS bridge
/// (`run_bridge`, `[observers.bridge] transport_name`) or the Redis forwarder
/// (`backend = "redis"`, `[observers.redis] forwarder_name`).
fn configured_forwarder(config: &Config) -> Option<(&str, &'static str)> {
    let o = &config.observers;
    if o.run_bridge {
        return Some((&o.bridge.transport_name, "nats"));
    }
    if o.backend == Backend::Redis && config.database.url.is_some() {
        return Some((&o.redis.forwarder_name, "redis"));
    }
    None
}

/// `fraiseql dlq retry` for a change the bridge or the Redis forwarder could not publish (a
/// dead letter of origin `forwarder`): connects the config's publisher and publishes the
/// entry's event again (same id, so NATS's duplicate window and EffectivelyOnce consumers
/// absorb a publish that had in fact landed), with the forwarder's retries; the entry is
/// removed once confirmed. Ok(false) when it failed again. `order` is what keys the
/// observers' per-key order (the engine's [`Engine::order_keys`]): with `[observers.nats]
/// partitions` the change goes back to the partition of its key, where its siblings are.
pub async fn retry_forwarded(
    config: &Config,
    schema: &Schema,
    dlq: Arc<dyn DeadLetterQueue>,
    metrics: Arc<Metrics>,
    order: Arc<OrderKeys>,
    id: u64,
) -> Result<bool> {
    let Some((name, target)) = configured_forwarder(config) else {
        return Err(Error::dead_letter(
            DeadLetterErrorKind::ObserverGone,
            format!(
                "entry {id} is a change a forwarder could not publish, but this configuration \
                 runs none (run_bridge = true, or backend = \"redis\" with a database)"
            ),
        ));
    };
    let publisher: Arc<dyn Publisher> = if target == "nats" {
        Arc::new(
            NatsPublisher::connect(&config.observers.nats, NatsMetrics::new())
                .await?
                .for_config(config)
                .with_order_keys(order),
        )
    } else {
        let url = config.observers.redis_url.as_deref().ok_or_else(|| {
            Error::connect(
                ConnectErrorKind::InvalidSettings,
                "redis backend requires observers.redis_url to be set",
            )
        })?;
        let conn = crate::transport::redis::connect(url, Duration::from_secs(10)).await?;
        Arc::new(RedisPublisher::new(
            conn,
            &config.observers.redis,
            RedisMetrics::new(),
        ))
    };
    let specs = bridge_observers(schema, publisher, name);
    let engine = Engine::new(specs, dlq, &MemoryIdempotencyStores::default(), metrics)?;
    engine.forwarding().retry_dead_letter(id).await
}
