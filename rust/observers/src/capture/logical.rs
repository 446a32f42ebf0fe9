//! Logical capture: the changes are read from the write-ahead log through a publication and
//! one replication slot (pgoutput) per reader — the observers' listener, the NATS bridge, the
//! Redis forwarder — so writers pay nothing beyond their WAL and no transaction open elsewhere
//! holds anything back.
//!
//! An install, idempotent and serialised by the same advisory lock as the trigger install:
//! 1. in one transaction: the publication (`publish = 'insert, update, delete'`) if missing,
//!    each captured table added to it if it is not a member, `REPLICA IDENTITY FULL` on each
//!    table that does not have it yet (UPDATE and DELETE then carry the whole old row, which
//!    `.old`, `changed()` and unchanged TOASTed values need), and the capture triggers of these
//!    tables removed (a table captured both ways would make its writers pay twice);
//! 2. then, outside any transaction (PostgreSQL requires it), each reader's slot if missing.
//!    Creating a slot waits for the transactions open at that moment to end.
//!
//! Uninstall drops the readers' slots (refusing one a running engine holds) and the
//! publication. The tables keep `REPLICA IDENTITY FULL`.

use sqlx::PgPool;

use super::{drop_triggers_sql, plain_identifier, quote_identifier, run_in_transaction};
use crate::config::{Capture, Config};
use crate::error::{ConnectErrorKind, Error, Result};
use crate::schema::Schema;

/// Slot names are at most this long (PostgreSQL's NAMEDATALEN - 1).
const MAX_SLOT_NAME: usize = 63;
/// The oldest PostgreSQL that logical capture supports: pgoutput's `messages` option (14).
const MIN_SERVER_VERSION: i32 = 140_000;

/// What a logical install creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalCapture {
    /// The publication over the captured tables (`[observers.postgres] publication`).
    pub publication: String,
    /// One slot per reader, see [`slot_name`].
    pub slots: Vec<String>,
}

impl LogicalCapture {
    /// The publication of the config and the slots of every reader it runs: the observers'
    /// listener (backend `postgres`), the bridge (`run_bridge`) and the Redis forwarder.
    pub fn from_config(config: &Config) -> Self {
        LogicalCapture {
            publication: config.observers.postgres.publication.clone(),
            slots: readers(config).into_iter().map(slot_name).collect(),
        }
    }
}

/// The names of the readers of the database a config runs (each gets a slot of its own).
pub fn readers(config: &Config) -> Vec<&str> {
    use crate::config::Backend;
    let o = &config.observers;
    let mut out = Vec::new();
    if o.backend == Backend::Postgres {
        out.push(o.postgres.listener_id.as_str());
    }
    if o.run_bridge {
        out.push(o.bridge.transport_name.as_str());
    }
    if o.backend == Backend::Redis && config.database.url.is_some() {
        out.push(o.redis.forwarder_name.as_str());
    }
    out
}

/// The replication slot of a reader: `fraiseql` for the default listener, else
/// `fraiseql_<reader>`, lower-cased with anything but letters, digits and `_` made `_`. A name
/// that had to be changed or shortened gets a hash of the original, so two readers never
/// share a slot. Slot names are unique across the whole server, not per database.
pub fn slot_name(reader: &str) -> String {
    let clean: String = reader
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = if clean.starts_with("fraiseql") {
        clean.clone()
    } else {
        format!("fraiseql_{clean}")
    };
    if clean != reader || name.len() > MAX_SLOT_NAME {
        let hash = format!("{:08x}", fnv1a(reader.as_bytes()) as u32);
        name.truncate(MAX_SLOT_NAME - hash.len() - 1);
        name.push('_');
        name.push_str(&hash);
    }
    name
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The publication and table statements of an install (one transaction's body).
fn publication_body(schema: &Schema, publication: &str) -> Result<String> {
    let name = plain_identifier("publication", publication)?;
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock(hashtext('fraiseql.capture'));\n\
         DO $fraiseql$ BEGIN\n    \
         IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{name}') THEN\n        \
         CREATE PUBLICATION \"{name}\" WITH (publish = 'insert, update, delete');\n    \
         END IF;\nEND $fraiseql$;\n"
    );
    for entity in schema.entities() {
        let table = quote_identifier(&entity.table).map_err(|msg| {
            Error::Schema(format!(
                "table of entity `{}` ({:?}): {msg}",
                entity.name, entity.table
            ))
        })?;
        // The quoted name is made of validated characters only: safe inside '…'.
        sql.push_str(&format!(
            "DO $fraiseql$ BEGIN\n    \
             IF NOT (SELECT puballtables FROM pg_publication WHERE pubname = '{name}')\n       \
             AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid\n                       \
             WHERE p.pubname = '{name}' AND r.prrelid = '{table}'::regclass) THEN\n        \
             ALTER PUBLICATION \"{name}\" ADD TABLE {table};\n    \
             END IF;\n    \
             IF (SELECT relreplident FROM pg_class WHERE oid = '{table}'::regclass) <> 'f' THEN\n        \
             ALTER TABLE {table} REPLICA IDENTITY FULL;\n    \
             END IF;\nEND $fraiseql$;\n"
        ));
    }
    let repairs = schema
        .entities()
        .iter()
        .map(|entity| {
            let table = quote_identifier(&entity.table).expect("validated above");
            let repair = format!(
                "ALTER PUBLICATION \"{name}\" ADD TABLE {table}; \
                 ALTER TABLE {table} REPLICA IDENTITY FULL;"
            );
            (table, repair)
        })
        .collect::<Vec<_>>();
    sql.push_str(&super::ddl::register_repairs(&repairs));
    sql.push_str(super::TRACEPARENT_FUNCTION_SQL);
    Ok(sql)
}

/// Creates a slot unless it exists (never inside a transaction that wrote).
fn create_slot_sql(slot: &str) -> String {
    format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput') \
         WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}');\n"
    )
}

