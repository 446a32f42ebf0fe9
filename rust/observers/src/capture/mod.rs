//! The change-capture SQL behind `fraiseql db install`: the change log (the outbox that is the
//! truth), the per-listener cursor table, the trigger functions and three triggers per entity
//! table: a row-level one for UPDATE (it pairs old and new rows) and statement-level ones for
//! INSERT and DELETE that log a whole statement's rows from its transition table in one
//! `INSERT … SELECT` (a 100-row insert pays for one trigger call, not 100).
//!
//! Everything is idempotent (`CREATE … IF NOT EXISTS`, `CREATE OR REPLACE`, `DROP TRIGGER IF
//! EXISTS` + `CREATE TRIGGER`) and runs in one transaction that first takes a transaction-level
//! advisory lock, so two installers started at once serialise instead of racing. Requires
//! PostgreSQL 13 or later (`xid8`, `pg_current_xact_id()`, `pg_current_snapshot()`).
//!
//! Every identifier that reaches SQL text — entity names, table names, the NOTIFY channel — is
//! first checked with [`validate_sql_identifier`] and then double-quoted, so names are taken
//! exactly as written (case-sensitive; lower case is the normal PostgreSQL spelling).
//!
//! The trigger functions:
//! - writes one change-log row per changed row: `new` = `to_jsonb(NEW)` (NULL for DELETE),
//!   `old` = `to_jsonb(OLD)` (NULL for INSERT), `txid` = the writing transaction's id;
//! - skips an UPDATE that changes nothing (`to_jsonb(NEW) = to_jsonb(OLD)`) unless installed
//!   with [`CaptureOptions::skip_unchanged_updates`] = false;
//! - sends at most one `pg_notify(channel, '<change-log id>')` per transaction, guarded by the
//!   transaction-local setting `fraiseql.notified`. The notification is only a wake-up: readers
//!   always read the change log by cursor;
//! - is `SECURITY DEFINER` with the installer's `search_path`, so application roles that write
//!   the entity tables need no privileges on the change log, and a session `search_path` cannot
//!   redirect its insert.

pub mod backfill;
mod ddl;
pub mod guard;
pub mod logical;

use sqlx::PgPool;

use crate::config::validate_sql_identifier;
use crate::error::{Error, Result};
use crate::schema::Schema;

/// The change log: one row per captured row change.
pub const CHANGE_LOG_TABLE: &str = "fraiseql_change_log";
/// Where each listener's acknowledged position `(last_txid, last_id)` is stored.
pub const CURSOR_TABLE: &str = "fraiseql_cursor";
/// The trigger function installed on every entity table.
pub const CAPTURE_FUNCTION: &str = "fraiseql_capture";
/// The statement-level functions for INSERT and DELETE (transition tables).
pub const CAPTURE_INSERTED_FUNCTION: &str = "fraiseql_capture_inserted";
pub const CAPTURE_DELETED_FUNCTION: &str = "fraiseql_capture_deleted";
/// Trigger name prefix: on an entity's table, `fraiseql_capture_<Entity>` (row-level, UPDATE)
/// and `fraiseql_capture_<Entity>_ins` / `_del` (statement-level, INSERT / DELETE).
pub const TRIGGER_PREFIX: &str = "fraiseql_capture_";
const STATEMENT_TRIGGER_SUFFIX_LEN: usize = "_ins".len();

/// How the capture triggers behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    /// The channel `pg_notify` wakes readers on (`[observers] notify_channel`).
    pub notify_channel: String,
    /// Skip UPDATEs whose new row equals the old one (default true).
    pub skip_unchanged_updates: bool,
    /// Send the per-transaction NOTIFY (default true). Off for poll-only readers: a writer
    /// then pays only for its change-log rows.
    pub notify: bool,
}

impl CaptureOptions {
    pub fn new(notify_channel: impl Into<String>) -> Self {
        CaptureOptions {
            notify_channel: notify_channel.into(),
            skip_unchanged_updates: true,
            notify: true,
        }
    }

