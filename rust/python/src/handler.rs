//! A Python function as an engine [`Action`]. The GIL is taken only around the call; sync
//! functions run on tokio's blocking pool, coroutines on the engine's one asyncio loop.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use fraiseql_observers::{Action, ActionError, Event};
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;

use crate::convert::opt_to_py;

/// The asyncio loop that runs `async def` handlers; set when the engine starts.
pub type LoopSlot = Arc<OnceLock<TaskLocals>>;

pub struct PythonHandler {
    name: String,
    /// Called as `invoke(new, old, id, entity, event, table, timestamp)`; the Python front
    /// wraps the user's function so it receives an entity instance (and the event).
    invoke: Arc<Py<PyAny>>,
    is_async: bool,
    event_loop: LoopSlot,
}

impl PythonHandler {
    pub fn new(name: String, invoke: Py<PyAny>, is_async: bool, event_loop: LoopSlot) -> Self {
        PythonHandler {
            name,
            invoke: Arc::new(invoke),
            is_async,
            event_loop,
        }
    }
}

fn call<'py>(py: Python<'py>, invoke: &Py<PyAny>, event: &Event) -> PyResult<Bound<'py, PyAny>> {
    let args = (
        opt_to_py(py, event.new.as_ref())?,
        opt_to_py(py, event.old.as_ref())?,
        event.id.as_str(),
        event.entity.as_str(),
        event.event.as_str(),
        event.table.as_str(),
        event.timestamp.as_str(),
    );
    invoke.bind(py).call1(args)
}

/// The full traceback text, as the DLQ keeps it.
fn traceback_text(err: PyErr) -> String {
    Python::attach(|py| {
        let formatted = py
            .import("traceback")
            .and_then(|tb| {
                let args = (err.get_type(py), err.value(py), err.traceback(py));
                tb.call_method1("format_exception", args)
            })
            .and_then(|lines| lines.extract::<Vec<String>>());
        match formatted {
            Ok(lines) => lines.concat().trim_end().to_owned(),
            Err(_) => err.to_string(),
        }
    })
}

#[async_trait]
impl Action for PythonHandler {
    fn kind(&self) -> &'static str {
        "python"
    }

    fn describe(&self) -> String {
        format!("python:{}", self.name)
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        if self.is_async {
            let locals = self.event_loop.get().ok_or_else(|| {
                ActionError::retryable("the engine has no asyncio loop for async handlers")
            })?;
            let future = Python::attach(|py| {
                let coroutine = call(py, &self.invoke, event)?;
                pyo3_async_runtimes::into_future_with_locals(locals, coroutine)
            })
            .map_err(|e| ActionError::retryable(traceback_text(e)))?;
            return future
                .await
                .map(drop)
                .map_err(|e| ActionError::retryable(traceback_text(e)));
        }
        let invoke = self.invoke.clone();
        let event = event.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            Python::attach(|py| call(py, &invoke, &event).map(drop))
        })
        .await
        .map_err(|e| ActionError::retryable(format!("handler task failed: {e}")))?;
        outcome.map_err(|e| ActionError::retryable(traceback_text(e)))
    }
}
