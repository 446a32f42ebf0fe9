//! [`PgDeadLetterQueue`]: the dead-letter queue in a PostgreSQL table.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};

use super::{DeadLetterQueue, DlqEntry, DlqOrigin, PushOutcome, RetryFailure};
use crate::error::{DeadLetterErrorKind, Error, Result};
use crate::event::Event;

const CREATE_SQL: &str = "CREATE TABLE IF NOT EXISTS fraiseql_dead_letters (
    id              bigserial PRIMARY KEY,
    event_id        text NOT NULL,
    observer        text NOT NULL,
    action_index    int NOT NULL,
    action          text NOT NULL,
    event           jsonb,
    error           text NOT NULL,
    attempts        int NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    origin          text NOT NULL DEFAULT 'observer',
    payload         bytea,
    raw             bytea
)";

/// Brings a table created by an earlier version up to date: the columns `origin`, `payload`
/// and `raw`, and `event` no longer required. Rows written before hold their event in
/// `event` (jsonb) and their origin in their names: undecodable input under action `decode`
/// (`redis decode` for Redis), a forwarder's change under `<name>:<Entity>:<event>`.
const MIGRATE_SQL: [&str; 6] = [
    "ALTER TABLE fraiseql_dead_letters ADD COLUMN IF NOT EXISTS origin text NOT NULL DEFAULT 'observer'",
    "ALTER TABLE fraiseql_dead_letters ADD COLUMN IF NOT EXISTS payload bytea",
    "ALTER TABLE fraiseql_dead_letters ADD COLUMN IF NOT EXISTS raw bytea",
    "ALTER TABLE fraiseql_dead_letters ALTER COLUMN event DROP NOT NULL",
    "UPDATE fraiseql_dead_letters SET origin = 'undecodable' \
     WHERE payload IS NULL AND origin = 'observer' AND action IN ('decode', 'redis decode')",
    "UPDATE fraiseql_dead_letters SET origin = 'forwarder' \
     WHERE payload IS NULL AND origin = 'observer' AND action IN ('nats_publish', 'redis_xadd')",
];
const CREATE_INDEX_SQL: &str = "CREATE INDEX IF NOT EXISTS fraiseql_dead_letters_created_at_idx \
     ON fraiseql_dead_letters (created_at, id)";

/// Serialises table creation and bounded pushes across processes.
const LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtext('fraiseql.dlq'), hashtext('fraiseql_dead_letters'))";

const COLUMNS: &str = "event_id, observer, action_index, action, origin, payload, raw, error, \
     attempts, first_failed_at, last_failed_at";

const VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10::timestamptz, $11::timestamptz";

/// Selected columns, timestamps rendered as RFC 3339 UTC with microseconds; the event of a
/// row written by an earlier version comes from its jsonb column.
const SELECT_COLUMNS: &str = "id, observer, action_index, action, origin, \
     COALESCE(payload, convert_to(event::text, 'UTF8')) AS payload, raw, error, attempts, \
     to_char(first_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS first_failed_at, \
     to_char(last_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS last_failed_at";

