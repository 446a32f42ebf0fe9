//! The capture guard: every `poll_interval`, checks that each captured table is still
//! captured — its three triggers (trigger capture), or its membership of the publication with
//! `REPLICA IDENTITY FULL` (logical capture). A table dropped and created again without the
//! event trigger ([`super::ddl`]), or taken out of the publication, is repaired at once (with
//! `auto_install`), and the log and `/health` (`capture_gaps`) say which changes may have
//! been missed: those of that table since the guard last saw it captured. A table that does
//! not exist is reported the same way until it is back.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::watch;

use super::logical::{self, Mode};
use super::{quote_identifier, CaptureOptions, TRIGGER_PREFIX};
use crate::error::{Error, Result};
use crate::event::now_rfc3339;
use crate::schema::{EntityDef, Schema};

/// Gaps kept for `/health`, newest last.
const GAPS_SHOWN: usize = 20;

/// How a table is captured, as the guard checks and repairs it.
#[derive(Debug, Clone)]
pub enum Capture {
    Trigger(CaptureOptions),
    Logical { publication: String },
}

/// What `/health` shows of the guard.
#[derive(Default)]
pub struct GuardHealth {
    gaps: Mutex<VecDeque<Value>>,
    backfills: Mutex<Value>,
}

impl GuardHealth {
    /// Backfills running, and those finished in the last hour.
    pub fn backfills(&self) -> Value {
        match &*self.backfills.lock().expect("backfills lock") {
            Value::Null => Value::Array(Vec::new()),
            v => v.clone(),
        }
    }

    /// The gaps found, newest last.
    pub fn gaps(&self) -> Value {
        Value::Array(
            self.gaps
                .lock()
                .expect("gaps lock")
                .iter()
                .cloned()
                .collect(),
        )
    }

