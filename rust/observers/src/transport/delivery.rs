//! The one delivery loop: every source — in-memory, PostgreSQL, NATS, Redis — is driven by
//! [`run`], so what a source must get right is written once:
//!
//! - the concurrency limit (`max_concurrency` deliveries processed at once; fetched ones wait
//!   for a permit in a queue bounded by one fetch);
//! - panic catching: a panicking event is redelivered, and dead-lettered on its last delivery;
//! - the progress timer (a source's keep-alive while a slow event runs);
//! - `max_deliver`: a delivery beyond it is dead-lettered without running;
//! - undecodable input: dead-lettered under the source's name, action `decode`;
//! - nothing is acknowledged that was neither processed nor dead-lettered: when the
//!   dead-letter queue cannot store an entry, the delivery is handed out again;
//! - the `fraiseql_observer_events_in_flight` gauge;
//! - suspect deliveries (handed out by a run that did not end cleanly, from sources that
//!   keep a [`Ledger`]): each runs alone and is counted in the ledger first; one whose
//!   runs have stopped the engine [`SUSPECT_MAX_DELIVER`] times is dead-lettered without
//!   running — a poison change cannot crash-loop the engine;
//! - shutdown: fetching stops, the deliveries being processed finish and are acknowledged,
//!   those not started are handed back.
//!
//! What differs per source sits behind [`Source`] and [`Delivery`]: how to fetch, acknowledge,
//! redeliver and keep a delivery alive, how often it was delivered, and how a cursor moves.
//! Sources that acknowledge each delivery (NATS, Redis, in-memory) use `()` checkpoints; the
//! PostgreSQL source's checkpoint is its cursor, which [`Committer::commit`] stores once every
//! delivery fetched with it, and before it, is done — in fetch order.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::error::Result;
use crate::event::Event;
pub use crate::event::Undecodable;
use crate::retry::{Backoff, RetryPolicy};
use crate::transport::ledger::Ledger;

/// Deliveries of a suspect change (the first, unseen, in the batch of the run that stopped
/// included) before it is dead-lettered without running.
pub const SUSPECT_MAX_DELIVER: u64 = 3;

/// Fetching again after a source failed (a lost connection, a failed pull).
const FETCH_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(100), Duration::from_secs(10));

/// What a source hands the loop: an event, or input that could not become one.
#[derive(Debug)]
pub enum Payload {
    Event(Event),
    Undecodable(Undecodable),
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every matching observer finished.
    Processed,
    /// It went to the dead-letter queue instead (undecodable, over `max_deliver`, a panic on
    /// its last delivery): the source must not hand it out again.
    DeadLettered,
}