    /// The postgres backend's capture: `[observers] notify_channel` and
    /// `[observers.postgres] listen` / `skip_unchanged_updates`.
    pub fn from_config(config: &crate::Config) -> Self {
        let o = &config.observers;
        CaptureOptions {
            notify_channel: o.notify_channel.clone(),
            skip_unchanged_updates: o.postgres.skip_unchanged_updates,
            notify: o.postgres.listen,
        }
    }
}

/// Validates an identifier (optionally `schema.table`) and double-quotes each part.
pub(crate) fn quote_identifier(name: &str) -> std::result::Result<String, String> {
    validate_sql_identifier(name)?;
    Ok(name
        .split('.')
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join("."))
}

/// An unqualified identifier (no `.`), validated; returned unquoted for use in literals.
fn plain_identifier<'a>(what: &str, name: &'a str) -> Result<&'a str> {
    validate_sql_identifier(name).map_err(|e| Error::Schema(format!("{what} {name:?}: {e}")))?;
    if name.contains('.') {
        return Err(Error::Schema(format!(
            "{what} {name:?}: expected a name without '.'"
        )));
    }
    Ok(name)
}

struct EntityTrigger {
    /// Quoted name of the row-level UPDATE trigger.
    trigger: String,
    /// The same name unquoted (the INSERT and DELETE triggers add `_ins` and `_del`): safe
    /// inside a '…' literal, being `TRIGGER_PREFIX` and a plain identifier.
    name: String,
    /// Quoted names of the statement-level INSERT and DELETE triggers.
    insert_trigger: String,
    delete_trigger: String,
    /// Quoted (possibly qualified) table.
    table: String,
    /// The table exactly as declared: a validated identifier, safe inside a '…' literal.
    table_literal: String,
    entity: String,
}

fn entity_triggers(schema: &Schema) -> Result<Vec<EntityTrigger>> {
    let mut out = Vec::with_capacity(schema.entities().len());
    for e in schema.entities() {
        let entity = plain_identifier("entity name", &e.name)?;
        let trigger = format!("{TRIGGER_PREFIX}{entity}");
        if trigger.len() + STATEMENT_TRIGGER_SUFFIX_LEN > 63 {
            return Err(Error::Schema(format!(
                "entity name {entity:?} is too long for its capture trigger name `{trigger}` \
                 (PostgreSQL names are at most 63 characters)"
            )));
        }
        let table = quote_identifier(&e.table).map_err(|msg| {
            Error::Schema(format!(
                "table of entity `{}` ({:?}): {msg}",
                e.name, e.table
            ))
        })?;
        out.push(EntityTrigger {
            insert_trigger: format!("\"{trigger}_ins\""),
            delete_trigger: format!("\"{trigger}_del\""),
            trigger: format!("\"{trigger}\""),
            name: trigger,
            table,
            table_literal: e.table.clone(),
            entity: entity.to_owned(),
        });
    }
    Ok(out)
}

