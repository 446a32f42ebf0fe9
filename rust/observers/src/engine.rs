//! The observer engine: for each event, the observers of its (entity, event) in definition
//! order → condition → checkpoint strategy → actions with retries → DLQ when exhausted.
//!
//! The engine owns no runtime and no queue; transports call [`Engine::process`] from their
//! own tasks, with their own bounded concurrency, and acknowledge when it returns.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::action::{Action, ActionError, FailureReason};
use crate::checkpoint::{
    CheckpointStrategy, ClaimStamp, IdempotencyStore, IdempotencyStores, ListenerConfig,
};
use crate::condition::Condition;
use crate::config::HandlerConfig;
use crate::dlq::{DeadLetterQueue, DlqEntry, DlqOrigin, PushOutcome, RetryFailure};
use crate::error::{DeadLetterErrorKind, Error, Result};
use crate::schema::Schema;
use serde::Serialize;
use serde_json::Value;

use crate::event::{now_rfc3339, Event, EventKind, Undecodable};

/// The action name of dead-letter entries that hold undecodable input.
pub const UNDECODABLE_ACTION: &str = "decode";
use crate::metrics::{ActionMetrics, Metrics, ObserverMetrics};
use crate::order::{kind_slot, OrderKeys};
use crate::recent::{ObserverOutcome, Outcome, Recent, RecentEvent};
use crate::retry::RetryPolicy;
use crate::telemetry::{Recorded, Spans};

/// One observer, ready to be compiled into the engine: who it is and how it checkpoints
/// (its [`ListenerConfig`]), what it watches, when it fires and what it does.
///
/// ```
/// use std::sync::Arc;
/// use fraiseql_observers::{CheckpointStrategy, EventKind, ListenerConfig, NoopAction, ObserverSpec};
///
/// let spec = ObserverSpec::new(
///     ListenerConfig::new("charge_customer", CheckpointStrategy::AtLeastOnce),
///     "Order",
///     EventKind::Insert,
/// )
/// .action(Arc::new(NoopAction));
/// assert_eq!(spec.name(), "charge_customer");
/// ```
pub struct ObserverSpec {
    /// The observer's name (the listener id of its idempotency keys and dead letters) and its
    /// checkpoint strategy.
    pub listener: ListenerConfig,
    pub entity: String,
    pub event: EventKind,
    pub condition: Option<Condition>,
    pub retry: RetryPolicy,
    pub actions: Vec<Arc<dyn Action>>,
    /// Per-key order: the columns whose values key the changes this observer sees one at a
    /// time, in commit order (default `["id"]`); `None`: any order.
    pub ordering: Option<Vec<String>>,
    /// Its entity is a declared type: a change without a field its condition or templates
    /// read is reported (schema drift) rather than silently never matching.
    pub check_fields: bool,
}

impl ObserverSpec {
    /// An observer of `event` on `entity` with no condition, the default retry policy and no
    /// action yet.
    pub fn new(listener: ListenerConfig, entity: impl Into<String>, event: EventKind) -> Self {
        ObserverSpec {
            listener,
            entity: entity.into(),
            event,
            condition: None,
            retry: RetryPolicy::default(),
            actions: Vec::new(),
            ordering: Some(default_order_key()),
            check_fields: false,
        }
    }

    /// Per-key order on these columns, or (`None`) any order.
    pub fn ordering(mut self, columns: Option<Vec<String>>) -> Self {
        self.ordering = columns;
        self
    }

    /// Turns a validated handler declaration into an engine observer: resolves the entity
    /// against `schema` and compiles the condition against its declared fields.
    pub fn from_handler(
        schema: &Schema,
        handler: &HandlerConfig,
        actions: Vec<Arc<dyn Action>>,
    ) -> Result<ObserverSpec> {
        let entity = schema.resolve(&handler.name, &handler.entity)?;
        let condition = match &handler.condition {
            Some(expr) => {
                let fields = entity.map(|e| e.fields.as_slice());
                let compiled = Condition::compile(expr, fields).and_then(|c| {
                    c.check_kinds(|field| entity.and_then(|e| e.kind(field)))?;
                    Ok(c)
                });
                Some(compiled.map_err(|source| Error::Condition {
                    observer: handler.name.clone(),
                    origin: handler.origin.clone(),
                    source: Box::new(source),
                })?)
            }
            None => None,
        };
        Ok(ObserverSpec {
            listener: ListenerConfig::new(
                handler.name.clone(),
                CheckpointStrategy::from(&handler.checkpoint),
            ),
            entity: handler.entity.clone(),
            event: handler.event.parse().map_err(Error::Schema)?,
            condition,
            retry: RetryPolicy::from(&handler.retry),
            actions,
            ordering: match handler.ordering.unwrap_or_default() {
                crate::config::Ordering::None => None,
                crate::config::Ordering::PerKey => {
                    Some(handler.order_key.clone().unwrap_or_else(default_order_key))
                }
            },
            check_fields: entity.is_some(),
        })
    }

