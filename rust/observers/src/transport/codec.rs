//! The wire format of a change on NATS and Redis, one codec for both: the spec's body
//! `{"event","entity","subject","timestamp","data"}` plus `"id"` (the stable event id),
//! `"old"` (the previous row for UPDATE/DELETE, else null), `"table"` and, for a backfilled
//! row, `"backfill": {"id", "observers"}`, and the subject
//! `{prefix}.{entity_lowercase}.{event_lowercase}`.

use serde_json::Value;

use crate::error::{Error, PublishErrorKind, Result};
use crate::event::{Backfill, Event, EventKind};
use crate::schema::default_table;

/// Header carrying the stable event id; JetStream deduplicates on it.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

fn subject_token(s: &str, what: &str) -> Result<String> {
    let t = s.to_lowercase();
    if t.is_empty()
        || t.chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace())
    {
        return Err(Error::publish(
            PublishErrorKind::Invalid,
            format!(
                "{what} {s:?} cannot be used in a NATS subject (no '.', '*', '>' or whitespace)"
            ),
        ));
    }
    Ok(t)
}

/// `{prefix}.{entity_lowercase}.{event_lowercase}`
pub fn subject_for(prefix: &str, event: &Event) -> Result<String> {
    Ok(format!(
        "{prefix}.{}.{}",
        subject_token(&event.entity, "entity")?,
        event.event.as_lower()
    ))
}

/// The body published for an event, borrowed from it: serialising it copies the row once,
/// straight into the payload (no intermediate `Value`).
#[derive(serde::Serialize)]
struct MessageBody<'a> {
    event: &'static str,
    entity: &'a str,
    subject: &'a str,
    timestamp: &'a str,
    data: Option<&'a Value>,
    id: &'a str,
    old: Option<&'a Value>,
    table: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    backfill: Option<&'a Backfill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
}

impl<'a> MessageBody<'a> {
    fn new(subject: &'a str, event: &'a Event) -> Self {
        MessageBody {
            event: event.event.as_str(),
            entity: &event.entity,
            subject,
            timestamp: &event.timestamp,
            data: event.row(),
            id: &event.id,
            old: event.old.as_ref(),
            table: &event.table,
            backfill: event.backfill.as_ref(),
            traceparent: crate::telemetry::outgoing(event),
        }
    }
}

/// The JSON body published for `event` on `subject`, as bytes.
pub fn encode_body(subject: &str, event: &Event) -> Result<Vec<u8>> {
    serde_json::to_vec(&MessageBody::new(subject, event)).map_err(|e| {
        Error::publish(
            PublishErrorKind::Invalid,
            format!("cannot encode event {}: {e}", event.id),
        )
    })
}

/// The JSON body published for `event` on `subject`.
pub fn message_body(subject: &str, event: &Event) -> Value {
    serde_json::to_value(MessageBody::new(subject, event)).unwrap_or(Value::Null)
}

/// Rebuilds the event from a message body. `fallback_id` (the `Nats-Msg-Id` header, else the
/// stream sequence) is used when the body has no `"id"`.
pub fn decode_body(payload: &[u8], fallback_id: Option<String>) -> Result<Event, String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut obj) = v else {
        return Err("the body is not a JSON object".into());
    };
    let str_field = |k: &str| -> Result<Option<&str>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("field \"{k}\" must be a string")),
        }
    };
    let kind: EventKind = str_field("event")?
        .ok_or("missing field \"event\"")?
        .parse()?;
    let entity = str_field("entity")?
        .filter(|s| !s.is_empty())
        .ok_or("missing field \"entity\"")?
        .to_string();
    let id = match str_field("id")? {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => fallback_id.ok_or("missing field \"id\" and no Nats-Msg-Id header")?,
    };
    let timestamp = match str_field("timestamp")? {
        Some(t) => t.to_string(),
        None => crate::event::now_rfc3339(),
    };
    let table = match str_field("table")? {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => default_table(&entity),
    };
    let data = obj.remove("data").filter(|d| !d.is_null());
    let old = obj.remove("old").filter(|d| !d.is_null());
    let (new, old) = match kind {
        EventKind::Insert => (data, None),
        EventKind::Update => (data, old),
        EventKind::Delete => (None, old.or(data)),
    };
    // An INSERT or UPDATE needs its new row, a DELETE its old one.
    let row = match kind {
        EventKind::Delete => &old,
        EventKind::Insert | EventKind::Update => &new,
    };
    if row.is_none() {
        return Err("missing field \"data\"".into());
    }
    let backfill =
        match obj.remove("backfill") {
            None | Some(Value::Null) => None,
            Some(b) => Some(serde_json::from_value(b).map_err(|e| {
                format!("field \"backfill\" must be {{\"id\", \"observers\"}}: {e}")
            })?),
        };
    // A trace context that is not a string is dropped, not an error: the change goes on.
    let traceparent = match obj.remove("traceparent") {
        Some(Value::String(tp)) => Some(tp),
        _ => None,
    };
    Ok(Event {
        id,
        entity,
        event: kind,
        table,
        timestamp,
        new,
        old,
        backfill,
        traceparent,
    })
}
