//! `fraiseql._native`: the PyO3 binding of `fraiseql_observers`. All Python glue lives here;
//! the core crate knows nothing of Python.

mod condition;
mod convert;
mod engine;
mod errors;
mod handler;
mod publish;
mod runtime;

use pyo3::prelude::*;

/// Logs to stderr, filtered by RUST_LOG (default: info).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    runtime::init();
    errors::register(m)?;
    m.add_class::<condition::PyCondition>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<publish::PyPublisher>()?;
    m.add_function(wrap_pyfunction!(engine::check, m)?)?;
    m.add_function(wrap_pyfunction!(engine::db_install, m)?)?;
    m.add_function(wrap_pyfunction!(engine::backfill, m)?)?;
    m.add_function(wrap_pyfunction!(engine::config_facts, m)?)?;
    m.add_function(wrap_pyfunction!(engine::database_url, m)?)?;
    m.add_function(wrap_pyfunction!(engine::idempotency_prune, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
