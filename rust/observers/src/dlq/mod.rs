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

/// What put an entry in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlqOrigin {
    /// An observer's action that used up its attempts (or could not run).
    #[default]
    Observer,
    /// A change the bridge or the Redis forwarder could not publish.
    Forwarder,
    /// Input a source could not decode: nothing to re-run.
    Undecodable,
}

impl DlqOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            DlqOrigin::Observer => "observer",
            DlqOrigin::Forwarder => "forwarder",
            DlqOrigin::Undecodable => "undecodable",
        }
    }

    pub fn parse(s: &str) -> Option<DlqOrigin> {
        match s {
            "observer" => Some(DlqOrigin::Observer),
            "forwarder" => Some(DlqOrigin::Forwarder),
            "undecodable" => Some(DlqOrigin::Undecodable),
            _ => None,
        }
    }
}

/// One failed (observer, action) pair for one event, or one undecodable input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DlqEntry {
    /// Assigned by the queue on push.
    pub id: u64,
    /// What put it here; `observer` names the observer, the forwarder's observer
    /// (`pg_to_nats:Order:insert`) or the source (`nats:fraiseql_events`).
    #[serde(default)]
    pub origin: DlqOrigin,
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
    /// Undecodable input's bytes as they arrived (any bytes: a NUL, invalid UTF-8). Shown as
    /// `{"encoding": "utf-8", "text": …}` or, when not UTF-8 text, `{"encoding": "base64",
    /// "data": …}`.
    #[serde(default, with = "raw_bytes")]
    pub raw: Option<Vec<u8>>,
}

impl DlqEntry {
    /// Whether `lowercase` (already lowercased) is in its observer, action, error, event id
    /// or event as JSON: what [`DeadLetterQueue::search`] looks at.
    pub fn contains(&self, lowercase: &str) -> bool {
        if lowercase.is_empty() {
            return true;
        }
        let has = |s: &str| s.to_lowercase().contains(lowercase);
        has(&self.observer)
            || has(&self.action)
            || has(&self.error)
            || has(&self.event.id)
            || serde_json::to_string(&self.event).is_ok_and(|json| has(&json))
    }
}

/// `raw` as text where it is text, base64 where it is not.
mod raw_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "encoding")]
    enum Shown {
        #[serde(rename = "utf-8")]
        Text { text: String },
        #[serde(rename = "base64")]
        Base64 { data: String },
    }

    pub fn serialize<S: Serializer>(raw: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let shown = raw.as_ref().map(|bytes| match std::str::from_utf8(bytes) {
            Ok(text) if !text.contains('\0') => Shown::Text {
                text: text.to_owned(),
            },
            _ => Shown::Base64 {
                data: base64::engine::general_purpose::STANDARD.encode(bytes),
            },
        });
        shown.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let shown = Option::<Shown>::deserialize(d)?;
        shown
            .map(|s| match s {
                Shown::Text { text } => Ok(text.into_bytes()),
                Shown::Base64 { data } => base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(serde::de::Error::custom),
            })
            .transpose()
    }
}

/// What a failed retry changes in its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryFailure {
    pub error: String,
    /// The entry's attempts in all, this retry's included.
    pub attempts: u32,
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
    /// Newest first, at most `limit`: the entries whose observer, action, error, event id or
    /// event (as JSON) contain `text`, ignoring case; every entry when `text` is empty.
    async fn search(&self, text: &str, limit: usize) -> Result<Vec<DlqEntry>>;
    async fn get(&self, id: u64) -> Result<Option<DlqEntry>>;
    /// A retry of entry `id` failed again: keeps the entry (and its id) with the new error,
    /// attempts and `last_failed_at`. False when it is not there any more (purged meanwhile).
    async fn record_failure(&self, id: u64, failure: &RetryFailure) -> Result<bool>;
    async fn remove(&self, id: u64) -> Result<bool>;
    /// Removes the entries with these ids; returns how many there were.
    async fn remove_many(&self, ids: &[u64]) -> Result<usize> {
        let mut removed = 0;
        for &id in ids {
            removed += usize::from(self.remove(id).await?);
        }
        Ok(removed)
    }
    /// Removes every entry; returns how many there were.
    async fn purge(&self) -> Result<usize>;
    async fn len(&self) -> Result<usize>;
    async fn is_empty(&self) -> Result<bool> {
        Ok(self.len().await? == 0)
    }
}