    pub fn condition(mut self, condition: Condition) -> Self {
        self.condition = Some(condition);
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Adds an action; actions run in the order they were added.
    pub fn action(mut self, action: Arc<dyn Action>) -> Self {
        self.actions.push(action);
        self
    }

    pub fn name(&self) -> &str {
        &self.listener.listener_id
    }

    pub fn checkpoint(&self) -> &CheckpointStrategy {
        &self.listener.checkpoint
    }
}

struct CompiledObserver {
    name: String,
    entity: String,
    event: EventKind,
    ordering: Option<Vec<String>>,
    condition: Option<Condition>,
    retry: RetryPolicy,
    idempotency: Option<Arc<dyn IdempotencyStore>>,
    actions: Vec<(Arc<dyn Action>, ActionMetrics)>,
    metrics: ObserverMetrics,
    /// The top-level fields its condition and templates read, checked on every change when
    /// its entity is declared (empty otherwise).
    reads: Box<[Box<str>]>,
}

/// What happened to one event.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessReport {
    /// Observers whose entity, event and condition matched.
    pub matched: usize,
    /// Observers skipped as EffectivelyOnce duplicates.
    pub duplicates: usize,
    /// Actions that exhausted their retries and were dead-lettered (or dropped on overflow).
    pub dead_lettered: usize,
    /// Dead letters that could not be stored: the event must be delivered again, not
    /// acknowledged.
    pub unstored: usize,
}

pub struct Engine {
    observers: Vec<CompiledObserver>,
    /// entity → observer indices per event kind, in definition order.
    index: HashMap<String, [Vec<usize>; 3]>,
    dlq: Arc<dyn DeadLetterQueue>,
    metrics: Arc<Metrics>,
    /// What its dead letters are: an observer's, or a forwarder's change.
    origin: DlqOrigin,
    spans: Spans,
    warned_traceparent: AtomicBool,
    shutdown_timeout: std::time::Duration,
    in_flight: InFlight,
    /// What keys per-key order (shared with a publisher that partitions by it).
    order: Arc<OrderKeys>,
    /// The last events processed and what each observer did with them, for the console;
    /// `None` (the default) keeps nothing.
    recent: Option<Recent>,
    /// (observer, field) pairs seen missing from a captured change, first time first.
    missing_fields: std::sync::Mutex<Vec<MissingField>>,
}

/// A field an observer reads that a captured change did not have: a column renamed or
/// dropped under a running observer (schema drift).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MissingField {
    pub observer: String,
    pub entity: String,
    pub field: String,
    /// The first change seen without it.
    pub event_id: String,
    pub first_seen: String,
}

/// At most this many (observer, field) pairs are kept for `/health`; all are counted.
const MAX_MISSING_FIELDS: usize = 100;

/// The events being processed: what `/health` reports when one takes too long.
#[derive(Default)]
struct InFlight {
    next: std::sync::atomic::AtomicU64,
    events: std::sync::Mutex<HashMap<u64, Processing>>,
}

/// One event being processed, and the observer it is at.
#[derive(Debug, Clone)]
pub struct Processing {
    pub event_id: String,
    pub entity: String,
    pub key: Option<String>,
    pub observer: Option<String>,
    pub since: Instant,
}

/// Removes an event from the in-flight set however its processing ends.
struct Tracked<'a> {
    set: &'a InFlight,
    slot: u64,
}

impl Tracked<'_> {
    fn at(&self, observer: &str) {
        if let Some(p) = self
            .set
            .events
            .lock()
            .expect("in-flight lock")
            .get_mut(&self.slot)
        {
            p.observer = Some(observer.to_owned());
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.set
            .events
            .lock()
            .expect("in-flight lock")
            .remove(&self.slot);
    }
}

impl InFlight {
    fn track(&self, event: &Event) -> Tracked<'_> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        self.events.lock().expect("in-flight lock").insert(
            slot,
            Processing {
                event_id: event.id.clone(),
                entity: event.entity.clone(),
                key: event.key(),
                observer: None,
                since: Instant::now(),
            },
        );
        Tracked { set: self, slot }
    }
}

fn default_order_key() -> Vec<String> {
    vec!["id".to_owned()]
}

