//! The delivery ledger of the PostgreSQL sources (the change log and the WAL): what they
//! cannot count themselves, kept in the database so that it outlives the process.
//!
//! A NATS or Redis message comes back with its delivery count; a change read again from the
//! change log or the slot does not. Without a count, a change whose processing kills the
//! process (a Python handler calling `os._exit`, a crash in a C extension) is read again on
//! every start and kills it again, for ever. So:
//!
//! - Before handing a batch to the loop, the source records the changes that may be under
//!   way once it is handed ([`Ledger::handed`], one row per source): from the start of the
//!   batch before it (the loop reads one batch ahead, so everything older is finished) to
//!   the end of this one. It is written for the first batch of a run and then at most every
//!   [`RECORD_EVERY`]: one write per batch cost a round trip of latency on every change
//!   of a lightly loaded source. A change handed after the last write that kills the run
//!   therefore costs one more death: the next run records its first batch, which holds it.
//! - A clean end of the loop clears the source's rows ([`Ledger::clear`]); a run that ended
//!   otherwise (killed, crashed, left work running at shutdown) leaves them.
//! - On the next start the source reads that range ([`Ledger::handed_before`]): every
//!   change in it may have been the one that killed the run, so each is *suspect*. The
//!   loop runs a suspect change alone, and counts it here first ([`Ledger::count`]); the
//!   change that kills the process is the one counted, and past
//!   [`SUSPECT_MAX_DELIVER`](crate::transport::delivery::SUSPECT_MAX_DELIVER) deliveries it is dead-lettered without
//!   running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;

use crate::error::{Error, Result};

/// How often, at most, the range handed out is written after a run's first batch.
pub const RECORD_EVERY: Duration = Duration::from_secs(1);

/// The ledger's table: the source's range handed out under `event_id = ''`, one row per
/// suspect change counted.
pub const LEDGER_TABLE: &str = "fraiseql_deliveries";

const CREATE_SQL: &str = "CREATE TABLE IF NOT EXISTS fraiseql_deliveries (
    source text NOT NULL,
    event_id text NOT NULL,
    handed_from text,
    handed_to text,
    deliveries integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
)";

/// Two simultaneous `CREATE TABLE IF NOT EXISTS` of one name can fail on the catalog's unique
/// index: creators take this lock first.
const LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtext('fraiseql.ledger'), hashtext('fraiseql_deliveries'))";

/// One source's rows of the ledger.
pub struct Ledger {
    pool: PgPool,
    source: String,
    /// This run wrote a position: its clean end clears it. A reader that never handed
    /// anything (a standby) leaves the active reader's rows alone.
    wrote: AtomicBool,
    /// When the range was written last.
    written_at: Mutex<Option<Instant>>,
}

impl Ledger {
    /// The ledger of `source` (`postgres:<listener>`, `postgres:<reader>` for the WAL), its
    /// table created if missing.
    pub async fn open(pool: PgPool, source: String) -> Result<Ledger> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(LEDGER_TABLE)
            .fetch_one(&pool)
            .await
            .map_err(|e| ledger_error("reading the catalog", &e))?;
        if !exists {
            let mut tx = pool
                .begin()
                .await
                .map_err(|e| ledger_error("creating its table", &e))?;
            for sql in [LOCK_SQL, CREATE_SQL] {
                sqlx::query(sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| ledger_error("creating its table", &e))?;
            }
            tx.commit()
                .await
                .map_err(|e| ledger_error("creating its table", &e))?;
        }
        Ok(Ledger {
            pool,
            source,
            wrote: AtomicBool::new(false),
            written_at: Mutex::new(None),
        })
    }

    /// The changes that may have been under way when a run that did not end cleanly
    /// stopped, `(from, to)` as the source wrote them, if one did.
    pub async fn handed_before(&self) -> Result<Option<(String, String)>> {
        sqlx::query_as::<_, (Option<String>, Option<String>)>(&format!(
            "SELECT handed_from, handed_to FROM {LEDGER_TABLE} WHERE source = $1 AND event_id = ''"
        ))
        .bind(&self.source)
        .fetch_optional(&self.pool)
        .await
        .map(|row| match row {
            Some((Some(from), Some(to))) => Some((from, to)),
            _ => None,
        })
        .map_err(|e| ledger_error("reading the range handed out", &e))
    }

    /// The changes from `from` to `to` may be under way once the batch being handed is:
    /// recorded before it is, unless the range was written less than [`RECORD_EVERY`] ago.
    pub async fn handed(&self, from: &str, to: &str) -> Result<()> {
        let now = Instant::now();
        {
            let mut written_at = self.written_at.lock().expect("ledger lock");
            if written_at.is_some_and(|at| now.duration_since(at) < RECORD_EVERY) {
                return Ok(());
            }
            *written_at = Some(now);
        }
        self.wrote.store(true, Ordering::Relaxed);
        sqlx::query(&format!(
            "INSERT INTO {LEDGER_TABLE} (source, event_id, handed_from, handed_to) \
             VALUES ($1, '', $2, $3) \
             ON CONFLICT (source, event_id) DO UPDATE \
             SET handed_from = EXCLUDED.handed_from, handed_to = EXCLUDED.handed_to, \
                 updated_at = now()"
        ))
        .bind(&self.source)
        .bind(from)
        .bind(to)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(|e| {
            // Not written: the next batch must try again.
            *self.written_at.lock().expect("ledger lock") = None;
            ledger_error("recording the range handed out", &e)
        })
    }

    /// One more delivery of the suspect change `event_id`: how many it has had in runs that
    /// were counted, this one included.
    pub async fn count(&self, event_id: &str) -> Result<u64> {
        let n: i32 = sqlx::query_scalar(&format!(
            "INSERT INTO {LEDGER_TABLE} AS l (source, event_id, deliveries) VALUES ($1, $2, 1) \
             ON CONFLICT (source, event_id) DO UPDATE \
             SET deliveries = l.deliveries + 1, updated_at = now() \
             RETURNING deliveries"
        ))
        .bind(&self.source)
        .bind(event_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| ledger_error("counting a delivery", &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The suspect change `event_id` was settled: its count goes, so that a later stop of
    /// a run that reads it again does not count against it.
    pub async fn finished(&self, event_id: &str) {
        let removed = sqlx::query(&format!(
            "DELETE FROM {LEDGER_TABLE} WHERE source = $1 AND event_id = $2"
        ))
        .bind(&self.source)
        .bind(event_id)
        .execute(&self.pool)
        .await;
        if let Err(e) = removed {
            tracing::warn!(
                "{}: delivery ledger: cannot remove {event_id}: {e}",
                self.source
            );
        }
    }

    /// The run ended with nothing under way: nothing it handed is suspect.
    pub async fn clear(&self) {
        if !self.wrote.load(Ordering::Relaxed) {
            return;
        }
        let cleared = sqlx::query(&format!("DELETE FROM {LEDGER_TABLE} WHERE source = $1"))
            .bind(&self.source)
            .execute(&self.pool)
            .await;
        if let Err(e) = cleared {
            // The next start then runs the last changes handed one at a time: slower, no
            // harm.
            tracing::warn!("{}: cannot clear the delivery ledger: {e}", self.source);
        }
    }
}

fn ledger_error(doing: &str, e: &sqlx::Error) -> Error {
    Error::Transport(format!("delivery ledger ({LEDGER_TABLE}): {doing}: {e}"))
}
