//! A Python function as an engine [`Action`].
//!
//! Calls go to a small fixed pool of OS threads ([`PythonCallers`]). A pool thread takes the
//! GIL once and runs queued calls for as long as there are any, so the GIL changes hands
//! once per burst instead of once per event, and never more than a few threads compete for
//! it — one thread per in-flight event (tokio's blocking pool) thrashed the GIL: 20k
//! events/s against ~100k with the pool. Coroutines
//! are created on the pool and run on the engine's one asyncio loop; the result is awaited
//! on tokio without the GIL.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};

use async_trait::async_trait;
use fraiseql_observers::{Action, ActionError, Event, FailureReason};
use futures::future::BoxFuture;
use pyo3::prelude::*;
use pyo3_async_runtimes::TaskLocals;
use tokio::sync::oneshot;

use crate::convert::opt_to_py;

/// The asyncio loop that runs `async def` handlers; set when the engine starts.
pub type LoopSlot = Arc<OnceLock<TaskLocals>>;

/// Threads that call Python. A handler blocked in I/O releases the GIL, so this many blocking
/// handlers can wait at once while others run.
const CALLER_THREADS: usize = 8;

type PyOutcome = Result<(), ActionError>;

enum Reply {
    /// A sync handler finished.
    Done(PyOutcome),
    /// An async handler's coroutine, scheduled on the loop; await it.
    Pending(BoxFuture<'static, PyResult<Py<PyAny>>>),
}

struct Job {
    invoke: Arc<Py<PyAny>>,
    is_async: bool,
    locals: Option<TaskLocals>,
    event: Event,
    reply: oneshot::Sender<Reply>,
}

/// Calls waiting for a Python thread. Jobs are taken one at a time, so a thread blocked in
/// a slow handler holds only that job and the others go to idle threads.
#[derive(Default)]
struct PythonCallers {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

impl PythonCallers {
    fn push(&self, job: Job) {
        self.queue.lock().expect("caller queue lock").push_back(job);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Job> {
        self.queue.lock().expect("caller queue lock").pop_front()
    }

    fn wait_for_work(&self) {
        let queue = self.queue.lock().expect("caller queue lock");
        let _queue = self
            .ready
            .wait_while(queue, |q| q.is_empty())
            .expect("caller queue lock");
    }
}

fn callers() -> &'static PythonCallers {
    static CALLERS: OnceLock<PythonCallers> = OnceLock::new();
    static STARTED: Once = Once::new();
    let callers = CALLERS.get_or_init(PythonCallers::default);
    STARTED.call_once(|| {
        for n in 0..CALLER_THREADS {
            std::thread::Builder::new()
                .name(format!("fraiseql-python-{n}"))
                .spawn(move || caller_loop(callers))
                .expect("cannot start a Python caller thread");
        }
    });
    callers
}

/// Waits for work, then keeps the GIL for as long as there is work queued: the GIL changes
/// hands once per burst, not once per event.
fn caller_loop(callers: &'static PythonCallers) {
    loop {
        callers.wait_for_work();
        Python::attach(|py| {
            while let Some(job) = callers.pop() {
                let reply = run_job(py, &job);
                let _ = job.reply.send(reply);
            }
        });
    }
}

fn run_job(py: Python<'_>, job: &Job) -> Reply {
    let called = call(py, &job.invoke, &job.event);
    if !job.is_async {
        return Reply::Done(called.map(drop).map_err(|e| {
            ActionError::retryable(traceback_text(py, &e)).with_reason(FailureReason::Exception)
        }));
    }
    let Some(locals) = &job.locals else {
        return Reply::Done(Err(ActionError::retryable(
            "the engine has no asyncio loop for async handlers",
        )));
    };
    match called
        .and_then(|coroutine| pyo3_async_runtimes::into_future_with_locals(locals, coroutine))
    {
        Ok(future) => Reply::Pending(Box::pin(future)),
        Err(e) => {
            Reply::Done(Err(ActionError::retryable(traceback_text(py, &e))
                .with_reason(FailureReason::Exception)))
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
fn traceback_text(py: Python<'_>, err: &PyErr) -> String {
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
}

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

#[async_trait]
impl Action for PythonHandler {
    fn kind(&self) -> &'static str {
        "python"
    }

    fn describe(&self) -> String {
        format!("python:{}", self.name)
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            invoke: self.invoke.clone(),
            is_async: self.is_async,
            locals: self.event_loop.get().cloned(),
            event: event.clone(),
            reply,
        };
        callers().push(job);
        let reply = answer
            .await
            .map_err(|_| ActionError::retryable("the Python caller dropped the call"))?;
        match reply {
            Reply::Done(outcome) => outcome,
            Reply::Pending(future) => match future.await {
                Ok(_) => Ok(()),
                Err(e) => Err(Python::attach(|py| {
                    ActionError::retryable(traceback_text(py, &e))
                        .with_reason(FailureReason::Exception)
                })),
            },
        }
    }
}