/// The statements of an install, without transaction control (see [`install_sql`]).
fn install_body(schema: &Schema, options: &CaptureOptions) -> Result<String> {
    let channel = plain_identifier("notify channel", &options.notify_channel)?;
    // An empty channel argument tells the trigger not to notify.
    let channel = if options.notify { channel } else { "" };
    let mode = if options.skip_unchanged_updates {
        "skip_unchanged"
    } else {
        "all"
    };
    let mut sql = format!(
        r#"SELECT pg_advisory_xact_lock(hashtext('fraiseql.capture'));

CREATE TABLE IF NOT EXISTS {CHANGE_LOG_TABLE} (
    id           bigserial PRIMARY KEY,
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    entity       text NOT NULL,
    event        text NOT NULL,
    table_name   text NOT NULL,
    new          jsonb,
    old          jsonb,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- What is already there is left alone: `ALTER TABLE … IF NOT EXISTS` and `CREATE INDEX IF NOT
-- EXISTS` lock the change log before they look, and a start of the engine that locked it
-- (then a captured table) deadlocked with the application's writers, which lock the other way.
DO $fraiseql$ BEGIN
    IF to_regclass('{CHANGE_LOG_TABLE}_txid_id_idx') IS NULL THEN
        CREATE INDEX {CHANGE_LOG_TABLE}_txid_id_idx ON {CHANGE_LOG_TABLE} (txid, id);
    END IF;
    -- Set on rows fed by `fraiseql backfill`: {{"id", "observers"}}.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{CHANGE_LOG_TABLE}'::regclass
                   AND attname = 'backfill' AND NOT attisdropped) THEN
        ALTER TABLE {CHANGE_LOG_TABLE} ADD COLUMN backfill jsonb;
    END IF;
    -- The writer's W3C trace context (`SET LOCAL fraiseql.traceparent`), if it set one.
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{CHANGE_LOG_TABLE}'::regclass
                   AND attname = 'traceparent' AND NOT attisdropped) THEN
        ALTER TABLE {CHANGE_LOG_TABLE} ADD COLUMN traceparent text;
    END IF;
END $fraiseql$;
{TRACEPARENT_FUNCTION_SQL}

CREATE TABLE IF NOT EXISTS {CURSOR_TABLE} (
    listener_id text PRIMARY KEY,
    last_txid   xid8 NOT NULL DEFAULT '0',
    last_id     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- TG_ARGV: entity, notify channel ('' = none), 'skip_unchanged' | 'all', declared table.
-- UPDATE, row by row: old and new rows are paired by the row trigger itself.
CREATE OR REPLACE FUNCTION {CAPTURE_FUNCTION}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fraiseql$
DECLARE
    v_new jsonb;
    v_old jsonb;
    v_id  bigint;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        v_new := to_jsonb(NEW);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        v_old := to_jsonb(OLD);
    END IF;
    IF TG_OP = 'UPDATE' AND TG_ARGV[2] = 'skip_unchanged' AND v_new = v_old THEN
        RETURN NULL;
    END IF;
    INSERT INTO {CHANGE_LOG_TABLE} (entity, event, table_name, new, old, traceparent)
    VALUES (TG_ARGV[0], TG_OP, TG_ARGV[3], v_new, v_old,
            nullif(current_setting('fraiseql.traceparent', true), ''))
    RETURNING id INTO v_id;
    -- One wake-up per transaction: the setting is transaction-local.
    IF TG_ARGV[1] <> '' AND current_setting('fraiseql.notified', true) IS DISTINCT FROM TG_ARGV[1] THEN
        PERFORM set_config('fraiseql.notified', TG_ARGV[1], true);
        PERFORM pg_notify(TG_ARGV[1], v_id::text);
    END IF;
    RETURN NULL;
END
$fraiseql$;
"#
    );
    // INSERT and DELETE, once per statement over its transition table: one INSERT … SELECT
    // instead of one trigger call per row, which is what bulk writers pay for.
    sql.push_str(&statement_function(
        CAPTURE_INSERTED_FUNCTION,
        "INSERT",
        "to_jsonb(r), NULL",
        "fraiseql_inserted r",
    ));
    sql.push_str(&statement_function(
        CAPTURE_DELETED_FUNCTION,
        "DELETE",
        "NULL, to_jsonb(r)",
        "fraiseql_deleted r",
    ));
    let mut repairs = Vec::new();
    for t in entity_triggers(schema)? {
        let args = format!(
            "'{entity}', '{channel}', '{mode}', '{table_literal}'",
            entity = t.entity,
            table_literal = t.table_literal
        );
        sql.push_str(&install_triggers(&t, &args));
        repairs.push((t.table.clone(), create_triggers(&t, &args)));
    }
    sql.push_str(&ddl::register_repairs(&repairs));
    Ok(sql)
}

