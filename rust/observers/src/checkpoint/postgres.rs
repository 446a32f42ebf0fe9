//! `EffectivelyOnce` keys in a PostgreSQL table, shared by every instance using the database.
//!
//! The table is created if missing with the spec's DDL, exactly:
//! ```sql
//! CREATE TABLE billing_observer_keys (
//!     listener_id TEXT NOT NULL,
//!     event_key TEXT NOT NULL,
//!     processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
//!     PRIMARY KEY (listener_id, event_key)
//! );
//! ```
//! Recording is `INSERT … ON CONFLICT DO NOTHING`: of two concurrent recorders of one key,
//! exactly one inserts the row (the primary key decides), on any instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::OnceCell;

use super::IdempotencyStore;
use super::IdempotencyStores;
use crate::capture::quote_identifier;
use crate::error::{CheckpointErrorKind, Error, OpError, Result};

use super::ClaimStamp;

/// One idempotency table.
#[derive(Debug)]
pub struct PgIdempotencyStore {
    pool: PgPool,
    /// As given (for messages and the advisory lock key).
    table: String,
    create_sql: String,
    insert_sql: String,
    claim_sql: String,
    select_sql: String,
    delete_sql: String,
    prune_sql: String,
    /// Set once the table is known to exist.
    created: OnceCell<()>,
}

impl PgIdempotencyStore {
    /// Validates `table` (a SQL identifier, optionally `schema.table`) and creates the table if
    /// it does not exist.
    pub async fn new(pool: PgPool, table: &str) -> Result<Self> {
        let store = Self::lazy(pool, table)?;
        store.ensure_table().await?;
        Ok(store)
    }