/// The dead-letter queue in a PostgreSQL table, shared by every instance using the database
/// and surviving restarts.
///
/// The table is created if missing:
/// ```sql
/// CREATE TABLE fraiseql_dead_letters (
///     id              bigserial PRIMARY KEY,
///     event_id        text NOT NULL,
///     observer        text NOT NULL,
///     action_index    int NOT NULL,
///     action          text NOT NULL,
///     event           jsonb,                 -- rows of earlier versions only
///     error           text NOT NULL,
///     attempts        int NOT NULL,
///     first_failed_at timestamptz NOT NULL,
///     last_failed_at  timestamptz NOT NULL,
///     created_at      timestamptz NOT NULL DEFAULT now(),
///     origin          text NOT NULL DEFAULT 'observer',
///     payload         bytea,                 -- the event as JSON bytes
///     raw             bytea                  -- undecodable input as it arrived
/// );
/// CREATE INDEX fraiseql_dead_letters_created_at_idx ON fraiseql_dead_letters (created_at, id);
/// ```
/// Semantics are those of [`MemoryDlq`](super::MemoryDlq): ids are assigned on push and
/// increase, [`list`](DeadLetterQueue::list) is oldest (lowest id) first — served by the
/// primary key; the `(created_at, id)` index serves inspection by age — and when the queue
/// holds `max_size` entries the *incoming* entry is dropped ([`PushOutcome::Overflow`]).
///
/// # The cap under concurrency
///
/// A bounded push is one short transaction, READ COMMITTED (set explicitly):
/// ```sql
/// SELECT pg_advisory_xact_lock(hashtext('fraiseql.dlq'), hashtext('fraiseql_dead_letters'));
/// INSERT INTO fraiseql_dead_letters (…) SELECT … WHERE (SELECT count(*) FROM …) < $max
/// RETURNING id;
/// ```
/// The advisory lock serialises bounded pushes of every process on the database, and because
/// under READ COMMITTED each statement takes a new snapshot, the `INSERT` (started after the
/// lock was granted) sees every row committed by the previous holder, which commits before
/// releasing it. The conditional `INSERT … SELECT` alone would not be enough: two concurrent
/// statements could both count `max - 1` and both insert. Removals need no lock (they only
/// lower the count). An unbounded queue (`max_size = None`) inserts without locking.
/// Each bounded push counts the queue (at most `max_size` rows), which is cheap for a failure
/// path capped at a size meant for manual inspection.
///
/// # Stored forms
///
/// - `payload` (`bytea`) holds the serialised [`Event`] as JSON bytes, exactly as written: any
///   content survives, a string containing `\u0000` included (which `jsonb` cannot hold), and
///   it reads back equal. For SQL inspection, `convert_from(payload, 'UTF8')::jsonb` works for
///   every entry whose strings hold no NUL. `raw` (`bytea`) keeps the bytes of undecodable
///   input as they arrived; `origin` says what put the entry there (`observer`, `forwarder`,
///   `undecodable`). The `event` (`jsonb`) column is read only for rows of earlier versions.
/// - `first_failed_at` / `last_failed_at` must be RFC 3339; they are stored as `timestamptz`
///   and read back as UTC with microseconds (`2024-05-01T12:00:00.123456Z`, the form the
///   engine writes, which therefore round-trips unchanged). Anything else is an error.
/// - NUL characters, which PostgreSQL text cannot hold, are replaced by U+FFFD in the text
///   columns (`event_id`, `observer`, `action`, `error`), so such an entry is kept rather
///   than lost; the event in `payload` keeps them.
///
/// The table name is resolved through the connection's `search_path`.
#[derive(Debug, Clone)]
pub struct PgDeadLetterQueue {
    pool: PgPool,
    max_size: Option<usize>,
    insert_sql: String,
    bounded_insert_sql: String,
    list_sql: String,
    search_sql: String,
    get_sql: String,
}

impl PgDeadLetterQueue {
    /// The table the entries live in.
    pub const TABLE: &'static str = "fraiseql_dead_letters";

    /// Creates the table and its index if missing. `max_size`: `None` is unbounded; at the
    /// cap, pushes return [`PushOutcome::Overflow`] and store nothing.
    pub async fn new(pool: PgPool, max_size: Option<usize>) -> Result<Self> {
        let dlq = PgDeadLetterQueue {
            pool,
            max_size,
            insert_sql: format!(
                "INSERT INTO fraiseql_dead_letters ({COLUMNS}) VALUES ({VALUES}) RETURNING id"
            ),
            bounded_insert_sql: format!(
                "INSERT INTO fraiseql_dead_letters ({COLUMNS}) SELECT {VALUES} \
                 WHERE (SELECT count(*) FROM fraiseql_dead_letters) < $12 RETURNING id"
            ),
            list_sql: format!(
                "SELECT {SELECT_COLUMNS} FROM fraiseql_dead_letters ORDER BY id LIMIT $1"
            ),
            // A scan: the queue is capped at a size meant for inspection, and `strpos` needs
            // no escaping of `%` and `_` as LIKE would.
            search_sql: format!(
                "SELECT {SELECT_COLUMNS} FROM fraiseql_dead_letters WHERE $1 = '' OR \
                 strpos(lower(concat_ws(' ', observer, action, error, event_id, \
                 COALESCE(convert_from(payload, 'UTF8'), event::text))), lower($1)) > 0 \
                 ORDER BY id DESC LIMIT $2"
            ),
            get_sql: format!("SELECT {SELECT_COLUMNS} FROM fraiseql_dead_letters WHERE id = $1"),
        };
        dlq.ensure_table().await?;
        Ok(dlq)
    }

