//! Rows of `fraiseql_change_log` (the trigger capture's table), as the PostgreSQL source
//! decodes them into events.
//!
//! Input: the row as a JSON object of its columns (see
//! `fraiseql_observers::fuzzing::decode_changelog_row`).
//!
//! Checked: nothing panics; a decoded event has the rows its kind needs, as objects, and goes
//! through the NATS / Redis codec unchanged (the bridge and the forwarder publish it) unless
//! its entity is empty.

#![no_main]

mod common;

use fraiseql_observers::fuzzing::decode_changelog_row;
use fraiseql_observers::EventKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = decode_changelog_row(data) else {
        return;
    };
    match event.event {
        EventKind::Insert => assert!(event.new.as_ref().is_some_and(|v| v.is_object())),
        EventKind::Update => {
            assert!(event.new.as_ref().is_some_and(|v| v.is_object()));
            assert!(event.old.as_ref().is_none_or(|v| v.is_object()));
        }
        EventKind::Delete => assert!(event.old.as_ref().is_some_and(|v| v.is_object())),
    }
    // A row with an empty entity (written by hand) names no entity: the NATS bridge does not
    // publish it (no subject) and the Redis consumer dead-letters it.
    if !event.entity.is_empty() {
        common::round_trip(&event);
    }
});
