//! `fraiseql backfill ENTITY`: the rows that already exist, fed through the same path as live
//! changes — so they are ordered with them — in key order and in chunks.
//!
//! Each chunk is one transaction that reads the next rows after the last key sent, `FOR
//! SHARE` (a live UPDATE of those rows waits for the chunk to commit, so it is captured after
//! the backfilled row and can never be overtaken by an older copy of it), writes each row
//! into the capture path — a transactional logical message (prefix `fraiseql.backfill`) with
//! logical capture, a change-log row with trigger capture — and records the last key in
//! `fraiseql_backfills`. A backfill killed half-way starts again after the last chunk that
//! committed when the same command runs again; one that finished says so (`restart` runs it
//! anew). Each backfilled row arrives as an INSERT event marked `backfill: {id, observers}`,
//! for the observers named (all observers of the entity's INSERTs when none are).
//!
//! With trigger capture, rows are delivered in transaction-id order like every change, so
//! "never overtaken" holds as it does for live changes there; with logical capture, in commit
//! order, exactly.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::{PgPool, Row};

use super::logical::Mode;
use super::{quote_identifier, CHANGE_LOG_TABLE};
use crate::error::{Error, Result};
use crate::schema::EntityDef;

/// The prefix of the logical messages that carry backfilled rows (logical capture).
pub const BACKFILL_PREFIX: &str = "fraiseql.backfill";

/// Where backfills record their progress.
pub const BACKFILLS_TABLE: &str = "fraiseql_backfills";

/// What to feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillOptions {
    /// A condition on the rows (SQL, as after `WHERE`), e.g. `status = 'open'`.
    pub filter: Option<String>,
    /// The observers the rows are for (empty: every observer of the entity's INSERTs).
    pub observers: Vec<String>,
    /// Rows per transaction (at least 1).
    pub chunk: usize,
    /// Start again from the first row even if this backfill ran before.
    pub restart: bool,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            filter: None,
            observers: Vec::new(),
            chunk: 1000,
            restart: false,
        }
    }
}

/// How far a backfill is.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Stable for the same entity, filter and observers: a second run resumes it.
    pub id: String,
    pub entity: String,
    /// Rows sent so far, in all runs.
    pub sent: u64,
    /// Rows that matched when this run started.
    pub total: u64,
    /// Rows already sent when this run started (0 unless it resumed).
    pub resumed_at: u64,
    pub done: bool,
    /// Rows per second in this run.
    pub rate: f64,
}

/// The table's primary key: `(quoted column, its type)` in key order.
async fn primary_key(pool: &PgPool, table: &str) -> Result<Vec<(String, String)>> {
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT quote_ident(a.attname), format_type(a.atttypid, a.atttypmod) \
         FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = $1::regclass AND i.indisprimary \
         ORDER BY array_position(i.indkey::int2[], a.attnum)",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .map_err(|e| Error::Transport(format!("reading the primary key of {table}: {e}")))?;
    if columns.is_empty() {
        return Err(Error::Schema(format!(
            "table {table} has no primary key: a backfill walks it in key order"
        )));
    }
    Ok(columns)
}

/// The backfill's id: the same entity, filter and observers give the same id.
fn backfill_id(entity: &str, options: &BackfillOptions) -> String {
    let mut observers = options.observers.clone();
    observers.sort();
    let key = format!(
        "{entity}\0{}\0{}",
        options.filter.as_deref().unwrap_or(""),
        observers.join("\0")
    );
    let digest = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}-{digest:016x}", entity.to_lowercase())
}

