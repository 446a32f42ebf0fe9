//! Transports feed events to the engine. `memory` is the in-process queue used for tests and
//! embedding; the PostgreSQL, NATS and Redis transports follow the same shape: bounded
//! intake, bounded concurrency, acknowledgement only after [`crate::Engine::process`].

pub mod memory;
pub mod nats;
pub mod nats_auth;
pub mod postgres;
pub mod redis;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use tokio::sync::Notify;

use crate::engine::Engine;
use crate::event::Event;

/// Runs [`Engine::process`] and turns a panic into a logged error, so that one event cannot
/// take down the loop that drives many (`source` names that loop in the log).
///
/// The in-memory and PostgreSQL sources run their events as futures of their own task (a
/// `FuturesUnordered`), not as a task each: events are I/O bound (actions await an HTTP
/// reply, a PubAck, a Python caller thread), and a task per event cost more than the
/// processing itself (a spawn was 2.7 µs of 8 µs per message on the NATS consumer, which
/// polls each message once before it spawns; see benches/README.md).
pub async fn process_guarded(engine: &Engine, event: &Event, failed_attempts: u32, source: &str) {
    engine.metrics().events_in_flight.inc();
    let outcome = AssertUnwindSafe(engine.process_after(event, failed_attempts))
        .catch_unwind()
        .await;
    engine.metrics().events_in_flight.dec();
    if outcome.is_err() {
        tracing::error!("{source}: processing event {} panicked", event.id);
    }
}

/// Counts events accepted and not yet processed, and wakes `wait_idle` when it reaches 0.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    pub fn begin(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    pub fn end(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub async fn wait_idle(&self) {
        loop {
            // Created before the check: notify_waiters wakes it even if not yet polled.
            let notified = self.idle.notified();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}
