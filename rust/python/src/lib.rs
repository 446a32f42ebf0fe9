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

/// The engine's own allocations (events, JSON values, message buffers) come and go on several
/// threads at once, tens of thousands a second: with glibc's malloc they took about 30 % of the
/// engine's CPU on the path through NATS (arena locks, consolidation; `benches/end_to_end.py`
/// under perf). Python's objects keep Python's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