/// The statement that sends one chunk: `$1` the last key sent (jsonb; unused for the first
/// chunk, `after_key` false), `$2` the chunk size, `$3` the entity, `$4` the backfill marker,
/// `$5` the table as declared. Returns the rows sent and the last key.
fn chunk_sql(
    table: &str,
    key: &[(String, String)],
    filter: Option<&str>,
    mode: Mode,
    after_key: bool,
) -> String {
    let key_of = |alias: &str| {
        key.iter()
            .map(|(c, _)| format!("{alias}.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let last = key
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("($1::jsonb->>{i})::{ty}"))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = filter.map_or_else(|| "true".to_owned(), |f| format!("({f})"));
    // Two forms rather than `$1 IS NULL OR …`, so that each chunk is an index range scan.
    let after = if after_key {
        format!("({}) > ({last})", key_of("t"))
    } else {
        "$1::jsonb IS NULL".to_owned()
    };
    let send = match mode {
        Mode::Logical => format!(
            "sent AS (SELECT count(pg_logical_emit_message(true, '{BACKFILL_PREFIX}', \
             jsonb_build_object('entity', $3::text, 'backfill', $4::jsonb, 'row', c.row)::text)) AS n \
             FROM (SELECT row FROM chunk ORDER BY rn) c)"
        ),
        Mode::Trigger => format!(
            "inserted AS (INSERT INTO {CHANGE_LOG_TABLE} (entity, event, table_name, new, backfill) \
             SELECT $3::text, 'INSERT', $5::text, c.row, $4::jsonb FROM chunk c ORDER BY c.rn RETURNING 1), \
             sent AS (SELECT count(*) AS n FROM inserted)"
        ),
    };
    format!(
        "WITH locked AS (SELECT t.* FROM {table} t \
                         WHERE {after} AND {filter} \
                         ORDER BY {key_t} LIMIT $2 FOR SHARE OF t), \
              chunk AS (SELECT to_jsonb(l) AS row, jsonb_build_array({key_l}) AS key, \
                               row_number() OVER (ORDER BY {key_l}) AS rn FROM locked l), \
              {send} \
         SELECT (SELECT n FROM sent)::int8 AS sent, (SELECT key FROM chunk ORDER BY rn DESC LIMIT 1) AS last",
        key_t = key_of("t"),
        key_l = key_of("l"),
    )
}

/// Runs (or resumes) a backfill of `entity` through the capture `mode`, calling `progress`
/// after each chunk. `notify_channel`: the trigger readers' wake-up (trigger capture).
pub async fn run(
    pool: &PgPool,
    mode: Mode,
    entity: &EntityDef,
    options: &BackfillOptions,
    notify_channel: &str,
    mut progress: impl FnMut(&Progress),
) -> Result<Progress> {
    let fail = |what: &str, e: sqlx::Error| {
        Error::Transport(format!("backfill of {}: {what}: {e}", entity.name))
    };
    let table = quote_identifier(&entity.table).map_err(|msg| {
        Error::Schema(format!(
            "table of entity `{}` ({:?}): {msg}",
            entity.name, entity.table
        ))
    })?;
    if let Some(filter) = &options.filter {
        if filter.contains(';') || filter.trim().is_empty() {
            return Err(Error::Schema(format!(
                "--where must be one condition (what follows WHERE), without ';': {filter:?}"
            )));
        }
    }
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {BACKFILLS_TABLE} (
             id          text PRIMARY KEY,
             entity      text NOT NULL,
             table_name  text NOT NULL,
             filter      text,
             observers   text[] NOT NULL DEFAULT '{{}}',
             last_key    jsonb,
             rows_sent   bigint NOT NULL DEFAULT 0,
             total       bigint NOT NULL DEFAULT 0,
             started_at  timestamptz NOT NULL DEFAULT now(),
             updated_at  timestamptz NOT NULL DEFAULT now(),
             finished_at timestamptz
         )"
    ))
    .execute(pool)
    .await
    .map_err(|e| fail("creating its progress table", e))?;
    let key = primary_key(pool, &table).await?;
    let id = backfill_id(&entity.name, options);
    let total: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} t WHERE {}",
        options
            .filter
            .as_deref()
            .map_or_else(|| "true".to_owned(), |f| format!("({f})"))
    ))
    .fetch_one(pool)
    .await
    .map_err(|e| fail("counting the rows (is --where a valid condition?)", e))?;
    if options.restart {
        sqlx::query(&format!("DELETE FROM {BACKFILLS_TABLE} WHERE id = $1"))
            .bind(&id)
            .execute(pool)
            .await
            .map_err(|e| fail("restarting", e))?;
    }
    let row = sqlx::query(&format!(
        "INSERT INTO {BACKFILLS_TABLE} AS b (id, entity, table_name, filter, observers, total) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (id) DO UPDATE SET updated_at = now() \
         RETURNING b.last_key, b.rows_sent, b.finished_at IS NOT NULL AS done"
    ))
    .bind(&id)
    .bind(&entity.name)
    .bind(&entity.table)
    .bind(&options.filter)
    .bind(&options.observers)
    .bind(total)
    .fetch_one(pool)
    .await
    .map_err(|e| fail("recording it", e))?;
    let mut last: Option<Value> = row.get("last_key");
    let resumed_at = u64::try_from(row.get::<i64, _>("rows_sent")).unwrap_or(0);
    let mut state = Progress {
        id: id.clone(),
        entity: entity.name.clone(),
        sent: resumed_at,
        total: u64::try_from(total).unwrap_or(0),
        resumed_at,
        done: row.get("done"),
        rate: 0.0,
    };
    if state.done {
        progress(&state);
        return Ok(state);
    }
    let marker = json!({ "id": id, "observers": options.observers });
    let first = chunk_sql(&table, &key, options.filter.as_deref(), mode, false);
    let next = chunk_sql(&table, &key, options.filter.as_deref(), mode, true);
    let chunk = i64::try_from(options.chunk.max(1)).unwrap_or(i64::MAX);
    let started = Instant::now();
    loop {
        let mut tx = pool.begin().await.map_err(|e| fail("a chunk", e))?;
        let sql = if last.is_some() { &next } else { &first };
        let sent = sqlx::query(sql)
            .bind(&last)
            .bind(chunk)
            .bind(&entity.name)
            .bind(&marker)
            .bind(&entity.table)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| fail("a chunk", e))?;
        let n = u64::try_from(sent.get::<i64, _>("sent")).unwrap_or(0);
        if let Some(key) = sent.get::<Option<Value>, _>("last") {
            last = Some(key);
        }
        let finished = n < chunk as u64;
        sqlx::query(&format!(
            "UPDATE {BACKFILLS_TABLE} SET last_key = $2, rows_sent = rows_sent + $3, \
             updated_at = now(), finished_at = CASE WHEN $4 THEN now() END WHERE id = $1"
        ))
        .bind(&id)
        .bind(&last)
        .bind(i64::try_from(n).unwrap_or(i64::MAX))
        .bind(finished)
        .execute(&mut *tx)
        .await
        .map_err(|e| fail("recording a chunk", e))?;
        if mode == Mode::Trigger && n > 0 {
            sqlx::query("SELECT pg_notify($1, '0')")
                .bind(notify_channel)
                .execute(&mut *tx)
                .await
                .map_err(|e| fail("waking the readers", e))?;
        }
        tx.commit().await.map_err(|e| fail("a chunk", e))?;
        state.sent += n;
        state.done = finished;
        let elapsed = started.elapsed().max(Duration::from_millis(1));
        state.rate = (state.sent - resumed_at) as f64 / elapsed.as_secs_f64();
        progress(&state);
        if finished {
            return Ok(state);
        }
    }
}

