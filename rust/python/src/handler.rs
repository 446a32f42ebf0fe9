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
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::time::Duration;

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
    timeout: Duration,
    locals: Option<TaskLocals>,
    event: Event,
    reply: oneshot::Sender<Reply>,
    state: Arc<AtomicU8>,
}

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;

/// At most this many threads beyond [`CALLER_THREADS`] replace abandoned ones at a time.
const MAX_REPLACEMENTS: usize = 64;

/// Calls waiting for a Python thread. Jobs are taken one at a time, so a thread blocked in
/// a slow handler holds only that job and the others go to idle threads.
#[derive(Default)]
struct PythonCallers {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Threads serving the queue, abandoned ones included until they return.
    threads: AtomicUsize,
}

impl PythonCallers {
    fn push(&self, job: Job) {
        self.queue.lock().expect("caller queue lock").push_back(job);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Job> {
        self.queue.lock().expect("caller queue lock").pop_front()
    }

    /// A sync handler outlived its timeout on a pool thread: that thread is left to finish
    /// (Python cannot stop it), and another serves the queue meanwhile, so the pool keeps its
    /// size; the extra thread ends after its next job once the stuck one is back.
    fn abandon(&'static self, name: &str) {
        fraiseql_observers::metrics::abandoned_handler_threads().inc();
        let threads = self.threads.load(Ordering::SeqCst);
        if threads >= CALLER_THREADS + MAX_REPLACEMENTS {
            tracing::error!(
                "[observer] python:{name} outlived its timeout; {threads} handler threads are \
                 busy and no more are started: handlers will wait for one to return"
            );
            return;
        }
        tracing::warn!(
            "[observer] python:{name} outlived its timeout: its thread is left to finish, and \
             another one takes the queue"
        );
        spawn_caller(self);
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
        for _ in 0..CALLER_THREADS {
            spawn_caller(callers);
        }
    });
    callers
}

fn spawn_caller(callers: &'static PythonCallers) {
    let n = callers.threads.fetch_add(1, Ordering::SeqCst);
    std::thread::Builder::new()
        .name(format!("fraiseql-python-{n}"))
        .spawn(move || caller_loop(callers))
        .expect("cannot start a Python caller thread");
}

/// Waits for work, then keeps the GIL for as long as there is work queued: the GIL changes
/// hands once per burst, not once per event. A thread beyond the pool's size (one that
/// replaced an abandoned one, or the abandoned one once it is back) ends after a job.
fn caller_loop(callers: &'static PythonCallers) {
    loop {
        callers.wait_for_work();
        let surplus = Python::attach(|py| {
            while let Some(job) = callers.pop() {
                // A call given up on before it started is not run late.
                if job
                    .state
                    .compare_exchange(QUEUED, RUNNING, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    continue;
                }
                let reply = run_job(py, &job);
                let _ = job.reply.send(reply);
                if callers.threads.load(Ordering::SeqCst) > CALLER_THREADS {
                    return true;
                }
            }
            false
        });
        if surplus
            && callers
                .threads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                    (t > CALLER_THREADS).then(|| t - 1)
                })
                .is_ok()
        {
            return;
        }
    }
}

fn run_job<'py>(py: Python<'py>, job: &Job) -> Reply {
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
    // asyncio.wait_for cancels the coroutine at its timeout, inside the loop.
    let timed = |coroutine: Bound<'py, PyAny>| -> PyResult<Bound<'py, PyAny>> {
        py.import("asyncio")?
            .call_method1("wait_for", (coroutine, job.timeout.as_secs_f64()))
    };
    match called
        .and_then(timed)
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
    timeout: Duration,
    /// Called as `invoke(new, old, id, entity, event, table, timestamp)`; the Python front
    /// wraps the user's function so it receives an entity instance (and the event).
    invoke: Arc<Py<PyAny>>,
    is_async: bool,
    event_loop: LoopSlot,
}

impl PythonHandler {
    pub fn new(
        name: String,
        invoke: Py<PyAny>,
        is_async: bool,
        event_loop: LoopSlot,
        timeout: Duration,
    ) -> Self {
        PythonHandler {
            name,
            timeout,
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

    /// The handler's own timeout ends a call first (below); this is the engine's backstop.
    fn timeout(&self) -> Duration {
        self.timeout + Duration::from_secs(1)
    }

    async fn execute(&self, event: &Event) -> Result<(), ActionError> {
        let (reply, answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(QUEUED));
        let job = Job {
            invoke: self.invoke.clone(),
            is_async: self.is_async,
            timeout: self.timeout,
            locals: self.event_loop.get().cloned(),
            event: event.clone(),
            reply,
            state: state.clone(),
        };
        callers().push(job);
        let reply = match tokio::time::timeout(self.timeout, answer).await {
            Ok(reply) => {
                reply.map_err(|_| ActionError::retryable("the Python caller dropped the call"))?
            }
            Err(_) => {
                let was = state.swap(CANCELLED, Ordering::SeqCst);
                if was == RUNNING && !self.is_async {
                    callers().abandon(&self.name);
                }
                return Err(ActionError::retryable(format!(
                    "python:{} did not return within its timeout of {} ms",
                    self.name,
                    self.timeout.as_millis()
                ))
                .with_reason(FailureReason::Timeout));
            }
        };
        match reply {
            Reply::Done(outcome) => outcome,
            Reply::Pending(future) => match future.await {
                Ok(_) => Ok(()),
                Err(e) => Err(Python::attach(|py| {
                    let timed_out = e.is_instance_of::<pyo3::exceptions::PyTimeoutError>(py);
                    if timed_out {
                        ActionError::retryable(format!(
                            "python:{} did not finish within its timeout of {} ms",
                            self.name,
                            self.timeout.as_millis()
                        ))
                        .with_reason(FailureReason::Timeout)
                    } else {
                        ActionError::retryable(traceback_text(py, &e))
                            .with_reason(FailureReason::Exception)
                    }
                })),
            },
        }
    }
}