/// What the capture triggers were made from, kept as their comment: a start whose triggers
/// carry it (and are enabled) touches nothing. Dropping and creating them on every start took
/// an ACCESS EXCLUSIVE lock on the application's table each time. Bump the version when the
/// trigger statements below change.
fn trigger_fingerprint(args: &str) -> String {
    format!("fraiseql capture 1: {}", args.replace('\'', ""))
}

/// The UPDATE (row), INSERT and DELETE (statement) triggers of one table, created only if
/// they are not all there as this version makes them.
fn install_triggers(t: &EntityTrigger, args: &str) -> String {
    format!(
        "\nDO $fraiseql$ BEGIN\n    \
         IF (SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass\n        \
         AND tgname IN ('{name}', '{name}_ins', '{name}_del') AND tgenabled <> 'D'\n        \
         AND obj_description(oid, 'pg_trigger') = '{fingerprint}') <> 3 THEN\n    \
         DROP TRIGGER IF EXISTS {trigger} ON {table};\n    \
         DROP TRIGGER IF EXISTS {insert} ON {table};\n    \
         DROP TRIGGER IF EXISTS {delete} ON {table};\n    \
         {create}\n    \
         END IF;\nEND $fraiseql$;\n",
        fingerprint = trigger_fingerprint(args),
        create = create_triggers(t, args),
        name = t.name,
        trigger = t.trigger,
        insert = t.insert_trigger,
        delete = t.delete_trigger,
        table = t.table,
    )
}

/// Creates the three capture triggers of one table with their fingerprint: what an install
/// runs once the old ones are dropped, and what the event trigger runs on a re-created table.
fn create_triggers(t: &EntityTrigger, args: &str) -> String {
    format!(
        "CREATE TRIGGER {trigger} AFTER UPDATE ON {table}\n        \
         FOR EACH ROW EXECUTE FUNCTION {CAPTURE_FUNCTION}({args});\n    \
         CREATE TRIGGER {insert} AFTER INSERT ON {table} REFERENCING NEW TABLE AS fraiseql_inserted\n        \
         FOR EACH STATEMENT EXECUTE FUNCTION {CAPTURE_INSERTED_FUNCTION}({args});\n    \
         CREATE TRIGGER {delete} AFTER DELETE ON {table} REFERENCING OLD TABLE AS fraiseql_deleted\n        \
         FOR EACH STATEMENT EXECUTE FUNCTION {CAPTURE_DELETED_FUNCTION}({args});\n    \
         COMMENT ON TRIGGER {trigger} ON {table} IS '{fingerprint}';\n    \
         COMMENT ON TRIGGER {insert} ON {table} IS '{fingerprint}';\n    \
         COMMENT ON TRIGGER {delete} ON {table} IS '{fingerprint}';",
        fingerprint = trigger_fingerprint(args),
        trigger = t.trigger,
        insert = t.insert_trigger,
        delete = t.delete_trigger,
        table = t.table,
    )
}

/// A statement-level capture function: the statement's rows from its transition table
/// (`rows` = the `new, old` columns, `from` the transition table), then the one wake-up per
/// transaction.
fn statement_function(name: &str, event: &str, rows: &str, from: &str) -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fraiseql$
DECLARE
    v_id bigint;
BEGIN
    WITH logged AS (
        INSERT INTO {CHANGE_LOG_TABLE} (entity, event, table_name, new, old, traceparent)
        SELECT TG_ARGV[0], '{event}', TG_ARGV[3], {rows},
               nullif(current_setting('fraiseql.traceparent', true), '')
        FROM {from}
        RETURNING id
    )
    SELECT max(id) INTO v_id FROM logged;
    IF v_id IS NOT NULL AND TG_ARGV[1] <> ''
       AND current_setting('fraiseql.notified', true) IS DISTINCT FROM TG_ARGV[1] THEN
        PERFORM set_config('fraiseql.notified', TG_ARGV[1], true);
        PERFORM pg_notify(TG_ARGV[1], v_id::text);
    END IF;
    RETURN NULL;
END
$fraiseql$;
"#
    )
}