/// The backfills of `entities` that `/health` shows: running ones, and those finished in
/// the last hour.
pub async fn recent(pool: &PgPool, entities: &[String]) -> Result<Value> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(BACKFILLS_TABLE)
        .fetch_one(pool)
        .await
        .map_err(|e| Error::Transport(format!("reading backfills: {e}")))?;
    if !exists {
        return Ok(json!([]));
    }
    let rows: Vec<(String, String, i64, i64, String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, entity, rows_sent, total, \
                to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
                to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
         FROM {BACKFILLS_TABLE} \
         WHERE entity = ANY($1) \
           AND (finished_at IS NULL OR finished_at > now() - interval '1 hour') \
         ORDER BY started_at"
    ))
    .bind(entities)
    .fetch_all(pool)
    .await
    .map_err(|e| Error::Transport(format!("reading backfills: {e}")))?;
    Ok(Value::Array(
        rows.into_iter()
            .map(|(id, entity, sent, total, updated, finished)| {
                json!({
                    "id": id,
                    "entity": entity,
                    "rows_sent": sent,
                    "total": total,
                    "updated_at": updated,
                    "finished_at": finished,
                })
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_stable_for_the_same_backfill() {
        let a = BackfillOptions {
            observers: vec!["b".into(), "a".into()],
            ..BackfillOptions::default()
        };
        let b = BackfillOptions {
            observers: vec!["a".into(), "b".into()],
            ..BackfillOptions::default()
        };
        assert_eq!(backfill_id("Order", &a), backfill_id("Order", &b));
        let filtered = BackfillOptions {
            filter: Some("total > 1".into()),
            ..BackfillOptions::default()
        };
        assert_ne!(backfill_id("Order", &a), backfill_id("Order", &filtered));
        assert!(backfill_id("Order", &a).starts_with("order-"));
    }

    #[test]
    fn chunks_walk_the_key_and_lock_what_they_send() {
        let key = vec![
            ("\"a\"".to_owned(), "integer".to_owned()),
            ("\"b\"".to_owned(), "text".to_owned()),
        ];
        let sql = chunk_sql("\"tb\"", &key, Some("x > 1"), Mode::Logical, true);
        assert!(
            sql.contains("(t.\"a\", t.\"b\") > (($1::jsonb->>0)::integer, ($1::jsonb->>1)::text)"),
            "{sql}"
        );
        assert!(sql.contains("FOR SHARE OF t"));
        assert!(sql.contains("AND (x > 1)"));
        assert!(sql.contains("pg_logical_emit_message(true, 'fraiseql.backfill'"));
        let sql = chunk_sql("\"tb\"", &key, None, Mode::Trigger, false);
        assert!(sql.contains("INSERT INTO fraiseql_change_log"), "{sql}");
    }
}
