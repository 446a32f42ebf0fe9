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

/// The members of a body that an event is made of, each as sent (checked by [`decode_body`]).
/// Read straight from the bytes: the others (`subject`, anything unknown) are skipped without
/// being built, and no map of the whole body is made. Of a repeated member the last counts,
/// as when the body was read into a map.
#[derive(Default)]
struct Envelope {
    event: Option<Value>,
    entity: Option<Value>,
    id: Option<Value>,
    timestamp: Option<Value>,
    table: Option<Value>,
    data: Option<Value>,
    old: Option<Value>,
    backfill: Option<Value>,
    traceparent: Option<Value>,
}

/// A member's name, read without allocating.
#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Member {
    Event,
    Entity,
    Id,
    Timestamp,
    Table,
    Data,
    Old,
    Backfill,
    Traceparent,
    #[serde(other)]
    Other,
}

impl<'de> serde::Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = Envelope;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut members: A,
            ) -> std::result::Result<Envelope, A::Error> {
                let mut e = Envelope::default();
                while let Some(member) = members.next_key::<Member>()? {
                    let slot = match member {
                        Member::Event => &mut e.event,
                        Member::Entity => &mut e.entity,
                        Member::Id => &mut e.id,
                        Member::Timestamp => &mut e.timestamp,
                        Member::Table => &mut e.table,
                        Member::Data => &mut e.data,
                        Member::Old => &mut e.old,
                        Member::Backfill => &mut e.backfill,
                        Member::Traceparent => &mut e.traceparent,
                        Member::Other => {
                            members.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(members.next_value()?);
                }
                Ok(e)
            }
        }
        d.deserialize_any(Object)
    }
}

/// Rebuilds the event from a message body. `fallback_id` (the `Nats-Msg-Id` header, else the
/// stream sequence) is used when the body has no `"id"`.
pub fn decode_body(payload: &[u8], fallback_id: Option<String>) -> Result<Event, String> {
    let body: Envelope = serde_json::from_slice(payload).map_err(|e| {
        // Only the envelope's own check fails as data: valid JSON that is not an object.
        if e.classify() == serde_json::error::Category::Data {
            "the body is not a JSON object".to_string()
        } else {
            format!("invalid JSON: {e}")
        }
    })?;
    let str_field = |k: &str, v: Option<Value>| -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("field \"{k}\" must be a string")),
        }
    };
    let kind: EventKind = str_field("event", body.event)?
        .ok_or("missing field \"event\"")?
        .parse()?;
    let entity = str_field("entity", body.entity)?
        .filter(|s| !s.is_empty())
        .ok_or("missing field \"entity\"")?;
    let id = match str_field("id", body.id)? {
        Some(id) if !id.is_empty() => id,
        _ => fallback_id.ok_or("missing field \"id\" and no Nats-Msg-Id header")?,
    };
    let timestamp = match str_field("timestamp", body.timestamp)? {
        Some(t) => t,
        None => crate::event::now_rfc3339(),
    };
    let table = match str_field("table", body.table)? {
        Some(t) if !t.is_empty() => t,
        _ => default_table(&entity),
    };
    let data = body.data.filter(|d| !d.is_null());
    let old = body.old.filter(|d| !d.is_null());
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
        match body.backfill {
            None | Some(Value::Null) => None,
            Some(b) => Some(serde_json::from_value(b).map_err(|e| {
                format!("field \"backfill\" must be {{\"id\", \"observers\"}}: {e}")
            })?),
        };
    // A trace context that is not a string is dropped, not an error: the change goes on.
    let traceparent = match body.traceparent {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_read_by_name_whatever_their_order_or_escapes() {
        let body = br#"{"subject":"x.y.z","extra":{"deep":[1,2,{"a":null}]},"data":{"id":"o1"},
            "\u0069d":"evt-1","entity":"Order","event":"INSERT","table":"tb_order"}"#;
        let event = decode_body(body, None).unwrap();
        assert_eq!(event.id, "evt-1");
        assert_eq!(event.entity, "Order");
        assert_eq!(event.table, "tb_order");
        assert_eq!(event.new, Some(serde_json::json!({"id": "o1"})));
    }

    #[test]
    fn the_last_of_a_repeated_member_counts() {
        let body = br#"{"event":"DELETE","entity":"Order","event":"INSERT","data":{"id":1}}"#;
        assert_eq!(
            decode_body(body, Some("m".into())).unwrap().event,
            EventKind::Insert
        );
    }

    #[test]
    fn what_is_not_an_object_or_not_json_says_so() {
        for body in [&b"[1, 2]"[..], b"5", b"\"text\"", b"null"] {
            assert_eq!(
                decode_body(body, Some("m".into())).unwrap_err(),
                "the body is not a JSON object"
            );
        }
        for body in [&b"{"[..], b"{\"event\":}", b"", b"{\"a\":1} x"] {
            let err = decode_body(body, Some("m".into())).unwrap_err();
            assert!(err.starts_with("invalid JSON: "), "{err}");
        }
        let err = decode_body(br#"{"event":5,"entity":"O","data":{}}"#, None).unwrap_err();
        assert_eq!(err, "field \"event\" must be a string");
    }
}
