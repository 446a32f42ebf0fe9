//! Delivery strategies per observer and the idempotency store behind `EffectivelyOnce`.
//!
//! The key `(listener_id, event_key)` is recorded *before* the action runs, so a duplicate
//! delivery of the same change — on any instance sharing the store — skips the action.

mod memory;
mod postgres;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

pub use memory::MemoryIdempotencyStore;
pub use postgres::{PgIdempotencyStore, PgIdempotencyStores};

use crate::config::CheckpointConfig;
use crate::error::Result;

/// The default idempotency table when `EffectivelyOnce` names none.
pub const DEFAULT_IDEMPOTENCY_TABLE: &str = "fraiseql_observer_idempotency";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CheckpointStrategy {
    /// Fast, no deduplication: an event may be processed more than once after a crash.
    #[default]
    AtLeastOnce,
    /// Deduplication through an idempotency table keyed by (listener id, event id).
    EffectivelyOnce { idempotency_table: String },
}

impl From<&CheckpointConfig> for CheckpointStrategy {
    fn from(c: &CheckpointConfig) -> Self {
        match c {
            CheckpointConfig::AtLeastOnce => CheckpointStrategy::AtLeastOnce,
            CheckpointConfig::EffectivelyOnce { idempotency_table } => {
                CheckpointStrategy::EffectivelyOnce {
                    idempotency_table: idempotency_table.clone(),
                }
            }
        }
    }
}

/// Identity and delivery strategy of one listener (one observer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Stable across restarts and instances: the observer's name.
    pub listener_id: String,
    pub checkpoint: CheckpointStrategy,
}

impl ListenerConfig {
    pub fn new(listener_id: impl Into<String>, checkpoint: CheckpointStrategy) -> Self {
        ListenerConfig {
            listener_id: listener_id.into(),
            checkpoint,
        }
    }
}

/// Where idempotency keys live. One store serves one idempotency table.
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// True if this event has already been processed by this listener.
    async fn is_duplicate(&self, listener_id: &str, key: &str) -> Result<bool>;
    /// Records the key; returns `true` if it was new, `false` if it was already there
    /// (the caller must then skip the action). Atomic: of two concurrent callers, one wins.
    async fn record_idempotency_key(&self, listener_id: &str, key: &str) -> Result<bool>;
    /// Forgets a key so that a deliberate re-run (a DLQ retry) is not skipped.
    async fn forget(&self, listener_id: &str, key: &str) -> Result<()>;
    /// [`Self::record_idempotency_key`] for one claim that may be tried more than once:
    /// `stamp` is the same on every try of the claim and differs between claims. True if the
    /// key is new, or was recorded by an earlier try of this claim whose answer was lost
    /// (the connection broke after the commit): that claim is ours and its event must run.
    async fn claim(&self, listener_id: &str, key: &str, stamp: ClaimStamp) -> Result<bool> {
        let _ = stamp;
        self.record_idempotency_key(listener_id, key).await
    }
}

/// Tells the tries of one claim from other claims: microseconds since the Unix epoch, with
/// a random part below the millisecond so that two claims of one key at the same moment
/// differ. Stored as the key's `processed_at`, which only pruning reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimStamp(pub i64);

impl ClaimStamp {
    pub fn new() -> Self {
        use rand::Rng;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let millis = now.as_millis() as i64;
        Self(millis * 1000 + rand::rng().random_range(0..1000))
    }
}

impl Default for ClaimStamp {
    fn default() -> Self {
        Self::new()
    }
}

/// Returns true if this event has already been processed (spec: `is_duplicate(pool, listener_id, key)`).
pub async fn is_duplicate(
    store: &(impl IdempotencyStore + ?Sized),
    listener_id: &str,
    key: &str,
) -> Result<bool> {
    store.is_duplicate(listener_id, key).await
}

/// Marks the event as processed; call before dispatching the action
/// (spec: `record_idempotency_key(pool, listener_id, key)`).
pub async fn record_idempotency_key(
    store: &(impl IdempotencyStore + ?Sized),
    listener_id: &str,
    key: &str,
) -> Result<bool> {
    store.record_idempotency_key(listener_id, key).await
}

/// Resolves the idempotency store that serves one idempotency table.
pub trait IdempotencyStores: Send + Sync {
    fn store_for(&self, table: &str) -> Arc<dyn IdempotencyStore>;
}

/// One in-memory store per table, shared by the observers naming the same table.
#[derive(Default)]
pub struct MemoryIdempotencyStores {
    stores: std::sync::Mutex<HashMap<String, Arc<MemoryIdempotencyStore>>>,
}

impl IdempotencyStores for MemoryIdempotencyStores {
    fn store_for(&self, table: &str) -> Arc<dyn IdempotencyStore> {
        let mut stores = self.stores.lock().expect("stores lock");
        stores.entry(table.to_owned()).or_default().clone()
    }
}
