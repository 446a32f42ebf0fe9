//! Transports feed events to the engine. Each source — `memory` (the in-process queue used for
//! tests and embedding), `postgres` (the trigger-written change log), `logical` (PostgreSQL's
//! WAL through a replication slot), `nats`, `redis` — implements [`delivery::Source`] and is
//! driven by the one loop, [`delivery::run`]: bounded concurrency, acknowledgement only after
//! the engine finished or dead-lettered, the same handling of bad input everywhere.

pub mod codec;
pub mod delivery;
pub mod ledger;
pub mod logical;
pub mod memory;
pub mod nats;
pub mod partitions;
pub mod postgres;
pub mod redis;

use async_trait::async_trait;

use crate::error::Result;
use crate::event::Event;

/// Makes `ring` the process's rustls provider. Clients that build their TLS settings from the
/// process default (async-nats, redis) need one, and with more than one provider compiled in
/// (the replication client brings aws-lc-rs) rustls will not pick one by itself.
pub(crate) fn use_ring_for_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A transport the change log can be forwarded to.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Action kind for metrics and the DLQ, e.g. `nats_publish`.
    fn kind(&self) -> &'static str;
    /// Safe description (no credentials).
    fn describe(&self) -> String;
    /// One attempt: returns once the transport confirmed the write. Retries are the
    /// caller's (the forwarder's engine).
    async fn publish(&self, event: &Event) -> Result<()>;

    /// Publishes a whole batch with many publishes in flight, one attempt each, and returns
    /// the indices (ascending) of the events that were not confirmed: the forwarder runs those
    /// through its engine for their remaining attempts. `None` (the default): this transport
    /// does not publish batches, and every event goes through the engine.
    async fn publish_batch(&self, _events: &[&Event]) -> Option<Vec<usize>> {
        None
    }
}