    /// Validates `table` without touching the database; the table is created on first use.
    pub fn lazy(pool: PgPool, table: &str) -> Result<Self> {
        let quoted = quote_identifier(table).map_err(|e| {
            Error::checkpoint(
                CheckpointErrorKind::Rejected,
                format!("idempotency_table {table:?}: {e}"),
            )
        })?;
        Ok(PgIdempotencyStore {
            pool,
            table: table.to_owned(),
            create_sql: format!(
                "CREATE TABLE IF NOT EXISTS {quoted} (\n\
                 listener_id TEXT NOT NULL,\n\
                 event_key TEXT NOT NULL,\n\
                 processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n\
                 PRIMARY KEY (listener_id, event_key)\n\
                 )"
            ),
            insert_sql: format!(
                "INSERT INTO {quoted} (listener_id, event_key) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            // One statement: the key inserted now, or found carrying this claim's stamp (an
            // earlier try of it committed, and its answer was lost).
            claim_sql: format!(
                "WITH inserted AS (INSERT INTO {quoted} (listener_id, event_key, processed_at) \
                 VALUES ($1, $2, timestamptz 'epoch' + $3 * interval '1 microsecond') \
                 ON CONFLICT DO NOTHING RETURNING 1) \
                 SELECT EXISTS (SELECT 1 FROM inserted) OR EXISTS (SELECT 1 FROM {quoted} \
                 WHERE listener_id = $1 AND event_key = $2 \
                 AND processed_at = timestamptz 'epoch' + $3 * interval '1 microsecond')"
            ),
            select_sql: format!(
                "SELECT EXISTS (SELECT 1 FROM {quoted} WHERE listener_id = $1 AND event_key = $2)"
            ),
            delete_sql: format!("DELETE FROM {quoted} WHERE listener_id = $1 AND event_key = $2"),
            // Batches keep each transaction (and its locks) short on a big table.
            prune_sql: format!(
                "DELETE FROM {quoted} WHERE ctid IN (SELECT ctid FROM {quoted} \
                 WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2)"
            ),
            created: OnceCell::new(),
        })
    }

    /// The table name as configured.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table if missing (once per store). Concurrent creators — other stores,
    /// other processes — are serialised by a transaction-level advisory lock, because two
    /// simultaneous `CREATE TABLE IF NOT EXISTS` of one name can fail on the catalog's
    /// unique index.
    pub async fn ensure_table(&self) -> Result<()> {
        self.created
            .get_or_try_init(|| async {
                let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
                sqlx::query(
                    "SELECT pg_advisory_xact_lock(hashtext('fraiseql.idempotency'), hashtext($1))",
                )
                .bind(&self.table)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
                sqlx::query(&self.create_sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
                tx.commit().await.map_err(|e| self.error(e))?;
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Deletes keys recorded more than `older_than` ago, `batch` rows per statement; returns
    /// how many were deleted. A key pruned while its event could still be redelivered
    /// would let that event run again, so keep `older_than` above the longest redelivery
    /// horizon (stream retention, DLQ age).
    pub async fn prune(&self, older_than: std::time::Duration, batch: usize) -> Result<u64> {
        self.ensure_table().await?;
        let mut deleted = 0;
        loop {
            let n = sqlx::query(&self.prune_sql)
                .bind(older_than.as_secs_f64())
                .bind(batch.max(1) as i64)
                .execute(&self.pool)
                .await
                .map_err(|e| self.error(e))?
                .rows_affected();
            deleted += n;
            if n < batch.max(1) as u64 {
                return Ok(deleted);
            }
        }
    }

    fn error(&self, e: sqlx::Error) -> Error {
        Error::checkpoint(
            kind_of(&e),
            format!("idempotency table `{}`: {e}", self.table),
        )
    }
}

#[async_trait]
impl IdempotencyStore for PgIdempotencyStore {
    async fn is_duplicate(&self, listener_id: &str, key: &str) -> Result<bool> {
        self.ensure_table().await?;
        sqlx::query_scalar::<_, bool>(&self.select_sql)
            .bind(listener_id)
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn record_idempotency_key(&self, listener_id: &str, key: &str) -> Result<bool> {
        self.ensure_table().await?;
        let done = sqlx::query(&self.insert_sql)
            .bind(listener_id)
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim(&self, listener_id: &str, key: &str, stamp: ClaimStamp) -> Result<bool> {
        self.ensure_table().await?;
        sqlx::query_scalar::<_, bool>(&self.claim_sql)
            .bind(listener_id)
            .bind(key)
            .bind(stamp.0)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn forget(&self, listener_id: &str, key: &str) -> Result<()> {
        self.ensure_table().await?;
        sqlx::query(&self.delete_sql)
            .bind(listener_id)
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

/// A data exception (SQLSTATE class 22: a NUL character, a byte sequence invalid in the
/// database's encoding…) is about the key itself: the same key fails the same way every time, so it is
/// not retried. Anything else (a connection, a restart, a lock) may pass on another attempt.
fn kind_of(e: &sqlx::Error) -> CheckpointErrorKind {
    match e {
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
            CheckpointErrorKind::Rejected
        }
        _ => CheckpointErrorKind::Unavailable,
    }
}

/// A store whose table name was invalid: every call fails (the engine dead-letters the event
/// rather than running an unguarded action).
struct InvalidStore(OpError<CheckpointErrorKind>);

impl InvalidStore {
    fn error(&self) -> Error {
        Error::Checkpoint(self.0.clone())
    }
}

#[async_trait]
impl IdempotencyStore for InvalidStore {
    async fn is_duplicate(&self, _: &str, _: &str) -> Result<bool> {
        Err(self.error())
    }
    async fn record_idempotency_key(&self, _: &str, _: &str) -> Result<bool> {
        Err(self.error())
    }
    async fn forget(&self, _: &str, _: &str) -> Result<()> {
        Err(self.error())
    }
}

/// One [`PgIdempotencyStore`] per idempotency table, shared by the observers that name it.
///
/// [`IdempotencyStores::store_for`] is synchronous (the engine is built outside any query), so
/// stores are created lazily: the table is created on first use. Call [`prepare`] at startup
/// to create the tables up front and surface a bad name or a missing privilege before the
/// first event instead of as dead-lettered events.
///
/// [`prepare`]: PgIdempotencyStores::prepare
pub struct PgIdempotencyStores {
    pool: PgPool,
    stores: Mutex<HashMap<String, Arc<PgIdempotencyStore>>>,
}

impl PgIdempotencyStores {
    pub fn new(pool: PgPool) -> Self {
        PgIdempotencyStores {
            pool,
            stores: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, table: &str) -> Result<Arc<PgIdempotencyStore>> {
        let mut stores = self.stores.lock().expect("stores lock");
        if let Some(s) = stores.get(table) {
            return Ok(s.clone());
        }
        let store = Arc::new(PgIdempotencyStore::lazy(self.pool.clone(), table)?);
        stores.insert(table.to_owned(), store.clone());
        Ok(store)
    }

    /// Validates and creates the given tables now.
    pub async fn prepare<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> Result<()> {
        for table in tables {
            self.get(table)?.ensure_table().await?;
        }
        Ok(())
    }
}

impl IdempotencyStores for PgIdempotencyStores {
    fn store_for(&self, table: &str) -> Arc<dyn IdempotencyStore> {
        match self.get(table) {
            Ok(store) => store,
            Err(Error::Checkpoint(e)) => Arc::new(InvalidStore(e)),
            Err(e) => Arc::new(InvalidStore(OpError::new(
                CheckpointErrorKind::Rejected,
                e.to_string(),
            ))),
        }
    }
}