/// `[observers] shutdown_timeout_secs` by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A backfilled row goes only to the observers its backfill names (all, if it names none).
fn backfill_is_for(event: &Event, observer: &str) -> bool {
    event
        .backfill
        .as_ref()
        .is_none_or(|b| b.observers.is_empty() || b.observers.iter().any(|o| o == observer))
}

impl Engine {
    /// Compiles the observers. Names must be unique: they are the listener ids that key
    /// idempotency records and DLQ entries.
    pub fn new(
        specs: Vec<ObserverSpec>,
        dlq: Arc<dyn DeadLetterQueue>,
        stores: &dyn IdempotencyStores,
        metrics: Arc<Metrics>,
    ) -> Result<Engine> {
        let mut observers = Vec::with_capacity(specs.len());
        let mut index: HashMap<String, [Vec<usize>; 3]> = HashMap::new();
        let mut order = OrderKeys::default();
        for (i, spec) in specs.into_iter().enumerate() {
            if observers
                .iter()
                .any(|o: &CompiledObserver| o.name == spec.name())
            {
                return Err(Error::Schema(format!(
                    "observer name `{}` is declared twice; names identify observers in the DLQ and idempotency tables and must be unique",
                    spec.name()
                )));
            }
            if spec.actions.is_empty() {
                return Err(Error::Schema(format!(
                    "observer `{}` has no action",
                    spec.name()
                )));
            }
            index.entry(spec.entity.clone()).or_default()[kind_slot(spec.event)].push(i);
            if let Some(columns) = &spec.ordering {
                order.add(&spec.entity, spec.event, columns);
            }
            let idempotency = match spec.checkpoint() {
                CheckpointStrategy::AtLeastOnce => None,
                CheckpointStrategy::EffectivelyOnce { idempotency_table } => {
                    Some(stores.store_for(idempotency_table))
                }
            };
            let reads = if spec.check_fields {
                fields_read(&spec)
            } else {
                Box::default()
            };
            let actions = spec
                .actions
                .into_iter()
                .map(|a| {
                    let m = metrics.action(&spec.listener.listener_id, a.kind());
                    (a, m)
                })
                .collect();
            observers.push(CompiledObserver {
                metrics: metrics.observer(&spec.listener.listener_id),
                name: spec.listener.listener_id,
                entity: spec.entity,
                event: spec.event,
                ordering: spec.ordering,
                condition: spec.condition,
                retry: spec.retry,
                idempotency,
                actions,
                reads,
            });
        }
        Ok(Engine {
            observers,
            index,
            dlq,
            metrics,
            origin: DlqOrigin::Observer,
            spans: Spans::default(),
            warned_traceparent: AtomicBool::new(false),
            missing_fields: std::sync::Mutex::default(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            in_flight: InFlight::default(),
            order: Arc::new(order),
            recent: None,
        })
    }

    /// The key `event` is ordered by, if an observer of it asks for per-key order
    /// ([`OrderKeys::key`]).
    pub fn order_key(&self, event: &Event) -> Option<u64> {
        self.order.key(event)
    }

    /// What keys per-key order, for a publisher that partitions the stream by it.
    pub fn order_keys(&self) -> Arc<OrderKeys> {
        self.order.clone()
    }

    /// The event processed for the longest time now, if any.
    pub fn oldest_in_flight(&self) -> Option<Processing> {
        self.in_flight
            .events
            .lock()
            .expect("in-flight lock")
            .values()
            .min_by_key(|p| p.since)
            .cloned()
    }

    /// How long a stopping source waits for the deliveries running (`[observers]
    /// shutdown_timeout_secs`); what has not finished by then is left unacknowledged.
    pub fn with_shutdown_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    pub fn shutdown_timeout(&self) -> std::time::Duration {
        self.shutdown_timeout
    }

    /// Records spans of what it does (see [`crate::telemetry`]).
    pub fn with_spans(mut self, spans: Spans) -> Self {
        self.spans = spans;
        self
    }

    /// The engine of a forwarder (the bridge, the Redis forwarder): its dead letters are
    /// changes that could not be published (origin `forwarder`).
    pub fn forwarding(mut self) -> Self {
        self.origin = DlqOrigin::Forwarder;
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs every matching observer for `event` to completion — success, or dead-lettered —
    /// in definition order. When this returns, the event may be acknowledged.
    pub async fn process(&self, event: &Event) -> ProcessReport {
        self.process_after(event, 0).await
    }

    /// [`Self::process`] for an event whose actions already made `failed_attempts` attempts
    /// elsewhere (a forwarder's pipelined batch publish): they get only the attempts left of
    /// their policy, after the delay that follows the last failed one.
    pub async fn process_after(&self, event: &Event, failed_attempts: u32) -> ProcessReport {
        self.metrics.events_received.inc();
        self.check_traceparent(event);
        let received = Instant::now();
        let mut outcomes = self.recent.as_ref().map(|_| Vec::new());
        let mut report = ProcessReport::default();
        let Some(slots) = self.index.get(event.entity.as_str()) else {
            self.record_recent(event, received, outcomes);
            tracing::debug!(
                "[observer] event {} ({} {}) matches no observer: none observes {}",
                event.id,
                event.entity,
                event.event,
                event.entity
            );
            return report;
        };
        let capture = self.spans.capture(event);
        let tracked = self.in_flight.track(event);
        for &i in &slots[kind_slot(event.event)] {
            let observer = &self.observers[i];
            if !backfill_is_for(event, &observer.name) {
                continue;
            }
            tracked.at(&observer.name);
            self.check_fields_present(observer, event);
            let matched = observer
                .condition
                .as_ref()
                .is_none_or(|c| c.evaluate(event.new.as_ref(), event.old.as_ref()));
            let span = self.spans.condition(&capture, &observer.name, matched);
            if !matched {
                span.end("no match", None);
                note(&mut outcomes, observer, Outcome::NoMatch);
                continue;
            }
            report.matched += 1;
            observer.metrics.matched.inc();
            if !self.claim(observer, event, &mut report).await {
                span.end("duplicate", None);
                note(&mut outcomes, observer, Outcome::Duplicate);
                continue;
            }
            let started = Instant::now();
            if tracing::enabled!(tracing::Level::DEBUG) {
                tracing::debug!(
                    "[observer] {} fired: {}",
                    observer.name,
                    summary(observer, event)
                );
            }
            let mut unstored = 0;
            let mut dead_lettered = 0;
            for (action_index, (action, metrics)) in observer.actions.iter().enumerate() {
                let spans = self.spans.enabled().then_some((&self.spans, &span));
                let attempts = run_with_retries(
                    observer,
                    action.as_ref(),
                    metrics,
                    event,
                    failed_attempts,
                    spans,
                );
                if let Err(failure) = attempts.await {
                    report.dead_lettered += 1;
                    dead_lettered += 1;
                    if !self
                        .dead_letter(observer, action_index, action.as_ref(), event, failure)
                        .await
                    {
                        unstored += 1;
                    }
                }
            }
            if unstored > 0 {
                report.unstored += unstored;
                self.release(observer, event).await;
            }
            tracing::debug!(
                "[observer] {} completed in {}ms",
                observer.name,
                started.elapsed().as_millis()
            );
            if dead_lettered > 0 {
                span.end("dead_lettered", Some("an action was dead-lettered"));
            } else {
                span.end("success", None);
            }
            let outcome = match (unstored, dead_lettered) {
                (0, 0) => Outcome::Delivered,
                (0, _) => Outcome::DeadLettered,
                _ => Outcome::Unstored,
            };
            note(&mut outcomes, observer, outcome);
        }
        capture.end("done", None);
        self.record_recent(event, received, outcomes);
        if report.matched == 0 {
            tracing::debug!(
                "[observer] event {} ({} {}) matches no observer",
                event.id,
                event.entity,
                event.event
            );
        }
        report
    }

    fn record_recent(
        &self,
        event: &Event,
        received: Instant,
        outcomes: Option<Vec<ObserverOutcome>>,
    ) {
        if let (Some(recent), Some(outcomes)) = (&self.recent, outcomes) {
            recent.record(event, received, outcomes);
        }
    }

    /// Keeps the last `capacity` events processed and what each observer did with them
    /// ([`Self::recent_events`]).
    pub fn with_recent(mut self, capacity: usize) -> Self {
        self.recent = Some(Recent::new(capacity));
        self
    }

    /// The last events processed, newest first (empty unless [`Self::with_recent`]).
    pub fn recent_events(&self, limit: usize) -> Vec<RecentEvent> {
        self.recent
            .as_ref()
            .map(|r| r.newest(limit))
            .unwrap_or_default()
    }

    /// Each observer as the console shows it: what it watches, its condition, its actions
    /// and their counts so far.
    pub fn overview(&self) -> Vec<ObserverOverview> {
        self.observers
            .iter()
            .map(CompiledObserver::overview)
            .collect()
    }

    /// Reports each field `observer` reads that the change's row lacks: logged once per
    /// observer and field, counted every time, listed by [`Engine::missing_fields`].
    #[inline]
    fn check_fields_present(&self, observer: &CompiledObserver, event: &Event) {
        let Some(Value::Object(row)) = event.row() else {
            return;
        };
        for field in observer.reads.iter().filter(|f| !row.contains_key(&***f)) {
            self.metrics.missing_field(&observer.name, field);
            let mut seen = self.missing_fields.lock().expect("missing fields lock");
            if seen
                .iter()
                .any(|m| m.observer == observer.name && m.field == **field)
            {
                continue;
            }
            tracing::warn!(
                "[observer] {}: change {} of {} has no field `{field}`, which its condition or \
                 a template reads (a column renamed or dropped?): its condition cannot match \
                 and templates render it empty (counted in \
                 fraiseql_observer_missing_fields_total; logged once per observer and field)",
                observer.name,
                event.id,
                event.entity
            );
            if seen.len() < MAX_MISSING_FIELDS {
                seen.push(MissingField {
                    observer: observer.name.clone(),
                    entity: event.entity.clone(),
                    field: field.to_string(),
                    event_id: event.id.clone(),
                    first_seen: now_rfc3339(),
                });
            }
        }
    }

    /// The fields observers read that captured changes lacked, first seen first.
    pub fn missing_fields(&self) -> Vec<MissingField> {
        self.missing_fields
            .lock()
            .expect("missing fields lock")
            .clone()
    }

    /// A trace context that is not one is delivered without (the telemetry checks it where
    /// it is used), counted and logged once.
    fn check_traceparent(&self, event: &Event) {
        let Some(tp) = &event.traceparent else {
            return;
        };
        if crate::telemetry::valid_traceparent(tp) {
            return;
        }
        self.metrics.traceparent_invalid.inc();
        if !self.warned_traceparent.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "[observers] event {} carries a traceparent that is not a W3C trace context \
                 ({:?}): delivered without it (counted in \
                 fraiseql_observer_traceparent_invalid_total; logged once)",
                event.id,
                tp.chars().take(80).collect::<String>()
            );
        }
    }

