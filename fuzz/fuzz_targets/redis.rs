//! Redis stream entries as the consumer group decodes them
//! (`transport::redis::decode_entry`: the `payload` field, the `id` field or the entry id).
//!
//! Input: the entry id on the first line, then `name<TAB>value` lines (see
//! `fraiseql_observers::fuzzing::decode_redis_entry` for the value types).
//!
//! Checked: nothing panics; a decoded event, published again and decoded, is the same event.

#![no_main]

mod common;

use fraiseql_observers::fuzzing::decode_redis_entry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = decode_redis_entry(data) else {
        return;
    };
    common::round_trip(&event);
});
