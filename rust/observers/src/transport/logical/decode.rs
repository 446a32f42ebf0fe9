//! pgoutput messages into [`Event`]s: the relation descriptions the server sends before a
//! table's first change on a connection, then each INSERT, UPDATE and DELETE of a captured
//! table as one event per entity declared on it.
//!
//! The event id is `<commit LSN, 16 hex digits>-<position in the transaction>` (plus `-<n>`
//! for the second and later entity of one table): the same change gets the same id on every
//! delivery, whichever instance reads it, so EffectivelyOnce keys and `Nats-Msg-Id` work as
//! with the change log's ids. A message that cannot be decoded becomes undecodable input
//! (dead-lettered with its bytes), never a missing or half-filled row.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use pg_walstream::{
    ColumnData, ColumnInfo, LogicalReplicationMessage, LogicalReplicationParser, TupleData,
};
use serde_json::{json, Map, Value};

use super::value;
use crate::event::{Event, EventKind, Undecodable};
use crate::transport::delivery::Payload;

/// An entity declared on a captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub entity: String,
    /// The table as the schema names it (what events carry in `table`).
    pub table: String,
}

/// The captured tables by `(schema, table)` as the server names them.
pub type Tables = HashMap<(String, String), Vec<Target>>;

struct Relation {
    name: String,
    columns: Vec<ColumnInfo>,
    targets: Vec<Target>,
}

struct Transaction {
    commit_lsn: u64,
    timestamp: String,
    /// Set by a `fraiseql.traceparent` logical message: for the changes after it.
    traceparent: Option<String>,
    /// Changes seen so far in the transaction.
    seq: u32,
}

/// Decodes one replication connection's messages (relations are per connection: make a new
/// decoder for each).
pub struct Decoder {
    parser: LogicalReplicationParser,
    tables: Arc<Tables>,
    relations: HashMap<u32, Relation>,
    skip_unchanged_updates: bool,
    txn: Option<Transaction>,
}

