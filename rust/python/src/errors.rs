//! Core error kinds → one Python exception class each, all under `fraiseql.FraiseQLError`.

use fraiseql_observers::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

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
    "The dead-letter queue failed or has no such entry."
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
            Error::Transport(_) => TransportError::new_err(msg),
            Error::Action(_) => ActionError::new_err(msg),
            Error::Checkpoint(_) => CheckpointError::new_err(msg),
            Error::DeadLetter(_) => DeadLetterError::new_err(msg),
            Error::Engine(_) => EngineError::new_err(msg),
        }
    }
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FraiseQLError", py.get_type::<FraiseQLError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ConditionError", py.get_type::<ConditionError>())?;
    m.add("SchemaError", py.get_type::<SchemaError>())?;
    m.add("TransportError", py.get_type::<TransportError>())?;
    m.add("ActionError", py.get_type::<ActionError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("DeadLetterError", py.get_type::<DeadLetterError>())?;
    m.add("EngineError", py.get_type::<EngineError>())?;
    Ok(())
}