/// The whole install, as `fraiseql db install --print` shows it.
pub fn install_sql(schema: &Schema, capture: &LogicalCapture) -> Result<String> {
    let mut sql = format!(
        "BEGIN;\n{}COMMIT;\n",
        publication_body(schema, &capture.publication)?
    );
    for slot in &capture.slots {
        sql.push_str(&create_slot_sql(slot));
    }
    sql.push_str(&format!(
        "-- Where trigger capture was installed: its triggers go, and each slot starts after\n\
         -- that (what came before is in the change log, delivered from there first).\n\
         BEGIN;\n{}COMMIT;\n",
        switch_body(schema)?
    ));
    for slot in &capture.slots {
        sql.push_str(&advance_slot_sql(slot));
    }
    Ok(sql)
}

/// Removing trigger capture from the tables (serialised with installs).
fn switch_body(schema: &Schema) -> Result<String> {
    Ok(format!(
        "SELECT pg_advisory_xact_lock(hashtext('fraiseql.capture'));\n{}",
        drop_triggers_sql(schema)?
    ))
}

/// Moves a slot that nobody streams to the server's current WAL position, if it is behind.
fn advance_slot_sql(slot: &str) -> String {
    format!(
        "SELECT pg_replication_slot_advance(slot_name, pg_current_wal_lsn()) \
         FROM pg_replication_slots WHERE slot_name = '{slot}' AND active_pid IS NULL \
         AND confirmed_flush_lsn < pg_current_wal_lsn();\n"
    )
}

/// The uninstall, as `fraiseql db install --uninstall --print` shows it.
pub fn uninstall_sql(capture: &LogicalCapture) -> Result<String> {
    let publication = plain_identifier("publication", &capture.publication)?;
    let mut sql = String::new();
    for slot in &capture.slots {
        sql.push_str(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{slot}';\n"
        ));
    }
    sql.push_str(&format!("DROP PUBLICATION IF EXISTS \"{publication}\";\n"));
    Ok(sql)
}

/// Installs logical capture (see the module documentation).
pub async fn install(pool: &PgPool, schema: &Schema, capture: &LogicalCapture) -> Result<()> {
    let body = publication_body(schema, &capture.publication)?;
    run_in_transaction(pool, &body, "installing logical capture").await?;
    for slot in &capture.slots {
        create_slot(pool, slot).await?;
    }
    switch_from_triggers(pool, schema, capture).await
}

/// Where trigger capture was installed on these tables: removes it, then moves each slot
/// past the commit that removed it. The cut is exact: dropping a trigger waits for every
/// transaction that wrote to its table, so a transaction committed before the cut has all its
/// changes in the change log (delivered from there first, see the runtime), and one committed
/// after has none there and all in the WAL.
async fn switch_from_triggers(
    pool: &PgPool,
    schema: &Schema,
    capture: &LogicalCapture,
) -> Result<()> {
    let names: Vec<String> = schema
        .entities()
        .iter()
        .map(|e| format!("{}{}", super::TRIGGER_PREFIX, e.name))
        .collect();
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname = ANY($1)")
            .bind(&names)
            .fetch_one(pool)
            .await
            .map_err(|e| Error::Transport(format!("looking for capture triggers: {e}")))?;
    if triggers == 0 {
        return Ok(());
    }
    run_in_transaction(pool, &switch_body(schema)?, "removing trigger capture").await?;
    for slot in &capture.slots {
        sqlx::raw_sql(&advance_slot_sql(slot))
            .execute(pool)
            .await
            .map_err(|e| Error::Transport(format!("moving replication slot `{slot}`: {e}")))?;
    }
    tracing::info!(
        "[observers] switched from trigger capture to logical capture: the triggers are \
         removed, and what they captured is delivered from the change log first"
    );
    Ok(())
}

