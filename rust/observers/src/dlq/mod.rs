//! The dead-letter queue: events whose action exhausted its retries, kept for inspection
//! and retry. Bounded by `max_dlq_size`: when full, the *newest* entry is dropped so the
//! oldest stay available (spec), and `fraiseql_observer_dlq_overflow_total` counts the drop.

mod memory;
mod postgres;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use memory::MemoryDlq;
pub use postgres::PgDeadLetterQueue;

use crate::error::Result;
use crate::event::Event;

/// One failed (observer, action) pair for one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    /// Assigned by the queue on push.
    pub id: u64,
    pub event: Event,
    pub observer: String,
    /// Index of the action within the observer, so a retry re-runs only that action.
    pub action_index: usize,
    /// Action kind and safe description, e.g. `webhook`, `python:charge_customer`.
    pub action: String,
    /// The last error (for a Python handler: the traceback text).
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: String,
    pub last_failed_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored(u64),
    /// The queue was at `max_dlq_size`; the entry was dropped.
    Overflow,
}

#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    async fn push(&self, entry: DlqEntry) -> Result<PushOutcome>;
    /// Oldest first.
    async fn list(&self, limit: usize) -> Result<Vec<DlqEntry>>;
    async fn get(&self, id: u64) -> Result<Option<DlqEntry>>;
    async fn remove(&self, id: u64) -> Result<bool>;
    /// Removes every entry; returns how many there were.
    async fn purge(&self) -> Result<usize>;
    async fn len(&self) -> Result<usize>;
    async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
}
