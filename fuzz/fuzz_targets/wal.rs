//! Logical capture: pgoutput messages (relations, inserts, updates, deletes), backfill and
//! trace-context logical messages, BEGIN and COMMIT, as the replication reader feeds its
//! decoder; and the conversion of one text column value to JSON.
//!
//! Input: a first byte; if it is `V`, the rest is a column value: a type OID (4 bytes,
//! big-endian) and the text. Otherwise the whole input is a session (see
//! `fraiseql_observers::fuzzing::decode_wal`).
//!
//! Checked: nothing panics; every event has the rows its kind needs, as objects; every
//! message that could not be decoded says why.

#![no_main]

use fraiseql_observers::fuzzing::{decode_wal, wal_value_to_json};
use fraiseql_observers::EventKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let [b'V', a, b, c, d, text @ ..] = data {
        if let Ok(text) = std::str::from_utf8(text) {
            let _ = wal_value_to_json(u32::from_be_bytes([*a, *b, *c, *d]), text);
        }
        return;
    }
    let out = decode_wal(data);
    for e in &out.events {
        assert!(!e.id.is_empty() && !e.entity.is_empty());
        match e.event {
            EventKind::Insert => assert!(e.new.as_ref().is_some_and(|v| v.is_object())),
            EventKind::Update => assert!(e.new.as_ref().is_some_and(|v| v.is_object())),
            EventKind::Delete => assert!(e.old.as_ref().is_some_and(|v| v.is_object())),
        }
    }
    for reason in &out.undecodable {
        assert!(!reason.is_empty());
    }
});