/// One delivery of a source. Its methods return their futures without boxing (most are
/// no-ops or one message to a server, once per event).
pub trait Delivery: Send + Sync + 'static {
    fn payload(&self) -> &Payload;

    /// How many times the source has handed this out, 1 the first time.
    fn delivered(&self) -> u64 {
        1
    }

    /// Attempts its actions already made elsewhere (a forwarder's pipelined batch publish).
    fn attempts_made(&self) -> u32 {
        0
    }

    /// Handed out before by a run that did not end cleanly, and maybe what ended it: run
    /// alone, and counted in the source's [`Ledger`] first.
    fn suspect(&self) -> bool {
        false
    }

    /// Done: processed or dead-lettered.
    fn ack(self, how: Settled) -> impl Future<Output = ()> + Send;

    /// Not done: to be handed out again.
    fn redeliver(self) -> impl Future<Output = ()> + Send;

    /// Still being worked on (a keep-alive, every [`Source::progress_every`]).
    fn progress(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// What one fetch got.
pub enum Fetch<D, C> {
    /// Deliveries, and the checkpoint to commit once they (and every earlier batch) are done.
    /// May be empty with a checkpoint: input that needed no processing (a forwarder's batch
    /// that was published at once).
    Batch(Vec<D>, C),
    /// Nothing arrived while waiting; fetch again.
    Idle,
    /// The source is exhausted (the in-memory queue was closed): stop once all is done.
    Closed,
}

/// Stores a source's checkpoints. Separate from the source so that a checkpoint can be stored
/// while a fetch is waiting.
#[async_trait]
pub trait Committer<C>: Send + Sync {
    async fn commit(&self, checkpoint: C) -> Result<()>;
}

/// The committer of sources that acknowledge each delivery.
pub struct NoCheckpoints;

#[async_trait]
impl Committer<()> for NoCheckpoints {
    async fn commit(&self, _checkpoint: ()) -> Result<()> {
        Ok(())
    }
}

/// Where deliveries come from.
#[async_trait]
pub trait Source: Send + Sized + 'static {
    type Delivery: Delivery;
    type Checkpoint: Send + 'static;

    /// The name in logs and dead letters: `postgres:<listener_id>`, `nats:<stream>`,
    /// `redis:<stream>`, `in_memory`.
    fn name(&self) -> String;

    /// Deliveries of one event before it is given up on: a delivery beyond this is
    /// dead-lettered without running, and one that panics on this delivery is dead-lettered.
    /// 1 for sources that cannot redeliver on their own.
    fn max_deliver(&self) -> u64;

    /// How often a delivery being processed is kept alive ([`Delivery::progress`]).
    fn progress_every(&self) -> Option<Duration> {
        None
    }

    /// `None` (the default): each fetch asks for as many deliveries as there are free
    /// permits. `Some(n)`: the source reads batches of its own size, and `n` more may be read
    /// while the oldest is being processed, whatever the permits.
    fn read_ahead(&self) -> Option<usize> {
        None
    }

    fn committer(&self) -> Arc<dyn Committer<Self::Checkpoint>>;

    /// Where a source that cannot count deliveries itself counts its suspect ones; cleared
    /// when the loop ends cleanly.
    fn ledger(&self) -> Option<Arc<Ledger>> {
        None
    }

    /// Up to `max` deliveries (a source that reads in batches of its own may return more).
    /// Waits for input up to an interval of the source's own, or until `shutdown` turns true.
    /// An error is logged and the fetch tried again after a backoff.
    async fn fetch(
        &mut self,
        max: usize,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Fetch<Self::Delivery, Self::Checkpoint>>;

    /// A delivery fetched after the last commit must be handed out again: the next fetch
    /// starts after the last checkpoint stored. Called before the next fetch.
    async fn rewind(&mut self) {}

    /// The loop is done.
    async fn close(&mut self) {}
}

/// Drives `source` into `engine` with up to `max_concurrency` deliveries at once until
/// `shutdown` turns true (or its sender is dropped) or the source is closed. See the module
/// documentation.
pub async fn run<S: Source>(
    source: S,
    engine: Arc<Engine>,
    max_concurrency: usize,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let ctx = Arc::new(Context {
        engine,
        name: source.name(),
        max_deliver: source.max_deliver().max(1),
        progress_every: source.progress_every(),
        ledger: source.ledger(),
    });
    let max_concurrency = max_concurrency.max(1);
    let read_ahead = source.read_ahead();
    let committer = source.committer();
    let mut batches = Batches::default();
    let mut waiting = Waiting::<S::Delivery>::default();
    let mut keys = Keys::<S::Delivery>::default();
    let max_held = max_concurrency.saturating_mul(MAX_HELD_PER_SLOT);
    let mut running = FuturesUnordered::new();
    let mut backoff = Backoff::new(FETCH_RETRY);
    let mut idle = Some(source);
    let mut fetching = None;
    let mut rewind = false;
    let mut closed = false;
    let mut stopping = false;
    // A suspect delivery is running: nothing else starts until it is done.
    let mut alone = false;
    let mut left_running = false;
    // After a failed fetch, when to fetch again. The deliveries in flight go on meanwhile.
    let mut retry_at: Option<tokio::time::Instant> = None;
    // Once stopping: how long the deliveries running may take to finish.
    let mut give_up_at = tokio::time::Instant::now();
    loop {
        while running.len() < max_concurrency && !alone {
            let Some((batch, delivery, key)) = keys.next(&mut waiting, &ctx.engine) else {
                break;
            };
            if delivery.suspect() && ctx.ledger.is_some() {
                if !running.is_empty() {
                    keys.put_back((batch, delivery, key));
                    break;
                }
                alone = true;
            }
            running.push(settle(ctx.clone(), batch, delivery, key));
        }
        if batches.front_done() {
            batches.commit_done(committer.as_ref(), &ctx.name).await;
        }
        if stopping && running.is_empty() {
            break;
        }
        if closed && running.is_empty() && waiting.is_empty() && keys.is_empty() {
            break;
        }
        let room = max_concurrency.saturating_sub(running.len() + waiting.len() + keys.ready());
        // Deliveries held behind a busy key are bounded too: past the limit, no more is
        // fetched until a key moves.
        let wanted = keys.held() < max_held
            && match read_ahead {
                None => room > 0,
                Some(ahead) => batches.len() <= ahead,
            };
        let backing_off = retry_at.is_some_and(|t| t > tokio::time::Instant::now());
        if fetching.is_none() && !closed && !stopping && wanted && !backing_off {
            retry_at = None;
            let mut source = idle.take().expect("the source is idle when not fetching");
            let mut stop = shutdown.clone();
            let rewind_first = std::mem::take(&mut rewind);
            fetching = Some(Box::pin(async move {
                if rewind_first {
                    source.rewind().await;
                }
                let fetched = source.fetch(room, &mut stop).await;
                (source, fetched)
            }));
        }
        tokio::select! {
            biased;
            changed = shutdown.changed(), if !stopping => {
                if changed.is_err() || *shutdown.borrow() {
                    stopping = true;
                    give_up_at = tokio::time::Instant::now() + ctx.engine.shutdown_timeout();
                }
            }
            () = tokio::time::sleep_until(give_up_at), if stopping && !running.is_empty() => {
                tracing::warn!(
                    "{}: {} deliveries still running after shutdown_timeout_secs ({:?}); left \
                     unacknowledged, they will be delivered again",
                    ctx.name,
                    running.len(),
                    ctx.engine.shutdown_timeout()
                );
                left_running = true;
                break;
            }
            Some((batch, outcome, key)) = running.next(), if !running.is_empty() => {
                keys.release(key);
                let mut again = batches.settled(batch, outcome);
                // Whatever else has finished too, without another turn of the loop.
                while let Some(Some((batch, outcome, key))) = running.next().now_or_never() {
                    keys.release(key);
                    again |= batches.settled(batch, outcome);
                }
                alone &= !running.is_empty();
                if again {
                    // Something could not be settled (the dead-letter queue failed): read
                    // it again, but not at once.
                    rewind = true;
                    retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                }
            }
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() && fetching.is_none() => {}
            (source, fetched) = async { fetching.as_mut().expect("checked").await },
                if fetching.is_some() =>
            {
                fetching = None;
                idle = Some(source);
                match fetched {
                    Ok(Fetch::Batch(deliveries, checkpoint)) => {
                        backoff.reset();
                        let batch = batches.push(deliveries.len(), checkpoint);
                        waiting.push(batch, deliveries);
                    }
                    Ok(Fetch::Idle) => backoff.reset(),
                    Ok(Fetch::Closed) => closed = true,
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!("{}: {e}; retrying in {delay:?}", ctx.name);
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
        }
        if stopping {
            // Not started: handed back to the source, for this instance or another.
            for delivery in keys
                .drain()
                .chain(std::iter::from_fn(|| waiting.next().map(|(_, d)| d)))
            {
                delivery.redeliver().await;
            }
        }
    }
    // A fetch still waiting sees the shutdown and returns at once.
    if let Some(fetch) = fetching.take() {
        let (source, _) = fetch.await;
        idle = Some(source);
    }
    batches.commit_done(committer.as_ref(), &ctx.name).await;
    if let (Some(ledger), false) = (&ctx.ledger, left_running) {
        ledger.clear().await;
    }
    if let Some(mut source) = idle {
        source.close().await;
    }
    Ok(())
}

/// Sleeps `delay`; true if shutdown was requested meanwhile.
pub(crate) async fn sleep_or_stop(shutdown: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
    }
}

/// What every delivery's processing shares.
struct Context {
    engine: Arc<Engine>,
    name: String,
    max_deliver: u64,
    progress_every: Option<Duration>,
    ledger: Option<Arc<Ledger>>,
}

/// Whether a delivery was settled for good or handed out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    Redelivered,
}

/// Processes one delivery to the end and settles it with the source; hands its ordering
/// key back, for the next delivery of that key.
async fn settle<D: Delivery>(
    ctx: Arc<Context>,
    batch: u64,
    delivery: D,
    key: Option<u64>,
) -> (u64, Outcome, Option<u64>) {
    let in_flight = &ctx.engine.metrics().events_in_flight;
    in_flight.inc();
    let verdict = decide(&ctx, &delivery).await;
    if let (Some(_), true, Some(ledger), Payload::Event(event)) =
        (verdict, delivery.suspect(), &ctx.ledger, delivery.payload())
    {
        // Done: a later stop in the same batch must not count against it.
        Box::pin(ledger.finished(&event.id)).await;
    }
    let outcome = match verdict {
        Some(how) => {
            delivery.ack(how).await;
            Outcome::Acked
        }
        None => {
            delivery.redeliver().await;
            Outcome::Redelivered
        }
    };
    in_flight.dec();
    (batch, outcome, key)
}

/// How to settle a delivery; `None`: hand it out again.
async fn decide<D: Delivery>(ctx: &Context, delivery: &D) -> Option<Settled> {
    let engine = &ctx.engine;
    let delivered = delivery.delivered();
    let event = match delivery.payload() {
        Payload::Undecodable(input) => {
            tracing::error!(
                "{}: undecodable input {}: {}",
                ctx.name,
                input.id,
                input.reason
            );
            // Boxed, as every rare path here: the future of each delivery stays small.
            let stored = Box::pin(engine.dead_letter_undecodable(&ctx.name, input)).await;
            return stored.then_some(Settled::DeadLettered);
        }
        Payload::Event(event) => event,
    };
    // A suspect's deliveries are counted in the ledger, against a limit of their own; a panic
    // is given up on as the source says (at once for the PostgreSQL sources).
    let (delivered, limit) = match (delivery.suspect(), &ctx.ledger) {
        (true, Some(ledger)) => match Box::pin(count_suspect(&ctx.name, ledger, event)).await {
            Some(delivered) => (delivered, SUSPECT_MAX_DELIVER),
            None => return None,
        },
        _ => (delivered, ctx.max_deliver),
    };
    if delivered > limit {
        let reason = if delivery.suspect() {
            format!(
                "the engine stopped (killed or crashed) while processing it at least {} times; \
                 dead-lettered without running it again",
                delivered - 1
            )
        } else {
            format!(
                "delivered {delivered} times (max_deliver = {limit}) without being acknowledged"
            )
        };
        tracing::error!(
            "{}: event {}: {reason}; dead-lettering it",
            ctx.name,
            event.id
        );
        return Box::pin(give_up(engine, event, &reason, delivered)).await;
    }
    let processing =
        AssertUnwindSafe(engine.process_after(event, delivery.attempts_made())).catch_unwind();
    tokio::pin!(processing);
    // Most events are done on their first poll (no observer matched, an in-process action):
    // they arm no timer, and the keep-alive's state is allocated only for the others.
    let outcome = match futures::poll!(processing.as_mut()) {
        std::task::Poll::Ready(done) => done,
        std::task::Poll::Pending => match ctx.progress_every {
            None => processing.await,
            Some(every) => Box::pin(keep_alive(delivery, every, processing)).await,
        },
    };
    match outcome {
        Ok(report) if report.unstored == 0 => Some(Settled::Processed),
        Ok(report) => {
            tracing::error!(
                "{}: event {}: {} dead letter(s) could not be stored; it will be redelivered",
                ctx.name,
                event.id,
                report.unstored
            );
            None
        }
        Err(panic) if delivered >= ctx.max_deliver => {
            let reason = format!(
                "processing panicked on delivery {delivered} (max_deliver = {}): {}",
                ctx.max_deliver,
                panic_message(&panic)
            );
            tracing::error!(
                "{}: event {}: {reason}; dead-lettering it",
                ctx.name,
                event.id
            );
            Box::pin(give_up(engine, event, &reason, delivered)).await
        }
        Err(panic) => {
            tracing::error!(
                "{}: processing event {} panicked (delivery {delivered}): {}; it will be \
                 redelivered",
                ctx.name,
                event.id,
                panic_message(&panic)
            );
            None
        }
    }
}

/// Counts a suspect delivery in the ledger before it runs: its delivery number (the first,
/// in the batch of the run that stopped, was not counted); `None` if it cannot be counted.
async fn count_suspect(name: &str, ledger: &Ledger, event: &Event) -> Option<u64> {
    match ledger.count(&event.id).await {
        Ok(counted) => {
            let delivered = counted + 1;
            if delivered <= SUSPECT_MAX_DELIVER {
                tracing::warn!(
                    "{name}: event {} was handed out when the engine last stopped without \
                     finishing: running it alone (delivery {delivered} of at most \
                     {SUSPECT_MAX_DELIVER})",
                    event.id
                );
            }
            Some(delivered)
        }
        Err(e) => {
            tracing::error!("{name}: event {}: {e}; it will be read again", event.id);
            None
        }
    }
}

/// Dead-letters `event` for every observer it matches, without running them.
async fn give_up(engine: &Engine, event: &Event, reason: &str, delivered: u64) -> Option<Settled> {
    let attempts = u32::try_from(delivered).unwrap_or(u32::MAX);
    let stored = engine.dead_letter_event(event, reason, attempts).await;
    stored.ok().map(|_| Settled::DeadLettered)
}

/// Drives `work`, keeping `delivery` alive every `every` while it is pending. Takes the work
/// pinned, not by value, so that it is not stored twice in the delivery's future.
async fn keep_alive<D: Delivery, F: Future>(
    delivery: &D,
    every: Duration,
    mut work: std::pin::Pin<&mut F>,
) -> F::Output {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            done = work.as_mut() => return done,
            _ = ticker.tick() => delivery.progress().await,
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Deliveries fetched and not started yet, batch by batch: each batch's deliveries stay in
/// the vector they were fetched in until started (copying them into one queue was measured
/// to cost more, in the allocator, than the loop itself).
struct Waiting<D> {
    batches: VecDeque<(u64, std::vec::IntoIter<D>)>,
    len: usize,
}

impl<D> Default for Waiting<D> {
    fn default() -> Self {
        Waiting {
            batches: VecDeque::new(),
            len: 0,
        }
    }
}

impl<D> Waiting<D> {
    fn push(&mut self, batch: u64, deliveries: Vec<D>) {
        self.len += deliveries.len();
        self.batches.push_back((batch, deliveries.into_iter()));
    }

    fn next(&mut self) -> Option<(u64, D)> {
        while let Some((batch, deliveries)) = self.batches.front_mut() {
            if let Some(delivery) = deliveries.next() {
                self.len -= 1;
                return Some((*batch, delivery));
            }
            self.batches.pop_front();
        }
        None
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Deliveries held per key, beyond `max_concurrency` deliveries, at most this many times
/// `max_concurrency`.
const MAX_HELD_PER_SLOT: usize = 4;

/// Per-key order: a delivery whose key (the engine's [`Engine::order_key`]) is being
/// processed waits behind it, in fetch order, and starts when it is done; other keys go on.
/// A delivery whose processing ends — processed, dead-lettered or handed out again — frees
/// its key.
struct Keys<D> {
    /// Keys being processed, with the deliveries waiting behind each.
    busy: HashMap<u64, VecDeque<(u64, D)>, BuildHasherDefault<KeyHasher>>,
    /// Deliveries whose key became free: they start before anything fetched later.
    ready: VecDeque<(u64, D, Option<u64>)>,
    held: usize,
}

/// Keys are hashes already: used as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl<D> Default for Keys<D> {
    fn default() -> Self {
        Keys {
            busy: HashMap::default(),
            ready: VecDeque::new(),
            held: 0,
        }
    }
}

impl<D: Delivery> Keys<D> {
    /// The next delivery that may start, and its key.
    fn next(&mut self, waiting: &mut Waiting<D>, engine: &Engine) -> Option<(u64, D, Option<u64>)> {
        if let Some(ready) = self.ready.pop_front() {
            return Some(ready);
        }
        while let Some((batch, delivery)) = waiting.next() {
            let key = match delivery.payload() {
                Payload::Event(event) => engine.order_key(event),
                Payload::Undecodable(_) => None,
            };
            let Some(key) = key else {
                return Some((batch, delivery, None));
            };
            match self.busy.get_mut(&key) {
                Some(behind) => {
                    behind.push_back((batch, delivery));
                    self.held += 1;
                }
                None => {
                    self.busy.insert(key, VecDeque::new());
                    return Some((batch, delivery, Some(key)));
                }
            }
        }
        None
    }

    /// A delivery taken with [`Self::next`] that may not start yet: the next one out.
    fn put_back(&mut self, taken: (u64, D, Option<u64>)) {
        self.ready.push_front(taken);
    }

    /// The delivery of `key` is done: the next one of that key may start.
    fn release(&mut self, key: Option<u64>) {
        let Some(key) = key else {
            return;
        };
        let next = self.busy.get_mut(&key).and_then(VecDeque::pop_front);
        match next {
            Some((batch, delivery)) => {
                self.held -= 1;
                self.ready.push_back((batch, delivery, Some(key)));
            }
            None => {
                self.busy.remove(&key);
            }
        }
    }

    fn ready(&self) -> usize {
        self.ready.len()
    }

    fn held(&self) -> usize {
        self.held
    }

    fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.held == 0
    }

    /// Everything not started, for a stop.
    fn drain(&mut self) -> impl Iterator<Item = D> + '_ {
        self.held = 0;
        let held: Vec<D> = self
            .busy
            .values_mut()
            .flat_map(|q| q.drain(..).map(|(_, d)| d))
            .collect();
        self.ready.drain(..).map(|(_, d, _)| d).chain(held)
    }
}

/// The batches fetched and not yet committed, in fetch order.
struct Batches<C> {
    queue: VecDeque<Batch<C>>,
    next: u64,
}

impl<C> Default for Batches<C> {
    fn default() -> Self {
        Batches {
            queue: VecDeque::new(),
            next: 0,
        }
    }
}

struct Batch<C> {
    seq: u64,
    remaining: usize,
    checkpoint: Option<C>,
    /// A delivery of it (or of a batch before it) was handed out again: it is read again,
    /// so its checkpoint must not be stored.
    spoiled: bool,
}

impl<C> Batches<C> {
    fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether the oldest batch is done (something to commit or drop).
    fn front_done(&self) -> bool {
        self.queue.front().is_some_and(|b| b.remaining == 0)
    }

    fn push(&mut self, deliveries: usize, checkpoint: C) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.queue.push_back(Batch {
            seq,
            remaining: deliveries,
            checkpoint: Some(checkpoint),
            spoiled: false,
        });
        seq
    }

    /// Records a settled delivery. True when the source must rewind: a delivery was handed
    /// out again, so its batch and every later one are read again.
    fn settled(&mut self, seq: u64, outcome: Outcome) -> bool {
        let Some(at) = self.queue.iter().position(|b| b.seq == seq) else {
            return false;
        };
        self.queue[at].remaining -= 1;
        if outcome == Outcome::Acked || self.queue[at].spoiled {
            return false;
        }
        for batch in self.queue.iter_mut().skip(at) {
            batch.spoiled = true;
        }
        true
    }

    /// Stores the checkpoints of the leading batches that are done; drops spoiled ones.
    async fn commit_done<K: Committer<C> + ?Sized>(&mut self, committer: &K, name: &str) {
        while self.queue.front().is_some_and(|b| b.remaining == 0) {
            let mut batch = self.queue.pop_front().expect("checked");
            if batch.spoiled {
                continue;
            }
            if let Some(checkpoint) = batch.checkpoint.take() {
                if let Err(e) = committer.commit(checkpoint).await {
                    // Not stored: a restart reads the batch again (at least once).
                    tracing::warn!("{name}: cannot store the position: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::action::{Action, ActionError};
    use crate::checkpoint::{CheckpointStrategy, ListenerConfig, MemoryIdempotencyStores};
    use crate::engine::ObserverSpec;
    use crate::event::EventKind;

    /// Takes a second per event.
    struct Slow;

    #[async_trait]
    impl Action for Slow {
        fn kind(&self) -> &'static str {
            "slow"
        }
        async fn execute(&self, _event: &Event) -> std::result::Result<(), ActionError> {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(())
        }
    }

    /// Counts its keep-alives and its ack.
    struct Counted {
        payload: Payload,
        progress: Arc<AtomicUsize>,
        acked: Arc<AtomicUsize>,
    }

    impl Delivery for Counted {
        fn payload(&self) -> &Payload {
            &self.payload
        }
        async fn ack(self, _how: Settled) {
            self.acked.fetch_add(1, Ordering::SeqCst);
        }
        async fn redeliver(self) {}
        async fn progress(&self) {
            self.progress.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Hands out one delivery, then fails every fetch (a server that went away).
    struct FailsAfterOne(Option<Counted>);

    #[async_trait]
    impl Source for FailsAfterOne {
        type Delivery = Counted;
        type Checkpoint = ();
        fn name(&self) -> String {
            "test".into()
        }
        fn max_deliver(&self) -> u64 {
            1
        }
        fn progress_every(&self) -> Option<Duration> {
            Some(Duration::from_millis(50))
        }
        fn committer(&self) -> Arc<dyn Committer<()>> {
            Arc::new(NoCheckpoints)
        }
        async fn fetch(
            &mut self,
            _max: usize,
            _shutdown: &mut watch::Receiver<bool>,
        ) -> Result<Fetch<Counted, ()>> {
            match self.0.take() {
                Some(d) => Ok(Fetch::Batch(vec![d], ())),
                None => Err(crate::error::Error::Transport("gone".into())),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_in_flight_go_on_while_a_failed_fetch_backs_off() {
        let spec = ObserverSpec::new(
            ListenerConfig::new("slow", CheckpointStrategy::AtLeastOnce),
            "Order",
            EventKind::Insert,
        )
        .action(Arc::new(Slow));
        let engine = Engine::new(
            vec![spec],
            Arc::new(crate::dlq::MemoryDlq::new(None)),
            &MemoryIdempotencyStores::default(),
            Arc::new(crate::metrics::Metrics::new()),
        )
        .unwrap();
        let (progress, acked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let event = Event::new(
            "Order",
            EventKind::Insert,
            "tb_order",
            Some(serde_json::json!({"id": 1})),
            None,
        );
        let source = FailsAfterOne(Some(Counted {
            payload: Payload::Event(event),
            progress: progress.clone(),
            acked: acked.clone(),
        }));
        let (stop, shutdown) = watch::channel(false);
        let running = tokio::spawn(run(source, Arc::new(engine), 4, shutdown));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            acked.load(Ordering::SeqCst),
            1,
            "done while the fetches back off"
        );
        // Kept alive every 50 ms through its second, not only between backoff sleeps.
        assert!(progress.load(Ordering::SeqCst) >= 15, "{progress:?}");
        stop.send(true).unwrap();
        running.await.unwrap().unwrap();
    }

    #[test]
    fn a_redelivery_spoils_its_batch_and_every_later_one() {
        let mut b = Batches::default();
        let first = b.push(3, 1);
        let second = b.push(1, 2);
        assert!(!b.settled(first, Outcome::Acked));
        assert!(b.settled(second, Outcome::Redelivered));
        assert!(!b.queue[0].spoiled && b.queue[1].spoiled);
        assert!(
            b.settled(first, Outcome::Redelivered),
            "the first batch is read again too"
        );
        assert!(b.queue.iter().all(|x| x.spoiled));
        assert!(
            !b.settled(first, Outcome::Redelivered),
            "already to be read again"
        );
    }

    #[tokio::test]
    async fn only_leading_finished_unspoiled_batches_are_committed() {
        struct Record(std::sync::Mutex<Vec<u32>>);
        #[async_trait]
        impl Committer<u32> for Record {
            async fn commit(&self, c: u32) -> Result<()> {
                self.0.lock().unwrap().push(c);
                Ok(())
            }
        }
        let record = Record(Default::default());
        let mut b = Batches::default();
        let one = b.push(1, 1);
        let two = b.push(1, 2);
        let three = b.push(0, 3);
        b.settled(two, Outcome::Acked);
        b.commit_done(&record, "t").await;
        assert!(record.0.lock().unwrap().is_empty(), "the first is not done");
        b.settled(one, Outcome::Acked);
        b.commit_done(&record, "t").await;
        assert_eq!(*record.0.lock().unwrap(), [1, 2, 3]);
        let four = b.push(1, 4);
        let five = b.push(1, 5);
        b.settled(four, Outcome::Redelivered);
        b.settled(five, Outcome::Acked);
        b.commit_done(&record, "t").await;
        assert_eq!(*record.0.lock().unwrap(), [1, 2, 3], "spoiled: read again");
        assert_eq!(b.len(), 0);
        let _ = three;
    }
}