fn uninstall_body(schema: &Schema) -> Result<String> {
    let mut sql = String::from("SELECT pg_advisory_xact_lock(hashtext('fraiseql.capture'));\n");
    sql.push_str(&drop_triggers_sql(schema)?);
    for function in [
        CAPTURE_FUNCTION,
        CAPTURE_INSERTED_FUNCTION,
        CAPTURE_DELETED_FUNCTION,
    ] {
        sql.push_str(&format!(
            "DO $fraiseql$ BEGIN\n    IF to_regprocedure('{function}()') IS NOT NULL AND NOT EXISTS (\n        \
             SELECT 1 FROM pg_trigger WHERE tgfoid = to_regprocedure('{function}()')) THEN\n        \
             DROP FUNCTION {function}();\n    END IF;\nEND $fraiseql$;\n"
        ));
    }
    Ok(sql)
}

/// Drops the capture triggers of `schema`'s tables, where the tables exist.
fn drop_triggers_sql(schema: &Schema) -> Result<String> {
    let mut sql = String::new();
    for t in entity_triggers(schema)? {
        // The quoted name is made of validated characters only: safe inside '…'.
        sql.push_str(&format!(
            "DO $fraiseql$ BEGIN\n    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass('{table}')\n        \
             AND tgname IN ('{name}', '{name}_ins', '{name}_del')) THEN\n        \
             DROP TRIGGER IF EXISTS {trigger} ON {table};\n        \
             DROP TRIGGER IF EXISTS {insert} ON {table};\n        \
             DROP TRIGGER IF EXISTS {delete} ON {table};\n    END IF;\nEND $fraiseql$;\n",
            table = t.table,
            name = t.name,
            trigger = t.trigger,
            insert = t.insert_trigger,
            delete = t.delete_trigger,
        ));
    }
    Ok(sql)
}

/// The install script for `schema` with default [`CaptureOptions`], wrapped in
/// `BEGIN; … COMMIT;` (what `fraiseql db install` runs; printable for a DBA to review).
///
/// Errors when an entity name, table name or the channel is not a plain SQL identifier.
pub fn install_sql(schema: &Schema, notify_channel: &str) -> Result<String> {
    install_sql_with(schema, &CaptureOptions::new(notify_channel))
}

/// [`install_sql`] with explicit options.
pub fn install_sql_with(schema: &Schema, options: &CaptureOptions) -> Result<String> {
    Ok(format!(
        "BEGIN;\n{}COMMIT;\n",
        install_body(schema, options)?
    ))
}

/// The uninstall script: drops the capture triggers of `schema`'s entities, then the trigger
/// function if no other table still uses it. The change log and cursor tables are kept (they
/// may hold undelivered changes); drop them by hand when no longer wanted.
pub fn uninstall_sql(schema: &Schema) -> Result<String> {
    Ok(format!("BEGIN;\n{}COMMIT;\n", uninstall_body(schema)?))
}

/// Installs (or re-installs) change capture for every entity of `schema`, in one transaction.
pub async fn install(pool: &PgPool, schema: &Schema, notify_channel: &str) -> Result<()> {
    install_with(pool, schema, &CaptureOptions::new(notify_channel)).await
}

/// [`install`] with explicit options.
pub async fn install_with(pool: &PgPool, schema: &Schema, options: &CaptureOptions) -> Result<()> {
    let body = install_body(schema, options)?;
    run_in_transaction(pool, &body, "installing change capture").await
}

/// Removes the capture triggers of `schema` (see [`uninstall_sql`]).
pub async fn uninstall(pool: &PgPool, schema: &Schema) -> Result<()> {
    let body = uninstall_body(schema)?;
    run_in_transaction(pool, &body, "uninstalling change capture").await
}

