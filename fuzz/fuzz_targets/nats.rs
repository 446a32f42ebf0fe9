//! NATS messages as the consumer decodes them (`transport::codec::decode_body`, the body the
//! bridge publishes, with the `Nats-Msg-Id` header as the id fallback).
//!
//! Input: the `Nats-Msg-Id` header value on the first line (empty: no header), then the
//! message body.
//!
//! Checked: nothing panics; a decoded event, published again (`encode_body`) and decoded,
//! is the same event.

#![no_main]

mod common;

use fraiseql_observers::fuzzing::decode_nats_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (header, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&[][..], data),
    };
    let header = String::from_utf8_lossy(header);
    let Ok(event) = decode_nats_message(Some(&header), payload) else {
        return;
    };
    let _ = (event.key(), fraiseql_observers::telemetry::outgoing(&event));
    common::round_trip(&event);
});
