//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): each takes the raw bytes or
//! text a parser or decoder reads from outside and returns what it makes of them, or the
//! reason it refused them. Built only with the `fuzzing` feature; not a stable API.
//!
//! The public parsers ([`crate::Condition::compile`], [`crate::Config::from_sources`],
//! [`crate::transport::codec::decode_body`]) are called by the targets directly. This module
//! reaches the crate-private ones:
//!
//! | entry point | reaches |
//! |---|---|
//! | [`render_template`] | `action::template::Template` (compile, render), as webhook, Slack and email use it |
//! | [`decode_nats_message`] | `transport::codec::decode_body` with the id fallback of `transport::nats` |
//! | [`decode_redis_entry`] | `transport::redis::decode_entry` on an entry built from the bytes |
//! | [`decode_changelog_row`] | the column checks of `transport::postgres::decode_event` |
//! | [`decode_wal`] | `transport::logical::decode::Decoder` (pgoutput, backfill and trace messages) |
//! | [`wal_value_to_json`] | `transport::logical::value::to_json` (pgoutput text values) |
//!
//! The input formats are described on each function; the seeds in `fuzz/corpus/` follow them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::action::template::{Escape, Syntax, Template};
use crate::event::{Event, EventKind};
use crate::schema::EntityDef;
use crate::transport::delivery::Payload;
use crate::transport::logical::decode::{Decoder, Tables, Target};

/// Which built-in action a template belongs to: each has its syntax and escaping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    /// A webhook `body_template`: `{{field}}`, JSON-escaped when the template is JSON.
    WebhookBody,
    /// A Slack `message`: `{field}`, Slack-escaped.
    SlackMessage,
    /// An email `subject` or `body_template`: `{field}`, as is.
    Email,
}

/// Compiles `text` as a template of `kind` (checked against `entity` when given, as at
/// startup) and renders it for `event`. Returns the text and the first placeholder that had
/// no value, or the compile error.
pub fn render_template(
    kind: TemplateKind,
    text: &str,
    entity: Option<&EntityDef>,
    event: &Event,
) -> Result<(String, Option<String>), String> {
    let (syntax, escape) = match kind {
        TemplateKind::WebhookBody => (Syntax::Mustache, Escape::json_if_json_template(text)),
        TemplateKind::SlackMessage => (Syntax::Braces, Escape::Slack),
        TemplateKind::Email => (Syntax::Braces, Escape::None),
    };
    let template = Template::compile(text, syntax, escape, entity)?;
    let mut missing = None;
    let rendered = template.render(event, &mut missing);
    Ok((rendered, missing))
}

/// A JetStream message as the NATS consumer decodes it: `msg_id` is the `Nats-Msg-Id`
/// header; without one (or empty) the consumer falls back to `stream:sequence`.
pub fn decode_nats_message(msg_id: Option<&str>, payload: &[u8]) -> Result<Event, String> {
    let fallback = match msg_id.filter(|v| !v.is_empty()) {
        Some(v) => v.to_owned(),
        None => "fraiseql_events:1".to_owned(),
    };
    crate::transport::codec::decode_body(payload, Some(fallback))
}

