//! Core error kinds → one Python exception class each, all under `fraiseql.FraiseQLError`.
//!
//! The kinds of a failed connect, publish or dead-letter operation become subclasses of
//! `TransportError` / `DeadLetterError`, so that `except fraiseql.AuthenticationError` works,
//! and each such exception also carries `kind` (`"authentication"`, …).

use fraiseql_observers::error::{ConnectErrorKind, DeadLetterErrorKind, PublishErrorKind};
use fraiseql_observers::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyType;

create_exception!(
    fraiseql,
    FraiseQLError,
    PyException,
    "Base class of every fraiseql error."
);
create_exception!(
    fraiseql,
    ConfigError,
    FraiseQLError,
    "Invalid fraiseql.toml / fraiseql-observer.toml or config value."
);
create_exception!(
    fraiseql,
    ConditionError,
    FraiseQLError,
    "A condition that does not compile; has `line` and `column`."
);
create_exception!(
    fraiseql,
    SchemaError,
    FraiseQLError,
    "Observers that do not fit the declared types."
);
create_exception!(
    fraiseql,
    TransportError,
    FraiseQLError,
    "A transport (queue, database, broker) failed."
);
create_exception!(
    fraiseql,
    ConnectError,
    TransportError,
    "A server (PostgreSQL, NATS, Redis) could not be reached or refused the engine; `kind` says why."
);
create_exception!(
    fraiseql,
    UnreachableError,
    ConnectError,
    "The server did not answer."
);
create_exception!(
    fraiseql,
    ConnectionSettingsError,
    ConnectError,
    "The URL or connection settings cannot be used."
);
create_exception!(
    fraiseql,
    AuthenticationError,
    ConnectError,
    "The server refused the credentials."
);
create_exception!(fraiseql, TlsError, ConnectError, "TLS could not be set up.");
create_exception!(
    fraiseql,
    PermissionDeniedError,
    ConnectError,
    "The user lacks a permission the engine needs."
);
create_exception!(
    fraiseql,
    JetStreamUnavailableError,
    ConnectError,
    "The NATS server or account has no JetStream."
);
create_exception!(
    fraiseql,
    NotSetUpError,
    ConnectError,
    "The server answers but is not set up for fraiseql (missing tables, an incompatible stream)."
);
create_exception!(
    fraiseql,
    PublishError,
    TransportError,
    "A change could not be published; `kind` says why."
);
create_exception!(
    fraiseql,
    PayloadTooLargeError,
    PublishError,
    "The change is larger than the server accepts (NATS max_payload)."
);
create_exception!(
    fraiseql,
    PublishTimeoutError,
    PublishError,
    "The server did not confirm the publish in time."
);
create_exception!(
    fraiseql,
    InvalidMessageError,
    PublishError,
    "The change cannot be expressed as a message of this transport."
);
create_exception!(fraiseql, ActionError, FraiseQLError, "An action failed.");
create_exception!(
    fraiseql,
    CheckpointError,
    FraiseQLError,
    "The idempotency store failed."
);
create_exception!(
    fraiseql,
    DeadLetterError,
    FraiseQLError,
    "The dead-letter queue failed or an entry cannot be retried; `kind` says why."
);
create_exception!(
    fraiseql,
    DeadLetterNotFoundError,
    DeadLetterError,
    "No dead-letter entry has that id."
);
create_exception!(
    fraiseql,
    UndecodableEntryError,
    DeadLetterError,
    "The entry holds input that could not be decoded: there is nothing to re-run."
);
create_exception!(
    fraiseql,
    ObserverGoneError,
    DeadLetterError,
    "The entry's observer (or action) is not declared any more."
);
create_exception!(
    fraiseql,
    NoDatabaseError,
    DeadLetterError,
    "There is no durable dead-letter queue: no database is configured."
);
create_exception!(
    fraiseql,
    RetryInProgressError,
    DeadLetterError,
    "The entry is being retried already: a second retry would deliver it twice."
);
create_exception!(
    fraiseql,
    EngineError,
    FraiseQLError,
    "The engine was used in a state that does not allow it."
);

/// Newtype so `?` converts core errors into Python exceptions.
pub struct PyFraiseError(pub Error);

impl From<Error> for PyFraiseError {
    fn from(e: Error) -> Self {
        PyFraiseError(e)
    }
}

impl From<PyFraiseError> for PyErr {
    fn from(e: PyFraiseError) -> PyErr {
        let msg = e.0.to_string();
        match e.0 {
            Error::Config(_) => ConfigError::new_err(msg),
            Error::Condition { source, .. } => condition_error(msg, source.line(), source.column()),
            Error::Schema(_) => SchemaError::new_err(msg),
            Error::Connect(c) => with_kind(connect_class(c.kind()), msg, connect_label(c.kind())),
            Error::Publish(p) => with_kind(publish_class(p.kind()), msg, publish_label(p.kind())),
            Error::Transport(_) => TransportError::new_err(msg),
            Error::Action(_) => ActionError::new_err(msg),
            Error::Checkpoint(_) => CheckpointError::new_err(msg),
            Error::DeadLetter(d) => with_kind(
                dead_letter_class(d.kind()),
                msg,
                dead_letter_label(d.kind()),
            ),
            Error::Engine(_) => EngineError::new_err(msg),
        }
    }
}