/// Brings a change log of an earlier version up to date (its `backfill` and `traceparent`
/// columns), so that a reader can drain it after a switch to logical capture.
pub async fn upgrade_change_log(pool: &PgPool) -> Result<()> {
    run_in_transaction(
        pool,
        &format!(
            "ALTER TABLE {CHANGE_LOG_TABLE} ADD COLUMN IF NOT EXISTS backfill jsonb; \
             ALTER TABLE {CHANGE_LOG_TABLE} ADD COLUMN IF NOT EXISTS traceparent text"
        ),
        "updating the change log",
    )
    .await
}

/// `SELECT fraiseql_traceparent('00-…')` in a transaction attaches a W3C trace context to
/// its changes, whichever the capture: it sets `fraiseql.traceparent` for the capture
/// triggers and, where the WAL is logical, writes it into the WAL for logical capture.
pub(crate) const TRACEPARENT_FUNCTION_SQL: &str = r#"
CREATE OR REPLACE FUNCTION fraiseql_traceparent(traceparent text) RETURNS void
LANGUAGE plpgsql AS $fraiseql$
BEGIN
    PERFORM set_config('fraiseql.traceparent', traceparent, true);
    IF current_setting('wal_level') = 'logical' THEN
        PERFORM pg_logical_emit_message(true, 'fraiseql.traceparent', traceparent);
    END IF;
END
$fraiseql$;
"#;

/// Runs `body` (several statements) as one transaction: PostgreSQL runs the statements of
/// one simple-protocol query in a single implicit transaction, all or none.
async fn run_in_transaction(pool: &PgPool, body: &str, what: &str) -> Result<()> {
    sqlx::raw_sql(body)
        .execute(pool)
        .await
        .map_err(|e| Error::Transport(format!("{what}: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::EntityDef;

    fn schema(name: &str, table: &str) -> Schema {
        Schema::new(vec![EntityDef {
            name: name.into(),
            table: table.into(),
            fields: vec![],
            kinds: Vec::new(),
        }])
        .unwrap()
    }

    #[test]
    fn install_sql_quotes_tables_and_names_triggers_per_entity() {
        let sql = install_sql(&schema("Order", "public.tb_order"), "fraiseql_changes").unwrap();
        assert!(sql.starts_with("BEGIN;\n") && sql.ends_with("COMMIT;\n"));
        assert!(
            sql.contains(
                r#"CREATE TRIGGER "fraiseql_capture_Order" AFTER UPDATE ON "public"."tb_order""#
            ),
            "{sql}"
        );
        assert!(sql.contains(r#"CREATE TRIGGER "fraiseql_capture_Order_ins" AFTER INSERT ON "public"."tb_order" REFERENCING NEW TABLE AS fraiseql_inserted"#), "{sql}");
        assert!(sql.contains(r#"CREATE TRIGGER "fraiseql_capture_Order_del" AFTER DELETE ON "public"."tb_order" REFERENCING OLD TABLE AS fraiseql_deleted"#), "{sql}");
        assert!(sql.contains(
            "fraiseql_capture('Order', 'fraiseql_changes', 'skip_unchanged', 'public.tb_order')"
        ));
    }

    #[test]
    fn poll_only_capture_passes_no_channel() {
        let mut options = CaptureOptions::new("fraiseql_changes");
        options.notify = false;
        options.skip_unchanged_updates = false;
        let sql = install_sql_with(&schema("Order", "tb_order"), &options).unwrap();
        assert!(
            sql.contains("fraiseql_capture('Order', '', 'all', 'tb_order')"),
            "{sql}"
        );
    }

    #[test]
    fn hostile_names_are_rejected() {
        assert!(install_sql(&schema("Order", "tb_order; DROP TABLE x"), "c").is_err());
        assert!(install_sql(&schema("Or'der", "tb_order"), "c").is_err());
        assert!(install_sql(&schema("Order", "tb_order"), "c'); --").is_err());
        assert!(install_sql(&schema("Order", "tb_order"), "a.b").is_err());
        assert!(uninstall_sql(&schema("Order", "x\"y")).is_err());
        assert!(install_sql(&schema(&"O".repeat(60), "t"), "c").is_err());
    }
}