    /// Dead-letters `event` for every action of every observer it matches, without running
    /// them: for a source that gives up on a delivery (after `max_deliver`, a panic on the
    /// last delivery). `fraiseql dlq retry` can run them later. Returns the entries written;
    /// an error when one could not be stored (the delivery must not be acknowledged).
    pub async fn dead_letter_event(
        &self,
        event: &Event,
        error: &str,
        attempts: u32,
    ) -> Result<usize> {
        let Some(slots) = self.index.get(event.entity.as_str()) else {
            return Ok(0);
        };
        let mut written = 0;
        let mut unstored = 0;
        for &i in &slots[kind_slot(event.event)] {
            let observer = &self.observers[i];
            if let Some(condition) = &observer.condition {
                if !condition.evaluate(event.new.as_ref(), event.old.as_ref()) {
                    continue;
                }
            }
            let failure = Failure {
                error: error.to_owned(),
                attempts,
                first_failed_at: now_rfc3339(),
            };
            for (a, (action, _)) in observer.actions.iter().enumerate() {
                if self
                    .dead_letter(observer, a, action.as_ref(), event, failure.clone())
                    .await
                {
                    written += 1;
                } else {
                    unstored += 1;
                }
            }
        }
        if unstored > 0 {
            return Err(Error::dead_letter(
                DeadLetterErrorKind::Storage,
                format!(
                    "{unstored} dead letter(s) of event {} could not be stored",
                    event.id
                ),
            ));
        }
        Ok(written)
    }

