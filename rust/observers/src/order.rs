//! Per-key order: which changes must run one at a time, and (with `[observers.nats]
//! partitions`) which partition of the stream a change is published to.
//!
//! A key is a hash of the entity and the values of the order-key columns in the row. The hash
//! is XXH3, stable across processes, machines and releases: publishers on different hosts
//! must put the changes of one key in the same partition. Two keys that hash alike are ordered
//! together: it costs parallelism, never order.

use std::collections::HashMap;

use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

use crate::event::{Event, EventKind};

/// entity → per event kind (INSERT, UPDATE, DELETE), the columns that key per-key order
/// (`None`: no observer of it asks for order).
#[derive(Debug, Default, Clone)]
pub struct OrderKeys {
    columns: HashMap<String, [Option<Vec<String>>; 3]>,
}

/// What every row is keyed on when no observer says otherwise.
pub const DEFAULT_ORDER_KEY: &str = "id";

pub(crate) fn kind_slot(kind: EventKind) -> usize {
    match kind {
        EventKind::Insert => 0,
        EventKind::Update => 1,
        EventKind::Delete => 2,
    }
}

impl OrderKeys {
    /// An observer of `entity` and `kind` asks for order on `columns`. Observers that key
    /// differently are ordered on the columns they share: a coarser key that keeps the order
    /// of each.
    pub fn add(&mut self, entity: &str, kind: EventKind, columns: &[String]) {
        let slot = &mut self.columns.entry(entity.to_owned()).or_default()[kind_slot(kind)];
        *slot = Some(match slot.take() {
            None => columns.to_vec(),
            Some(have) => have.into_iter().filter(|c| columns.contains(c)).collect(),
        });
    }

    fn columns_of(&self, event: &Event) -> Option<&[String]> {
        self.columns.get(event.entity.as_str())?[kind_slot(event.event)].as_deref()
    }

    /// The key `event` is ordered by, if an observer of it asks for per-key order.
    pub fn key(&self, event: &Event) -> Option<u64> {
        self.columns_of(event)
            .map(|columns| hash_key(event, columns))
    }

    /// The partition (of `count`) `event` is published to: by its order key, else by its
    /// row's `id`, so that the changes of one key always land in one partition.
    pub fn partition(&self, event: &Event, count: u32) -> u32 {
        let key = match self.columns_of(event) {
            Some(columns) => hash_key(event, columns),
            None => hash_key(event, &[DEFAULT_ORDER_KEY.to_owned()]),
        };
        u32::try_from(key % u64::from(count.max(1))).expect("less than a u32")
    }
}

fn hash_key(event: &Event, columns: &[String]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(event.entity.as_bytes());
    let row = event.row();
    for column in columns {
        // A separator per column: ("ab", "c") and ("a", "bc") differ.
        hasher.update(&[0xff]);
        match row.and_then(|r| r.get(column)) {
            Some(Value::String(s)) => hasher.update(s.as_bytes()),
            Some(other) => hasher.update(other.to_string().as_bytes()),
            None => hasher.update(&[0]),
        }
    }
    hasher.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(entity: &str, kind: EventKind, row: Value) -> Event {
        Event::new(entity, kind, "tb_order", Some(row), None)
    }

    #[test]
    fn a_key_is_the_same_in_every_process_and_release() {
        // Publishers on other hosts must agree: this value may never change.
        let mut keys = OrderKeys::default();
        keys.add("Order", EventKind::Update, &["id".to_owned()]);
        let e = event("Order", EventKind::Update, json!({"id": 42, "total": 1}));
        assert_eq!(keys.key(&e), Some(hash_key(&e, &["id".to_owned()])));
        assert_eq!(keys.partition(&e, 8), keys.partition(&e, 8));
        // XXH3-64 of "Order", 0xff, "42" (Python's `xxhash.xxh3_64_intdigest` agrees).
        assert_eq!(hash_key(&e, &["id".to_owned()]), 0x525b_b356_3a38_1b0d);
    }

    #[test]
    fn the_changes_of_one_row_share_a_partition_whatever_else_changed() {
        let keys = OrderKeys::default();
        let a = event("Order", EventKind::Insert, json!({"id": "7", "total": 1}));
        let b = event("Order", EventKind::Update, json!({"id": "7", "total": 2}));
        assert_eq!(keys.partition(&a, 16), keys.partition(&b, 16));
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| keys.partition(&event("Order", EventKind::Insert, json!({"id": i})), 16))
            .collect();
        assert_eq!(spread.len(), 16, "200 rows cover every partition");
    }

    #[test]
    fn observers_keying_differently_share_the_columns_they_have_in_common() {
        let mut keys = OrderKeys::default();
        keys.add(
            "Order",
            EventKind::Update,
            &["tenant".to_owned(), "id".to_owned()],
        );
        keys.add("Order", EventKind::Update, &["tenant".to_owned()]);
        let a = event("Order", EventKind::Update, json!({"id": 1, "tenant": "t"}));
        let b = event("Order", EventKind::Update, json!({"id": 2, "tenant": "t"}));
        assert_eq!(keys.key(&a), keys.key(&b));
        assert_eq!(keys.partition(&a, 64), keys.partition(&b, 64));
        assert_eq!(
            keys.key(&event("Order", EventKind::Insert, json!({"id": 1}))),
            None
        );
    }
}
