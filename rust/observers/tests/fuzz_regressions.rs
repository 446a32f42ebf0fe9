//! Inputs the fuzz targets in `fuzz/` found (`cargo fuzz`, see fuzz/README.md), each kept as
//! a test of the public API once fixed. Regressions in crate-private code live beside it.

use fraiseql_observers::transport::codec::{decode_body, encode_body};
use fraiseql_observers::EventKind;

/// `nats` target: an UPDATE message whose row is missing (`"deta"` for `"data"`) but which has
/// an `"old"` was decoded as an UPDATE without a new row, and, published again, came back as
/// an UPDATE whose new row was the old one. An UPDATE needs its new row, as a change-log row
/// does: the message is malformed.
#[test]
fn an_update_without_its_new_row_is_malformed() {
    let body = br#"{"event": "UPDATE", "entity": "Order", "subject": "fraiseql.mutation.order.update", "timestamp": "1013-02-25T10:00:00.000000Z", "deta": {"id": "ord_123", "status": "shipped", "total": 1250.0}, "id": "evt-3", "old": {"id": "ord_123", "ytatus": "pending", "total": 1250.0}, "table": "tb_order"}"#;
    let err = decode_body(body, Some("evt-3".into())).unwrap_err();
    assert_eq!(err, "missing field \"data\"");

    // What is valid still decodes, and a DELETE's row may come as "old" or "data".
    let update = br#"{"event": "UPDATE", "entity": "Order", "data": {"id": 1}, "old": {"id": 1}}"#;
    let event = decode_body(update, Some("m".into())).unwrap();
    assert_eq!(event.event, EventKind::Update);
    let back = decode_body(&encode_body("s", &event).unwrap(), None).unwrap();
    assert_eq!(back, event);
    for body in [
        &br#"{"event": "DELETE", "entity": "Order", "old": {"id": 1}}"#[..],
        &br#"{"event": "DELETE", "entity": "Order", "data": {"id": 1}}"#[..],
    ] {
        let event = decode_body(body, Some("m".into())).unwrap();
        assert_eq!(
            (event.new, event.old),
            (None, Some(serde_json::json!({"id": 1})))
        );
    }
}