    fn record(&self, gap: Value) {
        let mut gaps = self.gaps.lock().expect("gaps lock");
        if gaps.len() == GAPS_SHOWN {
            gaps.pop_front();
        }
        gaps.push_back(gap);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Captured,
    Uncaptured,
    Missing,
}

struct Guarded {
    entity: EntityDef,
    quoted: String,
    state: State,
    /// When the guard last saw it captured (RFC 3339), if it ever did.
    captured_at: Option<String>,
}

/// Checks and repairs; see the module documentation.
pub struct Guard {
    pool: PgPool,
    capture: Capture,
    repair: bool,
    every: Duration,
    tables: Vec<Guarded>,
    health: Arc<GuardHealth>,
}

impl Guard {
    /// A guard over `schema`'s tables. `repair`: re-install capture where it is missing
    /// (`auto_install`); otherwise only report.
    pub fn new(
        pool: PgPool,
        schema: &Schema,
        capture: Capture,
        repair: bool,
        every: Duration,
    ) -> Result<Guard> {
        let tables = schema
            .entities()
            .iter()
            .map(|e| {
                let quoted = quote_identifier(&e.table).map_err(|msg| {
                    Error::Schema(format!(
                        "table of entity `{}` ({:?}): {msg}",
                        e.name, e.table
                    ))
                })?;
                Ok(Guarded {
                    entity: e.clone(),
                    quoted,
                    state: State::Captured,
                    captured_at: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Guard {
            pool,
            capture,
            repair,
            every: every.max(Duration::from_millis(100)),
            tables,
            health: Arc::default(),
        })
    }

    pub fn mode(capture: &Capture) -> Mode {
        match capture {
            Capture::Trigger(_) => Mode::Trigger,
            Capture::Logical { .. } => Mode::Logical,
        }
    }

    pub fn health(&self) -> Arc<GuardHealth> {
        self.health.clone()
    }

    /// Checks every `every` until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        loop {
            if let Err(e) = self.check().await {
                tracing::debug!("[observers] capture guard: {e}");
            }
            tokio::select! {
                () = tokio::time::sleep(self.every) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            if *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    /// One pass over the tables, and the backfills' progress.
    pub async fn check(&mut self) -> Result<()> {
        let entities: Vec<String> = self.tables.iter().map(|t| t.entity.name.clone()).collect();
        let backfills = super::backfill::recent(&self.pool, &entities).await?;
        *self.health.backfills.lock().expect("backfills lock") = backfills;
        for i in 0..self.tables.len() {
            let state = self.state_of(i).await?;
            let now = now_rfc3339();
            let was = self.tables[i].state;
            match state {
                State::Captured => {
                    self.tables[i].captured_at = Some(now);
                    self.tables[i].state = State::Captured;
                }
                State::Missing if was != State::Missing => {
                    self.tables[i].state = State::Missing;
                    self.report(i, "the table does not exist (dropped?)", None);
                }
                State::Uncaptured => {
                    let repaired = self.repair && self.repair_table(i).await;
                    self.tables[i].state = if repaired {
                        State::Captured
                    } else {
                        State::Uncaptured
                    };
                    if was != State::Uncaptured || repaired {
                        let why = match self.capture {
                            Capture::Trigger(_) => {
                                "the table lost its capture triggers (dropped and created again?)"
                            }
                            Capture::Logical { .. } => {
                                "the table is not in the publication (dropped and created again, or removed from it)"
                            }
                        };
                        self.report(i, why, repaired.then_some(now.clone()));
                    }
                    if repaired {
                        self.tables[i].captured_at = Some(now);
                    }
                }
                State::Missing => {}
            }
        }
        Ok(())
    }

    async fn state_of(&self, i: usize) -> Result<State> {
        let (quoted, entity) = (
            self.tables[i].quoted.clone(),
            self.tables[i].entity.name.clone(),
        );
        let checked: std::result::Result<(bool, bool), sqlx::Error> = match &self.capture {
            Capture::Trigger(_) => {
                let base = format!("{TRIGGER_PREFIX}{entity}");
                let names = vec![base.clone(), format!("{base}_ins"), format!("{base}_del")];
                sqlx::query_as(
                    "SELECT to_regclass($1) IS NOT NULL, (SELECT count(*) = 3 FROM pg_trigger \
                     WHERE tgrelid = to_regclass($1) AND tgname = ANY($2))",
                )
                .bind(quoted)
                .bind(names)
                .fetch_one(&self.pool)
                .await
            }
            Capture::Logical { publication } => {
                sqlx::query_as(
                    "SELECT to_regclass($1) IS NOT NULL, \
                 (COALESCE((SELECT puballtables FROM pg_publication WHERE pubname = $2), false) \
                  OR EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p \
                             ON p.oid = r.prpubid \
                             WHERE p.pubname = $2 AND r.prrelid = to_regclass($1))) \
                 AND COALESCE((SELECT relreplident = 'f' FROM pg_class \
                               WHERE oid = to_regclass($1)), false)",
                )
                .bind(quoted)
                .bind(publication.clone())
                .fetch_one(&self.pool)
                .await
            }
        };
        let (exists, captured) = checked
            .map_err(|e| Error::Transport(format!("checking the capture of {entity}: {e}")))?;
        Ok(match (exists, captured) {
            (false, _) => State::Missing,
            (true, true) => State::Captured,
            (true, false) => State::Uncaptured,
        })
    }

    /// Re-installs capture for one table; false (logged) if that failed.
    async fn repair_table(&self, i: usize) -> bool {
        let table = self.tables[i].entity.clone();
        let one = match Schema::new(vec![table.clone()]) {
            Ok(one) => one,
            Err(_) => return false,
        };
        let done = match &self.capture {
            Capture::Trigger(options) => super::install_with(&self.pool, &one, options).await,
            Capture::Logical { publication } => {
                logical::add_tables(&self.pool, &one, publication).await
            }
        };
        match done {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(
                    "[observers] capture of {} could not be repaired: {e}",
                    table.table
                );
                false
            }
        }
    }

    fn report(&self, i: usize, why: &str, repaired_at: Option<String>) {
        let table = &self.tables[i];
        let since = table
            .captured_at
            .clone()
            .unwrap_or_else(|| "the engine's start".to_owned());
        let gap = json!({
            "entity": table.entity.name,
            "table": table.entity.table,
            "reason": why,
            "not_captured_since": since,
            "repaired_at": repaired_at,
        });
        match &repaired_at {
            Some(at) => tracing::warn!(
                "[observers] capture of {} ({}) repaired: {why}. Changes to it between {since} \
                 and {at} may not have been captured",
                table.entity.table,
                table.entity.name
            ),
            None => tracing::warn!(
                "[observers] {} ({}) is not captured: {why}{}",
                table.entity.table,
                table.entity.name,
                if self.repair {
                    ""
                } else {
                    "; run `fraiseql db install` (auto_install is off)"
                }
            ),
        }
        self.health.record(gap);
    }
}
