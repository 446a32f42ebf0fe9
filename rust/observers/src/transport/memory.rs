//! The `in_memory` transport: a bounded queue in front of the engine. `emit` waits for room
//! when the queue is full (backpressure), so memory stays bounded.

use std::sync::{Arc, Mutex};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{process_guarded, InFlight};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::event::Event;

pub struct MemoryTransport {
    tx: Mutex<Option<mpsc::Sender<Event>>>,
    in_flight: Arc<InFlight>,
    runner: Mutex<Option<JoinHandle<()>>>,
}

impl MemoryTransport {
    /// Starts the dispatcher on the current tokio runtime.
    pub fn start(engine: Arc<Engine>, queue_capacity: usize, max_concurrency: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue_capacity.max(1));
        let in_flight = Arc::new(InFlight::default());
        let runner = tokio::spawn(dispatch(
            engine,
            rx,
            in_flight.clone(),
            max_concurrency.max(1),
        ));
        MemoryTransport {
            tx: Mutex::new(Some(tx)),
            in_flight,
            runner: Mutex::new(Some(runner)),
        }
    }

    fn sender(&self) -> Result<mpsc::Sender<Event>> {
        self.tx
            .lock()
            .expect("sender lock")
            .clone()
            .ok_or_else(|| Error::Engine("the engine is stopped".into()))
    }

    /// Queues an event, waiting for room if the queue is full.
    pub async fn emit(&self, event: Event) -> Result<()> {
        let tx = self.sender()?;
        self.in_flight.begin();
        if tx.send(event).await.is_err() {
            self.in_flight.end();
            return Err(Error::Engine("the engine is stopped".into()));
        }
        Ok(())
    }

    /// Queues an event if there is room; gives it back otherwise.
    pub fn try_emit(&self, event: Event) -> Result<Option<Event>> {
        let tx = self.sender()?;
        self.in_flight.begin();
        match tx.try_send(event) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.in_flight.end();
                Ok(Some(event))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.in_flight.end();
                Err(Error::Engine("the engine is stopped".into()))
            }
        }
    }

    /// Events accepted and not yet fully processed.
    pub fn pending(&self) -> usize {
        self.in_flight.get()
    }

    /// Waits until every accepted event has been processed (or dead-lettered).
    pub async fn drain(&self) {
        self.in_flight.wait_idle().await;
    }

    /// Stops accepting events, finishes the ones accepted, and returns.
    pub async fn stop(&self) {
        drop(self.tx.lock().expect("sender lock").take());
        let runner = self.runner.lock().expect("runner lock").take();
        if let Some(runner) = runner {
            let _ = runner.await;
        }
        self.drain().await;
    }
}

/// Runs up to `max_concurrency` events at once as futures of this task.
async fn dispatch(
    engine: Arc<Engine>,
    mut rx: mpsc::Receiver<Event>,
    in_flight: Arc<InFlight>,
    max_concurrency: usize,
) {
    let mut running = FuturesUnordered::new();
    loop {
        if running.len() >= max_concurrency {
            running.next().await;
            continue;
        }
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            event = rx.recv() => {
                let Some(event) = event else { break };
                let (engine, in_flight) = (&engine, &in_flight);
                running.push(async move {
                    process_guarded(engine, &event, 0, "in-memory transport").await;
                    in_flight.end();
                });
            }
        }
    }
    while running.next().await.is_some() {}
}
