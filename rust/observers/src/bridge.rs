//! The PostgreSQL → NATS bridge (`run_bridge = true`): every change in the change log is
//! published to JetStream as `{prefix}.{entity}.{event}` with `Nats-Msg-Id` = event id.
//!
//! It is the PostgreSQL source under its own cursor (`[observers.bridge] transport_name`)
//! driving an engine whose only observers publish: one per captured (entity, event). So the
//! bridge inherits the source's guarantees — no change skipped, one active bridge among
//! instances (advisory lock), the cursor moved only after the batch is done — and "done"
//! here means confirmed by a PubAck. A publish that still fails after its retries is
//! dead-lettered, and retrying it republishes with the same id, which the stream's duplicate
//! window absorbs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::action::{Action, ActionError};
use crate::checkpoint::CheckpointStrategy;
use crate::config::{BackoffStrategy, Config};
use crate::engine::ObserverSpec;
use crate::event::{Event, EventKind};
use crate::retry::RetryPolicy;
use crate::schema::Schema;
use crate::transport::nats::NatsPublisher;
use crate::transport::postgres::PostgresOptions;

/// Publishes the event to JetStream and waits for its PubAck.
pub struct PublishAction {
    publisher: NatsPublisher,
}

#[async_trait]
impl Action for PublishAction {
    fn kind(&self) -> &'static str {
        "nats_publish"
    }

    fn describe(&self) -> String {
        "JetStream publish".to_owned()
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        self.publisher
            .publish(event)
            .await
            .map_err(|e| ActionError::retryable(e.to_string()))
    }
}

/// Publishes that keep failing are retried for a while (the publisher also retries each
/// attempt a few times) before the change is dead-lettered.
fn bridge_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        backoff: BackoffStrategy::Exponential,
        initial_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(30),
        jitter: true,
    }
}

/// One publishing observer per entity of `schema` and event kind.
pub fn bridge_observers(
    schema: &Schema,
    publisher: NatsPublisher,
    transport_name: &str,
) -> Vec<ObserverSpec> {
    let action: Arc<dyn Action> = Arc::new(PublishAction { publisher });
    let mut specs = Vec::new();
    for entity in schema.entities() {
        for kind in EventKind::ALL {
            specs.push(ObserverSpec {
                name: format!("{transport_name}:{}:{}", entity.name, kind.as_lower()),
                entity: entity.name.clone(),
                event: kind,
                condition: None,
                retry: bridge_retry(),
                checkpoint: CheckpointStrategy::AtLeastOnce,
                actions: vec![action.clone()],
            });
        }
    }
    specs
}

/// The source options of the bridge: its own cursor, channel, batch size and poll interval.
pub fn bridge_options(config: &Config) -> PostgresOptions {
    let bridge = &config.observers.bridge;
    PostgresOptions {
        listener_id: bridge.transport_name.clone(),
        notify_channel: bridge.notify_channel.clone(),
        batch_size: bridge.batch_size,
        poll_interval: Duration::from_secs(bridge.poll_interval_secs.max(1)),
        listen: true,
        max_concurrency: config.observers.max_concurrency,
    }
}
