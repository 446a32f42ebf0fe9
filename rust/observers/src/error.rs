//! The crate's error type. Each variant is one kind of failure and maps to one Python
//! exception class; the operations that can fail in several distinct ways (connecting,
//! publishing, working the dead-letter queue) carry a kind of their own ([`ConnectErrorKind`],
//! [`PublishErrorKind`], [`DeadLetterErrorKind`]) that callers match on, as nats.rs does.

use std::fmt;

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
    /// A server (PostgreSQL, NATS, Redis) could not be reached or refused the engine.
    #[error("{0}")]
    Connect(OpError<ConnectErrorKind>),
    /// A message could not be published (NATS, Redis).
    #[error("{0}")]
    Publish(OpError<PublishErrorKind>),
    /// Any other failure of a transport, once connected.
    #[error("transport error: {0}")]
    Transport(String),
    #[error("action error: {0}")]
    Action(String),
    /// The idempotency store behind `EffectivelyOnce` failed.
    #[error("checkpoint error: {0}")]
    Checkpoint(OpError<CheckpointErrorKind>),
    /// The dead-letter queue failed, or an entry cannot be retried.
    #[error("{0}")]
    DeadLetter(OpError<DeadLetterErrorKind>),
    /// The engine was used in a state that does not allow it (stopped, not started).
    #[error("engine error: {0}")]
    Engine(String),
}

impl Error {
    pub fn connect(kind: ConnectErrorKind, message: impl Into<String>) -> Error {
        Error::Connect(OpError::new(kind, message))
    }

    pub fn publish(kind: PublishErrorKind, message: impl Into<String>) -> Error {
        Error::Publish(OpError::new(kind, message))
    }

    pub fn dead_letter(kind: DeadLetterErrorKind, message: impl Into<String>) -> Error {
        Error::DeadLetter(OpError::new(kind, message))
    }

    pub fn checkpoint(kind: CheckpointErrorKind, message: impl Into<String>) -> Error {
        Error::Checkpoint(OpError::new(kind, message))
    }
}

/// A failure of one operation: what kind, and a message that says what and where (never a
/// secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError<K> {
    kind: K,
    message: String,
}

impl<K: Copy> OpError<K> {
    pub fn new(kind: K, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> K {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<K> fmt::Display for OpError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<K: fmt::Debug> std::error::Error for OpError<K> {}

/// Why a connection could not be made or used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    /// The server did not answer (refused, DNS, timed out).
    Unreachable,
    /// The URL or the connection settings are not usable.
    InvalidSettings,
    /// The server refused the credentials.
    Authentication,
    /// TLS could not be set up or the certificate was refused.
    Tls,
    /// The user lacks a permission the engine needs.
    Permission,
    /// The NATS server or account has no JetStream.
    NoJetStream,
    /// The server answers but is not set up for the engine (missing tables, a stream whose
    /// settings cannot be changed).
    NotSetUp,
}

/// Why a publish failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishErrorKind {
    /// The message is larger than the server accepts (NATS `max_payload`): retrying cannot
    /// help.
    TooLarge,
    /// No confirmation in time.
    TimedOut,
    /// The message cannot be built for this transport (a subject token, an encoding).
    Invalid,
    /// The server or the connection failed.
    Failed,
}

impl PublishErrorKind {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, PublishErrorKind::TimedOut | PublishErrorKind::Failed)
    }
}

/// Why the idempotency store failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointErrorKind {
    /// The store could not be reached or failed (its database restarting, a connection
    /// cut): another attempt may succeed.
    Unavailable,
    /// The store refused the key or cannot be used at all (a key it cannot hold, such as one
    /// with a NUL character; an invalid table name): another attempt cannot succeed.
    Rejected,
}

impl CheckpointErrorKind {
    /// Whether another attempt may succeed.
    pub fn is_retryable(self) -> bool {
        self == CheckpointErrorKind::Unavailable
    }
}

/// Why a dead-letter operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterErrorKind {
    /// No entry with that id.
    NotFound,
    /// The entry holds input that could not be decoded: there is nothing to re-run.
    Undecodable,
    /// The entry names an observer (or an action of it) that is not declared any more.
    ObserverGone,
    /// There is no durable queue to work on (no database).
    NoDatabase,
    /// The entry is being retried already (by this process): a second retry would deliver
    /// it twice.
    InProgress,
    /// Reading or writing the queue failed.
    Storage,
}

fn located(origin: &str) -> String {
    if origin.is_empty() {
        String::new()
    } else {
        format!("{origin}: ")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