pub use crate::capture::backfill::BACKFILL_PREFIX;
/// The prefix of the logical messages that attach a trace context to a transaction.
pub const TRACEPARENT_PREFIX: &str = "fraiseql.traceparent";

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Decoder {
    pub fn new(tables: Arc<Tables>, skip_unchanged_updates: bool) -> Self {
        Decoder {
            parser: LogicalReplicationParser::with_protocol_version(1),
            tables,
            relations: HashMap::new(),
            skip_unchanged_updates,
            txn: None,
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// A transaction starts: `commit_lsn` is where it committed (pgoutput sends a transaction
    /// whole, after its commit), `commit_time_micros` since 2000-01-01.
    pub fn begin(&mut self, commit_lsn: u64, commit_time_micros: i64) {
        let micros = commit_time_micros.saturating_add(PG_EPOCH_MICROS);
        let timestamp = chrono::DateTime::from_timestamp_micros(micros)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        self.txn = Some(Transaction {
            commit_lsn,
            timestamp,
            traceparent: None,
            seq: 0,
        });
    }

    /// Where the last change decoded is: its transaction's commit LSN and its place in it
    /// (as in its event id).
    pub fn last_position(&self) -> Option<(u64, u32)> {
        self.txn.as_ref().map(|txn| (txn.commit_lsn, txn.seq))
    }

    pub fn commit(&mut self) {
        self.txn = None;
    }

    /// One pgoutput message of the stream (not BEGIN or COMMIT): the events it makes, if any,
    /// go to `out`.
    pub fn message(&mut self, data: Bytes, out: &mut Vec<Payload>) {
        let parsed = match self.parser.parse_wal_message_bytes(data.clone()) {
            Ok(parsed) => parsed.message,
            Err(e) => {
                let id = self.position();
                out.push(undecodable(
                    id,
                    self.context("message"),
                    Some(&data),
                    format!("pgoutput: {e}"),
                ));
                return;
            }
        };
        match parsed {
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                let key = (namespace.to_string(), relation_name.to_string());
                let targets = self.tables.get(&key).cloned().unwrap_or_default();
                self.relations.insert(
                    relation_id,
                    Relation {
                        name: format!("{namespace}.{relation_name}"),
                        columns,
                        targets,
                    },
                );
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => self.change(
                relation_id,
                EventKind::Insert,
                None,
                Some(tuple),
                false,
                out,
            ),
            LogicalReplicationMessage::Update {
                relation_id,
                old_tuple,
                new_tuple,
                key_type,
            } => self.change(
                relation_id,
                EventKind::Update,
                old_tuple,
                Some(new_tuple),
                key_type == Some('K'),
                out,
            ),
            LogicalReplicationMessage::Delete {
                relation_id,
                old_tuple,
                key_type,
            } => self.change(
                relation_id,
                EventKind::Delete,
                Some(old_tuple),
                None,
                key_type == 'K',
                out,
            ),
            // Types are known by OID; origins and logical messages carry no row; TRUNCATE is
            // not published.
            _ => {}
        }
    }

    /// A row `fraiseql backfill` wrote into the WAL (a transactional logical message with
    /// prefix [`BACKFILL_PREFIX`]): an INSERT event of its entity, marked as backfilled. A row
    /// of an entity this reader does not capture is another install's: skipped.
    pub fn backfill(&mut self, content: &[u8], out: &mut Vec<Payload>) {
        #[derive(serde::Deserialize)]
        struct Message {
            entity: String,
            backfill: crate::event::Backfill,
            row: Value,
        }
        let id = self.position();
        let message: Message = match serde_json::from_slice(content) {
            Ok(m) => m,
            Err(e) => {
                out.push(undecodable(
                    id,
                    self.context("backfill"),
                    Some(&Bytes::copy_from_slice(content)),
                    format!("a backfill message that is not one: {e}"),
                ));
                return;
            }
        };
        let Some(target) = self
            .tables
            .values()
            .flatten()
            .find(|t| t.entity == message.entity)
        else {
            return;
        };
        if !message.row.is_object() {
            out.push(undecodable(
                id,
                self.context("backfill"),
                Some(&Bytes::copy_from_slice(content)),
                "a backfill message whose row is not an object".into(),
            ));
            return;
        }
        let timestamp = self
            .txn
            .as_ref()
            .map(|t| t.timestamp.clone())
            .unwrap_or_else(crate::event::now_rfc3339);
        out.push(Payload::Event(Event {
            id,
            entity: target.entity.clone(),
            event: EventKind::Insert,
            table: target.table.clone(),
            timestamp,
            new: Some(message.row),
            old: None,
            backfill: Some(message.backfill),
            traceparent: None,
        }));
    }

    /// A `fraiseql.traceparent` logical message: the trace context of the transaction's
    /// changes after it (kept as it came; the engine checks it).
    pub fn traceparent(&mut self, content: &[u8]) {
        if let Some(txn) = &mut self.txn {
            txn.traceparent = Some(String::from_utf8_lossy(content).trim().to_owned());
        }
    }

    /// The id of the next change.
    fn position(&mut self) -> String {
        match &mut self.txn {
            Some(txn) => {
                txn.seq += 1;
                format!("{:016X}-{}", txn.commit_lsn, txn.seq)
            }
            None => String::from("outside-transaction"),
        }
    }

    /// What can be said of where the change last given a [`Self::position`] is, for a dead
    /// letter: built only for those (it is a JSON object, allocated).
    fn context(&self, what: &str) -> Value {
        match &self.txn {
            Some(txn) => {
                json!({"commit_lsn": lsn_text(txn.commit_lsn), "position": txn.seq, "what": what})
            }
            None => json!({ "what": what }),
        }
    }

    fn change(
        &mut self,
        relation_id: u32,
        kind: EventKind,
        old: Option<TupleData>,
        new: Option<TupleData>,
        old_is_key_only: bool,
        out: &mut Vec<Payload>,
    ) {
        let id = self.position();
        let Some(relation) = self.relations.get(&relation_id) else {
            out.push(undecodable(
                id,
                self.context(kind.as_str()),
                None,
                format!("a change of relation {relation_id} arrived before its description"),
            ));
            return;
        };
        if relation.targets.is_empty() {
            return;
        }
        let rows = decode_rows(relation, old.as_ref(), new.as_ref(), old_is_key_only);
        let (old, new) = match rows {
            Ok(rows) => rows,
            Err(reason) => {
                let mut context = self.context(kind.as_str());
                context["table"] = Value::String(relation.name.clone());
                out.push(undecodable(id, context, None, reason));
                return;
            }
        };
        if kind == EventKind::Update && self.skip_unchanged_updates && old.is_some() && old == new {
            return;
        }
        let timestamp = self
            .txn
            .as_ref()
            .map(|t| t.timestamp.clone())
            .unwrap_or_else(crate::event::now_rfc3339);
        let traceparent = self.txn.as_ref().and_then(|t| t.traceparent.clone());
        // One event per entity on the table; the rows are moved into the last one, not
        // copied (nearly every table has one entity).
        let Some((last, rest)) = relation.targets.split_last() else {
            return;
        };
        let event = |id, target: &Target, (new, old), (timestamp, traceparent)| {
            Payload::Event(Event {
                id,
                entity: target.entity.clone(),
                event: kind,
                table: target.table.clone(),
                timestamp,
                new,
                old,
                backfill: None,
                traceparent,
            })
        };
        let nth_id = |n: usize| format!("{id}-{n}");
        for (n, target) in rest.iter().enumerate() {
            let id = if n == 0 { id.clone() } else { nth_id(n) };
            let rows = (new.clone(), old.clone());
            out.push(event(
                id,
                target,
                rows,
                (timestamp.clone(), traceparent.clone()),
            ));
        }
        let id = if rest.is_empty() {
            id
        } else {
            nth_id(rest.len())
        };
        out.push(event(id, last, (new, old), (timestamp, traceparent)));
    }
}

/// The old and new rows of a change as JSON objects. An unchanged TOASTed value in the new
/// row is taken from the old one (complete with `REPLICA IDENTITY FULL`).
fn decode_rows(
    relation: &Relation,
    old: Option<&TupleData>,
    new: Option<&TupleData>,
    old_is_key_only: bool,
) -> Result<(Option<Value>, Option<Value>), String> {
    let old = old
        .map(|t| row(relation, t, None, old_is_key_only))
        .transpose()?;
    let new = new
        .map(|t| row(relation, t, old.as_ref(), false))
        .transpose()?;
    Ok((old.map(Value::Object), new.map(Value::Object)))
}

fn row(
    relation: &Relation,
    tuple: &TupleData,
    old: Option<&Map<String, Value>>,
    key_only: bool,
) -> Result<Map<String, Value>, String> {
    if tuple.columns.len() != relation.columns.len() {
        return Err(format!(
            "a row of {} has {} columns, its description {}",
            relation.name,
            tuple.columns.len(),
            relation.columns.len()
        ));
    }
    let mut out = Map::with_capacity(relation.columns.len());
    for (column, data) in relation.columns.iter().zip(&tuple.columns) {
        if key_only && !column.is_key() {
            continue;
        }
        let name: &str = &column.name;
        let value = column_value(relation, column, data, old.and_then(|o| o.get(name)))?;
        out.insert(name.to_owned(), value);
    }
    Ok(out)
}

fn column_value(
    relation: &Relation,
    column: &ColumnInfo,
    data: &ColumnData,
    old: Option<&Value>,
) -> Result<Value, String> {
    match data.data_type {
        b'n' => Ok(Value::Null),
        b't' => match data.as_str() {
            Some(text) => Ok(value::to_json(column.type_id, &text)),
            None => Err(format!(
                "column {}.{} is not valid UTF-8",
                relation.name, column.name
            )),
        },
        b'u' => old.cloned().ok_or_else(|| {
            format!(
                "column {}.{} is an unchanged TOASTed value and the old row does not carry it: \
                 give the table REPLICA IDENTITY FULL (`fraiseql db install` does)",
                relation.name, column.name
            )
        }),
        other => Err(format!(
            "column {}.{} came in format {:?}, not text",
            relation.name,
            column.name,
            char::from(other)
        )),
    }
}

fn undecodable(id: String, context: Value, raw: Option<&Bytes>, reason: String) -> Payload {
    Payload::Undecodable(Undecodable {
        id,
        context,
        raw: raw.map(|b| b.to_vec()),
        reason,
    })
}

/// An LSN as PostgreSQL writes it: `16/B374D848`.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use pg_walstream::pgoutput_encode::encode_message;

    fn encode(msg: &LogicalReplicationMessage) -> Bytes {
        let mut buf = BytesMut::new();
        encode_message(msg, 1, &mut buf);
        buf.freeze()
    }

    fn text(s: &str) -> ColumnData {
        ColumnData::text(s.as_bytes().to_vec())
    }

    fn unchanged() -> ColumnData {
        let mut c = ColumnData::null();
        c.data_type = b'u';
        c
    }

    fn decoder() -> Decoder {
        decoder_for(&["Order"])
    }

    /// A decoder for `tb_order`, declared by each of `entities`.
    fn decoder_for(entities: &[&str]) -> Decoder {
        let mut tables = Tables::new();
        tables.insert(
            ("public".into(), "tb_order".into()),
            entities
                .iter()
                .map(|entity| Target {
                    entity: (*entity).into(),
                    table: "tb_order".into(),
                })
                .collect(),
        );
        let mut d = Decoder::new(Arc::new(tables), true);
        let relation = LogicalReplicationMessage::Relation {
            relation_id: 7,
            namespace: "public".into(),
            relation_name: "tb_order".into(),
            replica_identity: b'f',
            columns: vec![
                ColumnInfo::new(1, "id".into(), 25, -1),
                ColumnInfo::new(0, "total".into(), 1700, -1),
                ColumnInfo::new(0, "note".into(), 25, -1),
            ],
        };
        d.message(encode(&relation), &mut Vec::new());
        d.begin(0x16_B374_D848, 0);
        d
    }

    fn events(out: Vec<Payload>) -> Vec<Event> {
        out.into_iter()
            .map(|p| match p {
                Payload::Event(e) => e,
                Payload::Undecodable(u) => panic!("undecodable: {}", u.reason),
            })
            .collect()
    }

    #[test]
    fn a_table_of_two_entities_gives_each_its_event_with_its_own_id() {
        let mut d = decoder_for(&["Order", "Sale"]);
        let mut out = Vec::new();
        d.message(
            encode(&LogicalReplicationMessage::Insert {
                relation_id: 7,
                tuple: TupleData::new(vec![text("o1"), text("10"), text("n")]),
            }),
            &mut out,
        );
        let [order, sale] = events(out).try_into().unwrap();
        assert_eq!(
            (order.id.as_str(), order.entity.as_str()),
            ("00000016B374D848-1", "Order")
        );
        assert_eq!(
            (sale.id.as_str(), sale.entity.as_str()),
            ("00000016B374D848-1-1", "Sale")
        );
        assert_eq!(order.new, sale.new);
        assert_eq!(
            order.new,
            Some(json!({"id": "o1", "total": 10, "note": "n"}))
        );
        assert_eq!(order.timestamp, sale.timestamp);
    }

    #[test]
    fn changes_become_events_with_ids_from_the_commit_lsn() {
        let mut d = decoder();
        let mut out = Vec::new();
        let row = |total: &str| TupleData::new(vec![text("o1"), text(total), text("big")]);
        d.message(
            encode(&LogicalReplicationMessage::Insert {
                relation_id: 7,
                tuple: row("10.5"),
            }),
            &mut out,
        );
        d.message(
            encode(&LogicalReplicationMessage::Update {
                relation_id: 7,
                old_tuple: Some(row("10.5")),
                new_tuple: TupleData::new(vec![text("o1"), text("20"), unchanged()]),
                key_type: Some('O'),
            }),
            &mut out,
        );
        let [insert, update] = events(out).try_into().unwrap();
        assert_eq!(insert.id, "00000016B374D848-1");
        assert_eq!(insert.timestamp, "2000-01-01T00:00:00.000000Z");
        assert_eq!(
            insert.new,
            Some(json!({"id": "o1", "total": 10.5, "note": "big"}))
        );
        assert_eq!(update.id, "00000016B374D848-2");
        // The unchanged TOASTed note comes from the old row.
        assert_eq!(
            update.new,
            Some(json!({"id": "o1", "total": 20, "note": "big"}))
        );
        assert_eq!(
            update.old,
            Some(json!({"id": "o1", "total": 10.5, "note": "big"}))
        );
    }

    #[test]
    fn an_unchanged_toast_value_without_the_old_row_is_undecodable_not_missing() {
        let mut d = decoder();
        let mut out = Vec::new();
        d.message(
            encode(&LogicalReplicationMessage::Update {
                relation_id: 7,
                old_tuple: None,
                new_tuple: TupleData::new(vec![text("o1"), text("20"), unchanged()]),
                key_type: None,
            }),
            &mut out,
        );
        let [Payload::Undecodable(u)] = &out[..] else {
            panic!("one undecodable payload");
        };
        assert!(u.reason.contains("REPLICA IDENTITY FULL"), "{}", u.reason);
        assert_eq!(u.id, "00000016B374D848-1");
    }

    #[test]
    fn unchanged_updates_are_skipped_and_unknown_tables_ignored() {
        let mut d = decoder();
        let mut out = Vec::new();
        let row = TupleData::new(vec![text("o1"), text("1"), ColumnData::null()]);
        d.message(
            encode(&LogicalReplicationMessage::Update {
                relation_id: 7,
                old_tuple: Some(row.clone()),
                new_tuple: row,
                key_type: Some('O'),
            }),
            &mut out,
        );
        d.message(
            encode(&LogicalReplicationMessage::Relation {
                relation_id: 8,
                namespace: "public".into(),
                relation_name: "other".into(),
                replica_identity: b'd',
                columns: vec![ColumnInfo::new(1, "id".into(), 23, -1)],
            }),
            &mut out,
        );
        d.message(
            encode(&LogicalReplicationMessage::Insert {
                relation_id: 8,
                tuple: TupleData::new(vec![text("1")]),
            }),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_and_unknown_relations_are_undecodable() {
        let mut d = decoder();
        let mut out = Vec::new();
        d.message(Bytes::from_static(b"I\xff\xff"), &mut out);
        d.message(
            encode(&LogicalReplicationMessage::Insert {
                relation_id: 99,
                tuple: TupleData::new(vec![text("1")]),
            }),
            &mut out,
        );
        d.message(
            encode(&LogicalReplicationMessage::Insert {
                relation_id: 7,
                tuple: TupleData::new(vec![text("1")]),
            }),
            &mut out,
        );
        let reasons: Vec<String> = out
            .into_iter()
            .map(|p| match p {
                Payload::Undecodable(u) => u.reason,
                Payload::Event(e) => panic!("decoded {e:?}"),
            })
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].starts_with("pgoutput:"));
        assert!(reasons[1].contains("before its description"));
        assert!(reasons[2].contains("has 1 columns, its description 3"));
    }

    #[test]
    fn a_delete_with_only_the_key_carries_only_the_key() {
        let mut d = decoder();
        let mut out = Vec::new();
        d.message(
            encode(&LogicalReplicationMessage::Delete {
                relation_id: 7,
                old_tuple: TupleData::new(vec![text("o1"), ColumnData::null(), ColumnData::null()]),
                key_type: 'K',
            }),
            &mut out,
        );
        let [delete] = events(out).try_into().unwrap();
        assert_eq!(delete.old, Some(json!({"id": "o1"})));
        assert_eq!(delete.new, None);
    }
}