    /// The cap given to [`new`](Self::new).
    pub fn max_size(&self) -> Option<usize> {
        self.max_size
    }

    /// Two simultaneous `CREATE TABLE IF NOT EXISTS` of one name can fail on the catalog's
    /// unique index, so creators (other queues, other processes) take the advisory lock.
    async fn ensure_table(&self) -> Result<()> {
        // Up to date already (the common case, and every read-only `fraiseql dlq` command):
        // no DDL.
        let current: bool = sqlx::query_scalar(
            "SELECT COALESCE((SELECT NOT a.attnotnull FROM pg_attribute a \
                              WHERE a.attrelid = to_regclass('fraiseql_dead_letters') \
                                AND a.attname = 'event' AND NOT a.attisdropped), false) \
                AND EXISTS (SELECT 1 FROM pg_attribute a \
                            WHERE a.attrelid = to_regclass('fraiseql_dead_letters') \
                              AND a.attname = 'raw' AND NOT a.attisdropped) \
                AND to_regclass('fraiseql_dead_letters_created_at_idx') IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        if current {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        for sql in [LOCK_SQL, CREATE_SQL, CREATE_INDEX_SQL]
            .into_iter()
            .chain(MIGRATE_SQL)
        {
            sqlx::query(sql).execute(&mut *tx).await.map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)
    }

    fn bind_entry<'q>(
        sql: &'q str,
        entry: &'q DlqEntry,
        row: &'q Prepared,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql)
            .bind(&row.event_id)
            .bind(&row.observer)
            .bind(row.action_index)
            .bind(&row.action)
            .bind(entry.origin.as_str())
            .bind(&row.payload)
            .bind(entry.raw.as_deref())
            .bind(&row.error)
            .bind(row.attempts)
            .bind(&row.first_failed_at)
            .bind(&row.last_failed_at)
    }
}

/// The converted column values of an entry about to be inserted.
struct Prepared {
    event_id: String,
    observer: String,
    payload: Vec<u8>,
    action_index: i32,
    action: String,
    error: String,
    attempts: i32,
    first_failed_at: String,
    last_failed_at: String,
}

impl Prepared {
    fn new(entry: &DlqEntry) -> Result<Self> {
        Ok(Prepared {
            event_id: without_nul(&entry.event.id),
            observer: without_nul(&entry.observer),
            payload: serde_json::to_vec(&entry.event).map_err(|e| {
                Error::dead_letter(
                    DeadLetterErrorKind::Storage,
                    format!("cannot encode event {}: {e}", entry.event.id),
                )
            })?,
            action_index: i32::try_from(entry.action_index).map_err(|_| {
                Error::dead_letter(
                    DeadLetterErrorKind::Storage,
                    format!("action_index {} out of range", entry.action_index),
                )
            })?,
            action: without_nul(&entry.action),
            error: without_nul(&entry.error),
            attempts: i32::try_from(entry.attempts).map_err(|_| {
                Error::dead_letter(
                    DeadLetterErrorKind::Storage,
                    format!("attempts {} out of range", entry.attempts),
                )
            })?,
            first_failed_at: normalise_timestamp("first_failed_at", &entry.first_failed_at)?,
            last_failed_at: normalise_timestamp("last_failed_at", &entry.last_failed_at)?,
        })
    }
}

fn without_nul(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// RFC 3339 → UTC with microseconds, the form read back.
fn normalise_timestamp(field: &str, value: &str) -> Result<String> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        })
        .map_err(|e| {
            Error::dead_letter(
                DeadLetterErrorKind::Storage,
                format!("{field} {value:?} is not RFC 3339: {e}"),
            )
        })
}

fn db_error(e: sqlx::Error) -> Error {
    Error::dead_letter(
        DeadLetterErrorKind::Storage,
        format!("table `fraiseql_dead_letters`: {e}"),
    )
}

fn stored_id(id: i64) -> Result<u64> {
    u64::try_from(id).map_err(|_| {
        Error::dead_letter(
            DeadLetterErrorKind::Storage,
            format!("negative entry id {id}"),
        )
    })
}

