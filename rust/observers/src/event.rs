//! The change event that flows from a transport through the engine to actions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The database operation behind a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum EventKind {
    Insert,
    Update,
    Delete,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Insert, EventKind::Update, EventKind::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Insert => "INSERT",
            EventKind::Update => "UPDATE",
            EventKind::Delete => "DELETE",
        }
    }

    /// Lower-case form used in NATS subjects (`fraiseql.mutation.order.insert`).
    pub fn as_lower(self) -> &'static str {
        match self {
            EventKind::Insert => "insert",
            EventKind::Update => "update",
            EventKind::Delete => "delete",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Accepts `INSERT|UPDATE|DELETE` in any case and the subscription aliases
/// `create|update|delete`.
impl FromStr for EventKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "INSERT" | "CREATE" => Ok(EventKind::Insert),
            "UPDATE" => Ok(EventKind::Update),
            "DELETE" => Ok(EventKind::Delete),
            _ => Err(format!(
                "unknown event `{s}`: expected INSERT, UPDATE or DELETE (or create, update, delete)"
            )),
        }
    }
}

/// One row change. `new` is absent for DELETE, `old` is absent for INSERT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable event id: the deduplication key for EffectivelyOnce, `Nats-Msg-Id`, and
    /// `Idempotency-Key`. Stays the same across redeliveries of the same change.
    pub id: String,
    /// Entity type name as declared in the schema (`Order`).
    pub entity: String,
    pub event: EventKind,
    /// Table the change came from (`tb_order`).
    pub table: String,
    /// RFC 3339 UTC timestamp of the change.
    pub timestamp: String,
    pub new: Option<Value>,
    pub old: Option<Value>,
    /// Set on a row fed by `fraiseql backfill` rather than written by an application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<Backfill>,
    /// The W3C trace context the writing transaction attached to its changes, if any (a
    /// valid one: an invalid one is dropped where the change is read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// What marks a backfilled row: the backfill it belongs to, and the observers it is for
/// (empty: every observer of the entity's INSERTs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backfill {
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub observers: Vec<String>,
}

impl Event {
    /// Builds an event with a fresh time-ordered id and the current time.
    pub fn new(
        entity: impl Into<String>,
        event: EventKind,
        table: impl Into<String>,
        new: Option<Value>,
        old: Option<Value>,
    ) -> Self {
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            entity: entity.into(),
            event,
            table: table.into(),
            timestamp: now_rfc3339(),
            new,
            old,
            backfill: None,
            traceparent: None,
        }
    }

    /// The row that describes the entity: `new`, or `old` for a DELETE.
    pub fn row(&self) -> Option<&Value> {
        self.new.as_ref().or(self.old.as_ref())
    }

    /// The row's key as text: its `id` field (a string as it is, a number or boolean
    /// written out), if it has one.
    pub fn key(&self) -> Option<String> {
        match self.row()?.get("id")? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other @ (Value::Number(_) | Value::Bool(_)) => Some(other.to_string()),
            other => Some(other.to_string()),
        }
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Input a source could not decode. It is kept whole in the dead-letter queue.
#[derive(Debug, Clone)]
pub struct Undecodable {
    /// An id for the entry: the message id, the stream entry id, the change-log id.
    pub id: String,
    /// Where it was found and what could be read of it (subject, entry id, columns), as JSON.
    pub context: Value,
    /// The bytes as they arrived, when the input was a message.
    pub raw: Option<Vec<u8>>,
    /// Why it could not be decoded.
    pub reason: String,
}
