//! The crate's error type: one variant per kind, each mapped to one Python exception class.

use crate::condition::ConditionError;
use crate::config::ConfigErrors;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration: every problem found, each with file, key and line.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A condition that does not compile, with the observer it belongs to.
    #[error("{}observer `{observer}`: condition {source}", located(.origin))]
    Condition {
        observer: String,
        /// Where the observer was declared (`schema.py:12`, `fraiseql.toml:30`), if known.
        origin: String,
        #[source]
        source: Box<ConditionError>,
    },
    /// The declared observers do not fit the declared schema (unknown entity, duplicate name…).
    #[error("{0}")]
    Schema(String),
    #[error("transport error: {0}")]
    Transport(String),
    #[error("action error: {0}")]
    Action(String),
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    #[error("dead-letter queue error: {0}")]
    DeadLetter(String),
    /// The engine was used in a state that does not allow it (stopped, not started).
    #[error("engine error: {0}")]
    Engine(String),
}

fn located(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!("{origin}: ")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
