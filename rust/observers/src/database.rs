//! The PostgreSQL connection of a process: the one pool, and what a failure to use it means.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::error::{ConnectErrorKind, Error, Result};
use crate::redact::redact_url;

/// How long the first connection of a pool may take.
const FIRST_CONNECT: Duration = Duration::from_secs(10);

/// A PostgreSQL failure to connect or to answer, with its kind: bad credentials and TLS
/// problems are told apart from a server that does not answer. `shown` names the server
/// without credentials.
pub fn postgres_error(shown: &str, e: &sqlx::Error) -> Error {
    let kind = match e {
        sqlx::Error::Configuration(_) => ConnectErrorKind::InvalidSettings,
        sqlx::Error::Tls(_) => ConnectErrorKind::Tls,
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // invalid_authorization_specification, invalid_password
            Some("28000" | "28P01") => ConnectErrorKind::Authentication,
            // insufficient_privilege
            Some("42501") => ConnectErrorKind::Permission,
            // invalid_catalog_name: no such database
            Some("3D000") => ConnectErrorKind::InvalidSettings,
            _ => ConnectErrorKind::Unreachable,
        },
        _ => ConnectErrorKind::Unreachable,
    };
    Error::connect(
        kind,
        format!("cannot connect to PostgreSQL at {shown}: {e}"),
    )
}

/// The one pool of a process: the dead-letter queue, the idempotency stores (on the hot path
/// of every EffectivelyOnce event), change capture. Sources take dedicated connections of
/// their own from its options.
///
/// The sessions ask for no NOTICEs (`client_min_messages = warning`): the engine's idempotent
/// DDL (`… IF NOT EXISTS`) would otherwise log "already exists, skipping" at every start.
///
/// One connection is made first, with [`FIRST_CONNECT`] to answer: a server that refuses or
/// does not answer is reported at once, with its address, rather than after the pool's wait.
pub async fn connect_pool(url: &str, max_concurrency: usize) -> Result<PgPool> {
    let shown = redact_url(url);
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| postgres_error(&shown, &e))?
        .options([("client_min_messages", "warning")]);
    tracing::debug!("[observers] connecting to PostgreSQL at {shown}");
    match tokio::time::timeout(FIRST_CONNECT, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
        }
        Ok(Err(e)) => return Err(postgres_error(&shown, &e)),
        Err(_) => {
            return Err(Error::connect(
                ConnectErrorKind::Unreachable,
                format!(
                    "cannot connect to PostgreSQL at {shown}: no answer within {} s",
                    FIRST_CONNECT.as_secs()
                ),
            ))
        }
    }
    PgPoolOptions::new()
        .max_connections(max_concurrency.clamp(4, 16) as u32)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .map_err(|e| postgres_error(&shown, &e))
}