fn entry_from_row(row: &PgRow) -> Result<DlqEntry> {
    let action_index: i32 = row.try_get("action_index").map_err(db_error)?;
    let attempts: i32 = row.try_get("attempts").map_err(db_error)?;
    let payload: Vec<u8> = row.try_get("payload").map_err(db_error)?;
    let event: Event = serde_json::from_slice(&payload).map_err(|e| {
        Error::dead_letter(
            DeadLetterErrorKind::Storage,
            format!("table `fraiseql_dead_letters`: a stored event does not decode: {e}"),
        )
    })?;
    let origin: String = row.try_get("origin").map_err(db_error)?;
    Ok(DlqEntry {
        id: stored_id(row.try_get("id").map_err(db_error)?)?,
        origin: DlqOrigin::parse(&origin).unwrap_or_default(),
        raw: row.try_get("raw").map_err(db_error)?,
        event,
        observer: row.try_get("observer").map_err(db_error)?,
        action_index: usize::try_from(action_index).map_err(|_| {
            Error::dead_letter(
                DeadLetterErrorKind::Storage,
                format!("stored action_index {action_index} is negative"),
            )
        })?,
        action: row.try_get("action").map_err(db_error)?,
        error: row.try_get("error").map_err(db_error)?,
        attempts: u32::try_from(attempts).map_err(|_| {
            Error::dead_letter(
                DeadLetterErrorKind::Storage,
                format!("stored attempts {attempts} is negative"),
            )
        })?,
        first_failed_at: row.try_get("first_failed_at").map_err(db_error)?,
        last_failed_at: row.try_get("last_failed_at").map_err(db_error)?,
    })
}

#[async_trait]
impl DeadLetterQueue for PgDeadLetterQueue {
    async fn push(&self, entry: DlqEntry) -> Result<PushOutcome> {
        let row = Prepared::new(&entry)?;
        let Some(max) = self.max_size else {
            let id: i64 = Self::bind_entry(&self.insert_sql, &entry, &row)
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?
                .try_get(0)
                .map_err(db_error)?;
            return Ok(PushOutcome::Stored(stored_id(id)?));
        };
        if max == 0 {
            return Ok(PushOutcome::Overflow);
        }
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // First statement of the transaction; the count below needs its own fresh snapshot.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(LOCK_SQL)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let inserted = Self::bind_entry(&self.bounded_insert_sql, &entry, &row)
            .bind(max)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        let outcome = match inserted {
            Some(r) => PushOutcome::Stored(stored_id(r.try_get(0).map_err(db_error)?)?),
            None => PushOutcome::Overflow,
        };
        tx.commit().await.map_err(db_error)?;
        Ok(outcome)
    }

    async fn list(&self, limit: usize) -> Result<Vec<DlqEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        sqlx::query(&self.list_sql)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn search(&self, text: &str, limit: usize) -> Result<Vec<DlqEntry>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // PostgreSQL text cannot hold NUL; the text columns hold U+FFFD in its place.
        let text = text.replace('\0', "\u{FFFD}");
        sqlx::query(&self.search_sql)
            .bind(text)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn get(&self, id: u64) -> Result<Option<DlqEntry>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        sqlx::query(&self.get_sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    async fn record_failure(&self, id: u64, failure: &RetryFailure) -> Result<bool> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let attempts = i32::try_from(failure.attempts).unwrap_or(i32::MAX);
        let done = sqlx::query(
            "UPDATE fraiseql_dead_letters SET error = $2, attempts = $3, \
             last_failed_at = $4::timestamptz WHERE id = $1",
        )
        .bind(id)
        .bind(without_nul(&failure.error))
        .bind(attempts)
        .bind(&failure.last_failed_at)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove(&self, id: u64) -> Result<bool> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let done = sqlx::query("DELETE FROM fraiseql_dead_letters WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_many(&self, ids: &[u64]) -> Result<usize> {
        let ids: Vec<i64> = ids
            .iter()
            .filter_map(|&id| i64::try_from(id).ok())
            .collect();
        let done = sqlx::query("DELETE FROM fraiseql_dead_letters WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }

    async fn purge(&self) -> Result<usize> {
        let done = sqlx::query("DELETE FROM fraiseql_dead_letters")
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
    }

    async fn len(&self) -> Result<usize> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM fraiseql_dead_letters")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
}