    /// Forgets an EffectivelyOnce key recorded for an event that is delivered again because
    /// its dead letters could not be stored: the redelivery must run the actions, not skip.
    async fn release(&self, observer: &CompiledObserver, event: &Event) {
        let Some(store) = &observer.idempotency else {
            return;
        };
        if let Err(e) = store.forget(&observer.name, &event.id).await {
            tracing::error!(
                "[observer] {}: could not forget the idempotency key of event {} ({e}); its \
                 redelivery will be skipped as a duplicate",
                observer.name,
                event.id
            );
        }
    }

    /// EffectivelyOnce: records the key before the actions run. Returns false when the event
    /// was already processed by this observer (skip). A store that fails (its database
    /// restarting, say) is tried again under the observer's retry policy; when the attempts
    /// run out the event is dead-lettered, so it is neither lost nor run unguarded.
    async fn claim(
        &self,
        observer: &CompiledObserver,
        event: &Event,
        report: &mut ProcessReport,
    ) -> bool {
        let Some(store) = &observer.idempotency else {
            return true;
        };
        let max = observer.retry.max_attempts;
        let stamp = ClaimStamp::new();
        let record = |attempt: u32| async move {
            let recorded = store.claim(&observer.name, &event.id, stamp).await;
            let will_retry = |e| attempt < max && may_pass_later(e);
            if let Some(e) = recorded.as_ref().err().filter(|e| will_retry(e)) {
                tracing::warn!(
                    "[observer] {}: could not record idempotency key for event {} (attempt \
                     {attempt}/{max}): {e}; retrying",
                    observer.name,
                    event.id
                );
            }
            recorded
        };
        match observer.retry.run(record, may_pass_later).await {
            Ok(true) => true,
            Ok(false) => {
                report.duplicates += 1;
                observer.metrics.duplicates.inc();
                tracing::debug!(
                    "[observer] {} skipped duplicate event {}",
                    observer.name,
                    event.id
                );
                false
            }
            Err((e, attempts)) => {
                tracing::error!(
                    "[observer] {}: could not record idempotency key for event {} after \
                     {attempts} attempt(s): {e}",
                    observer.name,
                    event.id
                );
                report.dead_lettered += 1;
                let failure = Failure {
                    error: format!("idempotency store: {e}"),
                    attempts: 0,
                    first_failed_at: now_rfc3339(),
                };
                for (i, (action, _)) in observer.actions.iter().enumerate() {
                    if !self
                        .dead_letter(observer, i, action.as_ref(), event, failure.clone())
                        .await
                    {
                        report.unstored += 1;
                    }
                }
                false
            }
        }
    }