/// Adds `schema`'s tables to the publication (with `REPLICA IDENTITY FULL`), without
/// touching the slots: the capture guard's repair.
pub async fn add_tables(pool: &PgPool, schema: &Schema, publication: &str) -> Result<()> {
    let body = publication_body(schema, publication)?;
    run_in_transaction(pool, &body, "adding tables to the publication").await
}

/// Every slot of `capture` exists (else the error says to install first).
pub async fn check_slots(pool: &PgPool, capture: &LogicalCapture) -> Result<()> {
    let missing: Vec<String> = sqlx::query_scalar(
        "SELECT s FROM unnest($1::text[]) s \
         WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = s)",
    )
    .bind(&capture.slots)
    .fetch_all(pool)
    .await
    .map_err(|e| Error::Transport(format!("looking up replication slots: {e}")))?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::connect(
        ConnectErrorKind::NotSetUp,
        format!(
            "replication slot {} does not exist: run `fraiseql db install` (or start the \
             engine once) first",
            missing.join(", ")
        ),
    ))
}

async fn create_slot(pool: &PgPool, slot: &str) -> Result<()> {
    let exists: Option<Option<String>> =
        sqlx::query_scalar("SELECT database::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await
            .map_err(|e| Error::Transport(format!("looking up replication slot `{slot}`: {e}")))?;
    if let Some(database) = exists {
        return check_slot_database(pool, slot, database).await;
    }
    tracing::info!(
        "[observers] creating replication slot `{slot}` (it waits for the transactions open \
         now to end)"
    );
    match sqlx::raw_sql(&create_slot_sql(slot)).execute(pool).await {
        Ok(_) => Ok(()),
        // Created by another instance meanwhile.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(()),
        Err(e) => Err(slot_error(slot, &e)),
    }
}

/// A slot of the same name made for another database (slot names are server-wide).
async fn check_slot_database(pool: &PgPool, slot: &str, database: Option<String>) -> Result<()> {
    let current: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .map_err(|e| Error::Transport(format!("looking up replication slot `{slot}`: {e}")))?;
    match database {
        Some(db) if db == current => Ok(()),
        other => Err(Error::connect(
            ConnectErrorKind::NotSetUp,
            format!(
                "replication slot `{slot}` exists but belongs to {} (slot names are shared by \
                 every database of a server): give this install a reader name of its own \
                 ([observers.postgres] listener_id, [observers.bridge] transport_name or \
                 [observers.redis] forwarder_name)",
                other.map_or_else(
                    || "no database (a physical slot)".to_owned(),
                    |d| { format!("database `{d}`") }
                )
            ),
        )),
    }
}

fn slot_error(slot: &str, e: &sqlx::Error) -> Error {
    let code = match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match code.as_deref() {
        // insufficient_privilege
        Some("42501") => Error::connect(
            ConnectErrorKind::Permission,
            format!(
                "cannot create replication slot `{slot}`: the role may not replicate (it needs \
                 the REPLICATION attribute: ALTER ROLE … REPLICATION), or use capture = \
                 \"trigger\": {e}"
            ),
        ),
        // object_not_in_prerequisite_state: wal_level, max_replication_slots
        Some("55000") | Some("53400") => Error::connect(
            ConnectErrorKind::NotSetUp,
            format!("cannot create replication slot `{slot}`: {e}"),
        ),
        _ => Error::Transport(format!("creating replication slot `{slot}`: {e}")),
    }
}

/// How long uninstall waits for the session of an engine that just stopped to end.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Removes the slots (unless a running engine holds one) and the publication.
pub async fn uninstall(pool: &PgPool, capture: &LogicalCapture) -> Result<()> {
    for slot in &capture.slots {
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        let active = loop {
            let active: Option<Option<i32>> = sqlx::query_scalar(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(slot)
            .fetch_optional(pool)
            .await
            .map_err(|e| Error::Transport(format!("looking up slot `{slot}`: {e}")))?;
            match active {
                Some(Some(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => break other,
            }
        };
        match active {
            None => continue,
            Some(Some(pid)) => {
                return Err(Error::Transport(format!(
                    "replication slot `{slot}` is in use by server process {pid}: stop the \
                     engine that reads it first"
                )))
            }
            Some(None) => {}
        }
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot)
            .execute(pool)
            .await
            .map_err(|e| Error::Transport(format!("dropping replication slot `{slot}`: {e}")))?;
    }
    let publication = plain_identifier("publication", &capture.publication)?;
    sqlx::raw_sql(&format!("DROP PUBLICATION IF EXISTS \"{publication}\""))
        .execute(pool)
        .await
        .map_err(|e| Error::Transport(format!("dropping publication `{publication}`: {e}")))?;
    Ok(())
}

/// How a process captures, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Logical,
    Trigger,
}

/// The capture mode for `wanted`, with the reason the start-up log gives. `capture =
/// "logical"` on a server that cannot do it is an error that says what to change.
pub async fn decide(pool: &PgPool, wanted: Capture) -> Result<(Mode, String)> {
    if wanted == Capture::Trigger {
        return Ok((Mode::Trigger, "capture = \"trigger\"".to_owned()));
    }
    let (wal_level, version, may_replicate): (String, i32, bool) = sqlx::query_as(
        "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
         (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user) \
         OR (SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication') \
             THEN pg_has_role(current_user, 'rds_replication', 'member') ELSE false END)",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| Error::Transport(format!("reading the server's replication settings: {e}")))?;
    let unable = if wal_level != "logical" {
        Some(format!(
            "wal_level is {wal_level}, not logical (set wal_level = logical in postgresql.conf \
             and restart PostgreSQL)"
        ))
    } else if version < MIN_SERVER_VERSION {
        Some(format!(
            "PostgreSQL {} is older than 14, the first that logical capture supports",
            version / 10_000
        ))
    } else if !may_replicate {
        Some("the role may not replicate (ALTER ROLE … REPLICATION gives it the right)".to_owned())
    } else {
        None
    };
    match (wanted, unable) {
        (_, None) => Ok((
            Mode::Logical,
            if wanted == Capture::Logical {
                "capture = \"logical\"".to_owned()
            } else {
                "auto: wal_level is logical and the role may replicate".to_owned()
            },
        )),
        (Capture::Logical, Some(why)) => Err(Error::connect(
            ConnectErrorKind::NotSetUp,
            format!("capture = \"logical\" is not possible on this server: {why}"),
        )),
        (_, Some(why)) => Ok((Mode::Trigger, format!("auto: {why}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::EntityDef;

    fn schema(table: &str) -> Schema {
        Schema::new(vec![EntityDef {
            name: "Order".into(),
            table: table.into(),
            fields: vec![],
            kinds: Vec::new(),
        }])
        .unwrap()
    }

    #[test]
    fn slot_names_are_valid_and_distinct() {
        assert_eq!(slot_name("fraiseql"), "fraiseql");
        assert_eq!(slot_name("pg_to_nats"), "fraiseql_pg_to_nats");
        let odd = slot_name("Billing-Worker");
        assert!(odd.starts_with("fraiseql_billing_worker_"), "{odd}");
        assert_ne!(slot_name("a-b"), slot_name("a_b"));
        let long = slot_name(&"x".repeat(128));
        assert_eq!(long.len(), MAX_SLOT_NAME);
        assert_ne!(long, slot_name(&"x".repeat(127)));
        for name in [odd, long, slot_name("ü ß\0")] {
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
    }

    #[test]
    fn install_adds_each_table_with_full_replica_identity_then_creates_the_slots() {
        let capture = LogicalCapture {
            publication: "fraiseql".into(),
            slots: vec!["fraiseql".into(), "fraiseql_pg_to_nats".into()],
        };
        let sql = install_sql(&schema("public.tb_order"), &capture).unwrap();
        assert!(sql
            .contains("CREATE PUBLICATION \"fraiseql\" WITH (publish = 'insert, update, delete')"));
        assert!(sql.contains("ALTER PUBLICATION \"fraiseql\" ADD TABLE \"public\".\"tb_order\""));
        assert!(sql.contains("ALTER TABLE \"public\".\"tb_order\" REPLICA IDENTITY FULL"));
        assert!(sql.contains("DROP TRIGGER IF EXISTS \"fraiseql_capture_Order\""));
        let commit = sql.find("COMMIT;").unwrap();
        let slot = sql
            .find("pg_create_logical_replication_slot('fraiseql_pg_to_nats', 'pgoutput')")
            .unwrap();
        assert!(slot > commit, "slots are created after the transaction");
        let un = uninstall_sql(&capture).unwrap();
        assert!(un.contains("WHERE slot_name = 'fraiseql';"));
        assert!(un.ends_with("DROP PUBLICATION IF EXISTS \"fraiseql\";\n"));
    }

    #[test]
    fn hostile_names_are_rejected() {
        let capture = |p: &str| LogicalCapture {
            publication: p.into(),
            slots: vec![],
        };
        assert!(install_sql(&schema("tb_order"), &capture("a'; DROP TABLE x; --")).is_err());
        assert!(install_sql(&schema("tb_order\"; --"), &capture("fraiseql")).is_err());
        assert!(uninstall_sql(&capture("a.b")).is_err());
    }
}