/// A Redis stream entry, decoded as the consumer group does. Input: the entry id on the first
/// line (`0-1` if empty), then one field per line, `name<TAB>value`. The name's first
/// character picks the RESP type of the value: `#` an integer (unparsable: 0), `+` a simple
/// string, `!` nil, `*` an array of bulk strings split on `,`, `%` a double, anything else
/// (kept in the name) a bulk string, the usual case. The value's bytes need not be UTF-8.
pub fn decode_redis_entry(bytes: &[u8]) -> Result<Event, String> {
    use redis::Value as V;
    let mut lines = bytes.split(|b| *b == b'\n');
    let mut id = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    if id.is_empty() {
        // Redis gives every entry an id (`<ms>-<seq>`).
        id = "0-1".to_owned();
    }
    let mut map = HashMap::new();
    for line in lines {
        let (name, value) = match line.iter().position(|b| *b == b'\t') {
            Some(at) => (&line[..at], &line[at + 1..]),
            None => (line, &b""[..]),
        };
        let text = || String::from_utf8_lossy(value).into_owned();
        let (name, value) = match name.split_first() {
            Some((b'#', rest)) => (rest, V::Int(text().trim().parse().unwrap_or(0))),
            Some((b'+', rest)) => (rest, V::SimpleString(text())),
            Some((b'!', rest)) => (rest, V::Nil),
            Some((b'*', rest)) => (
                rest,
                V::Array(
                    value
                        .split(|b| *b == b',')
                        .map(|v| V::BulkString(v.to_vec()))
                        .collect(),
                ),
            ),
            Some((b'%', rest)) => (rest, V::Double(text().trim().parse().unwrap_or(0.0))),
            _ => (name, V::BulkString(value.to_vec())),
        };
        map.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    let entry = redis::streams::StreamId {
        id,
        map,
        milliseconds_elapsed_from_delivery: None,
        delivered_count: None,
    };
    crate::transport::redis::decode_entry(&entry)
}

/// A row of `fraiseql_change_log` as the PostgreSQL source reads it, given as a JSON object of
/// its columns: a key that is absent is SQL NULL, and a JSON `null` in `new`, `old` or
/// `backfill` is a `jsonb` null (not SQL NULL). Columns: `id` (bigint), `txid_text`, `entity`,
/// `event`, `table_name`, `committed_at`, `traceparent` (text), `new`, `old`, `backfill`
/// (jsonb). A column of the wrong type is an error, as a failed `try_get` is.
///
/// The checks are those of `transport::postgres::decode_event` and `row_cursor`, in their
/// order, calling the same functions (`EventKind::from_str`, `change_rows`, `Backfill`'s
/// `Deserialize`); only the reading of each column from a `PgRow` is replaced by the lookup
/// in the object (sqlx decodes those bytes, and the server writes them).
pub fn decode_changelog_row(bytes: &[u8]) -> Result<Event, String> {
    let columns: Map<String, Value> = match serde_json::from_slice(bytes) {
        Ok(Value::Object(columns)) => columns,
        Ok(_) => return Err("a row is a JSON object of columns".into()),
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let text = |name: &str| -> Result<Option<String>, String> {
        match columns.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("column {name}: mismatched type {other}")),
        }
    };
    let required = |name: &str| -> Result<String, String> {
        text(name)?.ok_or_else(|| format!("column {name} is NULL"))
    };
    let json = |name: &str| -> Option<Value> { columns.get(name).cloned() };
    // row_cursor: the batch's position, read before the event is decoded.
    let id = match columns.get("id") {
        Some(Value::Number(n)) => n.as_i64().ok_or("column id: not an i64")?,
        _ => return Err("column id: mismatched type or NULL".into()),
    };
    if let Some(txid) = text("txid_text")? {
        txid.parse::<u64>()
            .map_err(|e| format!("column txid_text: {e}"))?;
    }
    // decode_event
    let kind: EventKind = required("event")?.parse()?;
    let (new, old) = crate::transport::postgres::change_rows(kind, json("new"), json("old"))?;
    let backfill = json("backfill")
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("column backfill: {e}"))?;
    let traceparent = text("traceparent").ok().flatten();
    Ok(Event {
        id: id.to_string(),
        entity: required("entity")?,
        event: kind,
        table: required("table_name")?,
        timestamp: required("committed_at")?,
        new,
        old,
        backfill,
        traceparent,
    })
}

/// The relation every [`decode_wal`] run starts with: `public.tb_order` (relation id 7),
/// captured for two entities, with columns of the types whose text the decoder converts.
pub const WAL_RELATION_ID: u32 = 7;

/// `(name, type oid, part of the key)` of the columns of [`WAL_RELATION_ID`].
pub const WAL_COLUMNS: &[(&str, u32, bool)] = &[
    ("id", 25, true),
    ("total", 1700, false),
    ("paid", 16, false),
    ("qty", 23, false),
    ("data", 3802, false),
    ("tags", 1009, false),
    ("nums", 1022, false),
    ("at", 1184, false),
];