    /// True when the entry was stored (or dropped at the `max_dlq_size` cap, by design).
    async fn dead_letter(
        &self,
        observer: &CompiledObserver,
        action_index: usize,
        action: &dyn Action,
        event: &Event,
        failure: Failure,
    ) -> bool {
        let entry = DlqEntry {
            id: 0,
            origin: self.origin,
            event: event.clone(),
            observer: observer.name.clone(),
            action_index,
            action: action.describe(),
            error: failure.error,
            attempts: failure.attempts,
            first_failed_at: failure.first_failed_at,
            last_failed_at: now_rfc3339(),
            raw: None,
        };
        let what = format!("[observer] {} event {}", observer.name, event.id);
        self.store_dead_letter(entry, &what).await
    }

    /// Keeps input that could not become an event (a malformed change-log row or message)
    /// in the dead-letter queue, so nothing is dropped silently. The entry's observer is
    /// `source` (e.g. `postgres:fraiseql`), its action `decode`, and its event carries what
    /// could be read of the input as `new`; it cannot be retried, only inspected and purged.
    /// False when it could not be stored (the input must not be acknowledged).
    pub async fn dead_letter_undecodable(&self, source: &str, input: &Undecodable) -> bool {
        // What could be read of it, and the payload (as JSON if it is JSON).
        let mut described = match &input.context {
            Value::Object(fields) => fields.clone(),
            other => serde_json::Map::from_iter([("context".to_owned(), other.clone())]),
        };
        if let Some(raw) = &input.raw {
            let payload = serde_json::from_slice(raw)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(raw).into_owned()));
            described.insert("payload".to_owned(), payload);
        }
        let entry = DlqEntry {
            id: 0,
            event: Event {
                id: input.id.clone(),
                entity: String::new(),
                event: EventKind::Insert,
                table: String::new(),
                timestamp: now_rfc3339(),
                new: Some(Value::Object(described)),
                old: None,
                backfill: None,
                traceparent: None,
            },
            origin: DlqOrigin::Undecodable,
            observer: source.to_owned(),
            action_index: 0,
            action: UNDECODABLE_ACTION.to_owned(),
            error: format!("undecodable input: {}", input.reason),
            attempts: 1,
            first_failed_at: now_rfc3339(),
            last_failed_at: now_rfc3339(),
            raw: input.raw.clone(),
        };
        self.metrics.source_undecodable.inc();
        let what = format!("{source}: undecodable input {}", input.id);
        self.store_dead_letter(entry, &what).await
    }

    /// Pushes one entry and keeps the DLQ gauges true; `what` names it in the log line. True
    /// when it was stored or dropped at the cap; false when the queue failed.
    async fn store_dead_letter(&self, entry: DlqEntry, what: &str) -> bool {
        match self.dlq.push(entry).await {
            Ok(PushOutcome::Stored(id)) => {
                self.metrics.dlq_size.inc();
                tracing::warn!("{what}: moved event to the dead-letter queue (entry {id})");
                true
            }
            Ok(PushOutcome::Overflow) => {
                self.metrics.dlq_overflow.inc();
                tracing::error!("{what}: dead-letter queue full (max_dlq_size reached): dropped");
                true
            }
            Err(e) => {
                tracing::error!("{what}: could not write to the dead-letter queue: {e}");
                false
            }
        }
    }

    /// Re-runs a dead-lettered action (with its observer's retry policy) and removes the
    /// entry on success. Returns Ok(false) if the action failed again (the entry stays,
    /// with the new error). EffectivelyOnce keys are not consulted: a retry is deliberate.
    pub async fn retry_dead_letter(&self, id: u64) -> Result<bool> {
        let entry = self.dlq.get(id).await?.ok_or_else(|| {
            Error::dead_letter(
                DeadLetterErrorKind::NotFound,
                format!("no dead-letter entry with id {id}"),
            )
        })?;
        if entry.origin == DlqOrigin::Undecodable {
            return Err(Error::dead_letter(
                DeadLetterErrorKind::Undecodable,
                format!(
                    "entry {id} is input that {} could not decode ({}); there is nothing to \
                     re-run: inspect it with `fraiseql dlq show {id}`, then purge it",
                    entry.observer, entry.error
                ),
            ));
        }
        let observer = self
            .observers
            .iter()
            .find(|o| o.name == entry.observer)
            .ok_or_else(|| {
                Error::dead_letter(
                    DeadLetterErrorKind::ObserverGone,
                    format!(
                        "entry {id} belongs to observer `{}`, which is not declared any more",
                        entry.observer
                    ),
                )
            })?;
        let (action, metrics) = observer.actions.get(entry.action_index).ok_or_else(|| {
            Error::dead_letter(
                DeadLetterErrorKind::ObserverGone,
                format!(
                    "entry {id} names action #{} of `{}`, which has only {} actions now",
                    entry.action_index,
                    entry.observer,
                    observer.actions.len()
                ),
            )
        })?;
        match run_with_retries(observer, action.as_ref(), metrics, &entry.event, 0, None).await {
            Ok(()) => {
                if self.dlq.remove(id).await? {
                    self.metrics.dlq_size.dec();
                }
                Ok(true)
            }
            Err(failure) => {
                let failure = RetryFailure {
                    error: failure.error,
                    attempts: entry.attempts.saturating_add(failure.attempts),
                    last_failed_at: now_rfc3339(),
                };
                self.dlq.record_failure(id, &failure).await?;
                Ok(false)
            }
        }
    }

    /// Removes every DLQ entry; returns how many there were.
    pub async fn purge_dead_letters(&self) -> Result<usize> {
        let n = self.dlq.purge().await?;
        self.metrics.dlq_size.set(0);
        Ok(n)
    }
}

