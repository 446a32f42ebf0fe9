//! Helpers shared by the fuzz targets.

#![allow(dead_code)]

use fraiseql_observers::Event;
use serde_json::Value;

/// Splits `data` at the first NUL byte: (before, after). Without one, `after` is empty.
pub fn split_nul(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[]),
    }
}

/// JSON equality, numbers compared as `f64` with a relative tolerance: serde_json's default
/// float parsing is not always correctly rounded, so text → value → text → value may move a
/// float by one unit in the last place.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y || (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs())
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| ka == kb && same_json(va, vb))
        }
        _ => a == b,
    }
}

fn same_row(a: &Option<Value>, b: &Option<Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same_json(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// An event published (`encode_body`) and read back (`decode_body`) is the event it was,
/// except a trace context that is not a valid one (not published) and an empty table (read
/// back as the default one).
pub fn assert_round_trip(event: &Event, back: &Event) {
    let traceparent = event
        .traceparent
        .clone()
        .filter(|tp| fraiseql_observers::telemetry::valid_traceparent(tp));
    assert_eq!(event.id, back.id, "id");
    assert_eq!(event.entity, back.entity, "entity");
    assert_eq!(event.event, back.event, "event");
    // An empty table is read as absent: the entity's default table.
    let table = match event.table.as_str() {
        "" => fraiseql_observers::schema::default_table(&event.entity),
        table => table.to_owned(),
    };
    assert_eq!(table, back.table, "table");
    assert_eq!(event.timestamp, back.timestamp, "timestamp");
    assert_eq!(event.backfill, back.backfill, "backfill");
    assert_eq!(traceparent, back.traceparent, "traceparent");
    assert!(
        same_row(&event.new, &back.new),
        "new: {:?} vs {:?}",
        event.new,
        back.new
    );
    assert!(
        same_row(&event.old, &back.old),
        "old: {:?} vs {:?}",
        event.old,
        back.old
    );
}

/// Publishes `event` with the codec NATS and Redis share and decodes it again.
pub fn round_trip(event: &Event) {
    use fraiseql_observers::transport::codec::{decode_body, encode_body, subject_for};
    let subject =
        subject_for("fraiseql.mutation", event).unwrap_or_else(|_| "fraiseql.mutation.x.y".into());
    let body = encode_body(&subject, event).expect("an event that was decoded encodes");
    let back = decode_body(&body, None).expect("an encoded event decodes");
    assert_round_trip(event, &back);
}
