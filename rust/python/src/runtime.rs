//! The one tokio runtime of the process, shared with pyo3-async-runtimes.

use std::sync::OnceLock;

use tokio::runtime::Runtime;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("fraiseql-worker")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime");
        rt
    })
}

/// Hands our runtime to pyo3-async-runtimes so there is never a second one.
pub fn init() {
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
}