/// Whether another attempt of an idempotency-store call may succeed: a store that refused
/// the key itself (`CheckpointErrorKind::Rejected`) refuses it again, so the event is
/// dead-lettered at once rather than after the observer's whole retry budget.
fn may_pass_later(e: &Error) -> bool {
    match e {
        Error::Checkpoint(e) => e.kind().is_retryable(),
        _ => true,
    }
}

/// Records what `observer` did with the event, when recent events are kept.
fn note(
    outcomes: &mut Option<Vec<ObserverOutcome>>,
    observer: &CompiledObserver,
    outcome: Outcome,
) {
    if let Some(outcomes) = outcomes {
        outcomes.push(ObserverOutcome {
            observer: observer.name.clone(),
            outcome,
        });
    }
}

/// The distinct top-level fields an observer's condition and templates read.
fn fields_read(spec: &ObserverSpec) -> Box<[Box<str>]> {
    let mut fields: Vec<Box<str>> = Vec::new();
    let condition = spec.condition.iter().flat_map(|c| c.referenced_fields());
    let templates = spec.actions.iter().flat_map(|a| a.fields());
    for field in condition.map(str::to_owned).chain(templates) {
        if !fields.iter().any(|f| **f == *field) {
            fields.push(field.into());
        }
    }
    fields.into_boxed_slice()
}

