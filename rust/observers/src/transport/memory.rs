//! The `in_memory` transport: a bounded queue in front of the engine, drained by the one
//! delivery loop. `emit` waits for room when the queue is full (backpressure), so memory
//! stays bounded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::delivery::{self, Committer, Delivery, Fetch, NoCheckpoints, Payload, Settled, Source};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::event::Event;

pub struct MemoryTransport {
    tx: Mutex<Option<mpsc::Sender<Event>>>,
    in_flight: Arc<InFlight>,
    runner: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl MemoryTransport {
    /// Starts the delivery loop on the current tokio runtime.
    pub fn start(engine: Arc<Engine>, queue_capacity: usize, max_concurrency: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue_capacity.max(1));
        let in_flight = Arc::new(InFlight::default());
        let source = MemorySource {
            rx,
            in_flight: in_flight.clone(),
        };
        // The queue closing ends the loop, once every accepted event is done: no shutdown.
        let (_never, shutdown) = watch::channel(false);
        let runner = tokio::spawn(async move {
            let _keep_open = _never;
            delivery::run(source, engine, max_concurrency, shutdown).await
        });
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
            match runner.await {
                Ok(Err(e)) => tracing::error!("in-memory transport stopped: {e}"),
                Err(e) => tracing::error!("in-memory transport failed: {e}"),
                Ok(Ok(())) => {}
            }
        }
        self.drain().await;
    }
}

/// The queue as a [`Source`].
struct MemorySource {
    rx: mpsc::Receiver<Event>,
    in_flight: Arc<InFlight>,
}

#[async_trait]
impl Source for MemorySource {
    type Delivery = MemoryDelivery;
    type Checkpoint = ();

    fn name(&self) -> String {
        "in_memory".to_owned()
    }

    /// An event is never handed out twice: a panic dead-letters it at once.
    fn max_deliver(&self) -> u64 {
        1
    }

    fn committer(&self) -> Arc<dyn Committer<()>> {
        Arc::new(NoCheckpoints)
    }

    async fn fetch(
        &mut self,
        max: usize,
        _shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<MemoryDelivery, ()>> {
        let Some(first) = self.rx.recv().await else {
            return Ok(Fetch::Closed);
        };
        let mut events = vec![first];
        while events.len() < max {
            match self.rx.try_recv() {
                Ok(event) => events.push(event),
                Err(_) => break,
            }
        }
        let deliveries = events
            .into_iter()
            .map(|event| MemoryDelivery {
                payload: Payload::Event(event),
                in_flight: self.in_flight.clone(),
            })
            .collect();
        Ok(Fetch::Batch(deliveries, ()))
    }
}

/// An accepted event; dropping it (once settled) counts it as done for `drain`.
struct MemoryDelivery {
    payload: Payload,
    in_flight: Arc<InFlight>,
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        self.in_flight.end();
    }
}

impl Delivery for MemoryDelivery {
    fn payload(&self) -> &Payload {
        &self.payload
    }

    async fn ack(self, _how: Settled) {}

    /// Only when the dead-letter queue failed (the in-memory one does not): there is no
    /// queue to hand it back to.
    async fn redeliver(self) {
        if let Payload::Event(event) = &self.payload {
            tracing::error!(
                "in-memory transport: event {} could not be settled",
                event.id
            );
        }
    }
}

/// Counts events accepted and not yet processed, and wakes `wait_idle` when it reaches 0.
#[derive(Debug, Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn begin(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn end(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
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