/// What one [`decode_wal`] run made: events and undecodable input.
#[derive(Debug)]
pub struct WalOutput {
    pub events: Vec<Event>,
    /// The reason of each message that could not be decoded.
    pub undecodable: Vec<String>,
}

/// A replication session as the logical source feeds its decoder. Input: a sequence of
/// frames `<tag: 1 byte><length: 2 bytes, big-endian><length bytes>` (a short last frame takes
/// what is left):
///
/// - `w`: a pgoutput message (the `XLogData` payload: `R`elation, `I`nsert, `U`pdate, `D`elete…);
/// - `b`: BEGIN, the data being the commit LSN and the commit time (2 × 8 bytes, big-endian,
///   missing bytes zero);
/// - `c`: COMMIT;
/// - `f`: a `fraiseql.backfill` logical message (its content);
/// - `t`: a `fraiseql.traceparent` logical message (its content);
/// - anything else: ignored.
///
/// The first byte of the input, before the frames, sets `skip_unchanged_updates` (bit 0).
/// The decoder starts with the relation [`WAL_RELATION_ID`] described and the tables
/// `public.tb_order` (entities `Order` and `OrderAudit`) and `public.tb_payment` captured.
pub fn decode_wal(input: &[u8]) -> WalOutput {
    let Some((&flags, mut rest)) = input.split_first() else {
        return WalOutput {
            events: Vec::new(),
            undecodable: Vec::new(),
        };
    };
    let target = |entity: &str, table: &str| Target {
        entity: entity.to_owned(),
        table: table.to_owned(),
    };
    let mut tables = Tables::new();
    tables.insert(
        ("public".into(), "tb_order".into()),
        vec![
            target("Order", "tb_order"),
            target("OrderAudit", "tb_order"),
        ],
    );
    tables.insert(
        ("public".into(), "tb_payment".into()),
        vec![target("Payment", "tb_payment")],
    );
    let mut decoder = Decoder::new(Arc::new(tables), flags & 1 == 1);
    let mut payloads = Vec::new();
    decoder.message(Bytes::from(wal_relation_message()), &mut payloads);
    while let Some((&tag, after)) = rest.split_first() {
        let len = match after {
            [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => 0,
        };
        let body = after.get(2..).unwrap_or_default();
        let (data, next) = body.split_at(len.min(body.len()));
        rest = next;
        match tag {
            b'w' => decoder.message(Bytes::copy_from_slice(data), &mut payloads),
            b'b' => {
                let word = |i: usize| {
                    let mut b = [0u8; 8];
                    for (j, slot) in b.iter_mut().enumerate() {
                        *slot = data.get(i * 8 + j).copied().unwrap_or(0);
                    }
                    b
                };
                decoder.begin(u64::from_be_bytes(word(0)), i64::from_be_bytes(word(1)));
            }
            b'c' => decoder.commit(),
            b'f' => decoder.backfill(data, &mut payloads),
            b't' => decoder.traceparent(data),
            _ => {}
        }
    }
    let mut out = WalOutput {
        events: Vec::new(),
        undecodable: Vec::new(),
    };
    for payload in payloads {
        match payload {
            Payload::Event(e) => out.events.push(e),
            Payload::Undecodable(u) => out.undecodable.push(u.reason),
        }
    }
    out
}

/// The pgoutput `Relation` message describing [`WAL_RELATION_ID`] (protocol 1).
pub fn wal_relation_message() -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&WAL_RELATION_ID.to_be_bytes());
    m.extend_from_slice(b"public\0tb_order\0");
    m.push(b'f');
    m.extend_from_slice(&(WAL_COLUMNS.len() as i16).to_be_bytes());
    for (name, oid, key) in WAL_COLUMNS {
        m.push(u8::from(*key));
        m.extend_from_slice(name.as_bytes());
        m.push(0);
        m.extend_from_slice(&oid.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
    }
    m
}

/// One non-NULL column value of type `oid` as pgoutput sends it (text), as JSON.
pub fn wal_value_to_json(oid: u32, text: &str) -> Value {
    crate::transport::logical::value::to_json(oid, text)
}
