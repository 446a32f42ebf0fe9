//! Transports feed events to the engine. `memory` is the in-process queue used for tests and
//! embedding; the PostgreSQL, NATS and Redis transports follow the same shape: bounded
//! intake, bounded concurrency, acknowledgement only after [`crate::Engine::process`].

pub mod memory;
pub mod nats;
pub mod nats_auth;
pub mod postgres;
pub mod redis;

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

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