/// One observer as the console shows it. Actions are shown by their safe description (a
/// webhook's URL without credentials or query, a Python handler's name): never a secret.
#[derive(Debug, Clone, Serialize)]
pub struct ObserverOverview {
    pub name: String,
    pub entity: String,
    pub event: EventKind,
    pub condition: Option<String>,
    /// The columns of per-key order, or `None` (any order).
    pub ordering: Option<Vec<String>>,
    pub effectively_once: bool,
    pub max_attempts: u32,
    pub matched: u64,
    pub duplicates: u64,
    pub actions: Vec<ActionOverview>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionOverview {
    pub kind: String,
    pub description: String,
    pub succeeded: u64,
    /// Used up their attempts or failed permanently (dead-lettered).
    pub failed: u64,
    /// Attempts that failed and were tried again.
    pub retried: u64,
}

impl CompiledObserver {
    fn overview(&self) -> ObserverOverview {
        ObserverOverview {
            name: self.name.clone(),
            entity: self.entity.clone(),
            event: self.event,
            condition: self.condition.as_ref().map(|c| c.source().to_owned()),
            ordering: self.ordering.clone(),
            effectively_once: self.idempotency.is_some(),
            max_attempts: self.retry.max_attempts,
            matched: self.metrics.matched.get(),
            duplicates: self.metrics.duplicates.get(),
            actions: self
                .actions
                .iter()
                .map(|(action, metrics)| ActionOverview {
                    kind: action.kind().to_owned(),
                    description: action.describe(),
                    succeeded: metrics.succeeded.get(),
                    failed: metrics.failed_total(),
                    retried: metrics.retried_total(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct Failure {
    error: String,
    attempts: u32,
    first_failed_at: String,
}

/// Runs one action under the observer's retry policy, after `failed_attempts` attempts made
/// elsewhere.
/// Runs `action` until it succeeds, fails permanently or uses up its attempts; with `spans`,
/// each attempt is a span under the observer's `condition` span.
async fn run_with_retries(
    observer: &CompiledObserver,
    action: &dyn Action,
    metrics: &ActionMetrics,
    event: &Event,
    failed_attempts: u32,
    spans: Option<(&Spans, &Recorded)>,
) -> std::result::Result<(), Failure> {
    let max = observer.retry.max_attempts;
    let mut first_failed_at = None;
    if failed_attempts > 0 {
        if failed_attempts >= max {
            return Err(Failure {
                error: format!("not delivered in {failed_attempts} attempt(s)"),
                attempts: failed_attempts,
                first_failed_at: now_rfc3339(),
            });
        }
        first_failed_at = Some(now_rfc3339());
        tokio::time::sleep(observer.retry.delay_after(failed_attempts)).await;
    }
    for attempt in failed_attempts + 1..=max {
        let started = Instant::now();
        let span = spans.map(|(spans, condition)| spans.action(condition, action.kind(), attempt));
        let limit = action.timeout();
        let timed = async {
            tokio::time::timeout(limit, action.execute(event))
                .await
                .unwrap_or_else(|_| {
                    Err(ActionError::retryable(format!(
                        "{} did not finish within its timeout of {} ms",
                        action.describe(),
                        limit.as_millis()
                    ))
                    .with_reason(FailureReason::Timeout))
                })
        };
        let outcome = match &span {
            Some(span) => span.scope(timed).await,
            None => timed.await,
        };
        metrics.duration.observe(started.elapsed().as_secs_f64());
        if let Some(span) = span {
            match &outcome {
                Ok(()) => span.end("success", None),
                Err(e) if e.retryable && attempt < max => span.end("retry", Some(&e.message)),
                Err(e) => span.end("failed", Some(&e.message)),
            }
        }
        let err: ActionError = match outcome {
            Ok(()) => {
                metrics.succeeded.inc();
                if attempt > 1 {
                    tracing::debug!(
                        "[observer] {} delivered on attempt {attempt}",
                        action.describe()
                    );
                }
                return Ok(());
            }
            Err(e) => e,
        };
        let failed_at = first_failed_at.get_or_insert_with(now_rfc3339);
        tracing::debug!(
            "[observer] {} failed: {} (attempt {attempt}/{max})",
            action.describe(),
            last_line(&err.message)
        );
        if !err.retryable || attempt == max {
            metrics.failed(err.reason);
            return Err(Failure {
                error: err.message,
                attempts: attempt,
                first_failed_at: failed_at.clone(),
            });
        }
        metrics.retried(err.reason);
        let mut delay = observer.retry.delay_after(attempt);
        if let Some(asked) = err.retry_after {
            delay = asked.min(observer.retry.max_delay).max(delay);
        }
        tracing::debug!(
            "[observer] Retrying in {}ms ({} backoff)",
            delay.as_millis(),
            observer.retry.backoff.as_str()
        );
        tokio::time::sleep(delay).await;
    }
    unreachable!("max_attempts is at least 1")
}

/// The last non-empty line: for a traceback, the exception itself.
fn last_line(s: &str) -> &str {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(s)
}

/// `Order{id=ord_123, total=1250.00}`: the id and the fields the condition looks at.
fn summary(observer: &CompiledObserver, event: &Event) -> String {
    let mut out = format!("{}{{", event.entity);
    let row = event.row();
    let mut fields = vec!["id"];
    if let Some(c) = &observer.condition {
        for f in c.referenced_fields() {
            if !fields.contains(&f) {
                fields.push(f);
            }
        }
    }
    for (n, field) in fields.iter().enumerate() {
        let value = row.and_then(|r| r.get(*field));
        let shown = match value {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "null".to_owned(),
        };
        let sep = if n == 0 { "" } else { ", " };
        let _ = write!(out, "{sep}{field}={shown}");
    }
    out.push('}');
    out
}