type Class = fn(Python<'_>) -> Bound<'_, PyType>;

fn connect_class(kind: ConnectErrorKind) -> Class {
    match kind {
        ConnectErrorKind::Unreachable => |py| py.get_type::<UnreachableError>(),
        ConnectErrorKind::InvalidSettings => |py| py.get_type::<ConnectionSettingsError>(),
        ConnectErrorKind::Authentication => |py| py.get_type::<AuthenticationError>(),
        ConnectErrorKind::Tls => |py| py.get_type::<TlsError>(),
        ConnectErrorKind::Permission => |py| py.get_type::<PermissionDeniedError>(),
        ConnectErrorKind::NoJetStream => |py| py.get_type::<JetStreamUnavailableError>(),
        ConnectErrorKind::NotSetUp => |py| py.get_type::<NotSetUpError>(),
    }
}

fn connect_label(kind: ConnectErrorKind) -> &'static str {
    match kind {
        ConnectErrorKind::Unreachable => "unreachable",
        ConnectErrorKind::InvalidSettings => "invalid_settings",
        ConnectErrorKind::Authentication => "authentication",
        ConnectErrorKind::Tls => "tls",
        ConnectErrorKind::Permission => "permission",
        ConnectErrorKind::NoJetStream => "no_jetstream",
        ConnectErrorKind::NotSetUp => "not_set_up",
    }
}

fn publish_class(kind: PublishErrorKind) -> Class {
    match kind {
        PublishErrorKind::TooLarge => |py| py.get_type::<PayloadTooLargeError>(),
        PublishErrorKind::TimedOut => |py| py.get_type::<PublishTimeoutError>(),
        PublishErrorKind::Invalid => |py| py.get_type::<InvalidMessageError>(),
        PublishErrorKind::Failed => |py| py.get_type::<PublishError>(),
    }
}

fn publish_label(kind: PublishErrorKind) -> &'static str {
    match kind {
        PublishErrorKind::TooLarge => "too_large",
        PublishErrorKind::TimedOut => "timed_out",
        PublishErrorKind::Invalid => "invalid",
        PublishErrorKind::Failed => "failed",
    }
}

fn dead_letter_class(kind: DeadLetterErrorKind) -> Class {
    match kind {
        DeadLetterErrorKind::NotFound => |py| py.get_type::<DeadLetterNotFoundError>(),
        DeadLetterErrorKind::Undecodable => |py| py.get_type::<UndecodableEntryError>(),
        DeadLetterErrorKind::ObserverGone => |py| py.get_type::<ObserverGoneError>(),
        DeadLetterErrorKind::NoDatabase => |py| py.get_type::<NoDatabaseError>(),
        DeadLetterErrorKind::InProgress => |py| py.get_type::<RetryInProgressError>(),
        DeadLetterErrorKind::Storage => |py| py.get_type::<DeadLetterError>(),
    }
}

fn dead_letter_label(kind: DeadLetterErrorKind) -> &'static str {
    match kind {
        DeadLetterErrorKind::NotFound => "not_found",
        DeadLetterErrorKind::Undecodable => "undecodable",
        DeadLetterErrorKind::ObserverGone => "observer_gone",
        DeadLetterErrorKind::NoDatabase => "no_database",
        DeadLetterErrorKind::InProgress => "in_progress",
        DeadLetterErrorKind::Storage => "storage",
    }
}

/// An exception of `class` with `kind` set.
fn with_kind(class: Class, msg: String, kind: &'static str) -> PyErr {
    Python::attach(|py| {
        let err = PyErr::from_type(class(py), msg);
        let _ = err.value(py).setattr("kind", kind);
        err
    })
}

/// A ConditionError carrying `line` and `column` attributes.
pub fn condition_error(msg: String, line: usize, column: usize) -> PyErr {
    Python::attach(|py| {
        let err = ConditionError::new_err(msg);
        let value = err.value(py);
        let _ = value.setattr("line", line);
        let _ = value.setattr("column", column);
        err
    })
}

/// The exception classes, by the name they are exported under.
macro_rules! classes {
    ($($name:ident),* $(,)?) => {
        pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
            let py = m.py();
            $(m.add(stringify!($name), py.get_type::<$name>())?;)*
            Ok(())
        }
    };
}

classes!(
    FraiseQLError,
    ConfigError,
    ConditionError,
    SchemaError,
    TransportError,
    ConnectError,
    UnreachableError,
    ConnectionSettingsError,
    AuthenticationError,
    TlsError,
    PermissionDeniedError,
    JetStreamUnavailableError,
    NotSetUpError,
    PublishError,
    PayloadTooLargeError,
    PublishTimeoutError,
    InvalidMessageError,
    ActionError,
    CheckpointError,
    DeadLetterError,
    DeadLetterNotFoundError,
    UndecodableEntryError,
    ObserverGoneError,
    NoDatabaseError,
    RetryInProgressError,
    EngineError,
);
