//! Prometheus metrics of the engine (`fraiseql_observer_*`). Per-observer handles are
//! resolved once at build time so the hot path only bumps atomics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::action::FailureReason;

type Labels = Vec<(String, String)>;

fn action_latency_histogram() -> Histogram {
    // 100 µs … ~52 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    pub events_received: Counter,
    pub events_matched: Family<Labels, Counter>,
    pub duplicates_skipped: Family<Labels, Counter>,
    pub actions_succeeded: Family<Labels, Counter>,
    pub actions_failed: Family<Labels, Counter>,
    pub actions_retried: Family<Labels, Counter>,
    pub action_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub dlq_size: Gauge,
    pub dlq_overflow: Counter,
    pub events_in_flight: Gauge,
    /// Change-log rows after the postgres source's cursor (capped, see the source).
    pub changelog_lag_rows: Gauge,
    /// Age of the oldest change-log row not yet processed; 0 when caught up.
    pub changelog_lag_seconds: Gauge<f64, AtomicU64>,
    /// Batches the postgres source read and processed.
    pub source_batches: Counter,
    /// Change-log rows or messages that could not be decoded (dead-lettered).
    pub source_undecodable: Counter,
}

/// The handles one (observer, action) pair updates. Failures are counted per reason, so
/// those counters are looked up when a failure happens (off the success path).
#[derive(Clone)]
pub struct ActionMetrics {
    pub succeeded: Counter,
    pub duration: Histogram,
    labels: Labels,
    failed: Family<Labels, Counter>,
    retried: Family<Labels, Counter>,
}

impl ActionMetrics {
    fn with_reason(&self, reason: FailureReason) -> Labels {
        let mut labels = self.labels.clone();
        labels.push(("reason".to_owned(), reason.as_label().to_owned()));
        labels
    }

    /// An action that exhausted its retries or failed permanently.
    pub fn failed(&self, reason: FailureReason) {
        self.failed.get_or_create(&self.with_reason(reason)).inc();
    }

    /// An attempt that failed and will be retried.
    pub fn retried(&self, reason: FailureReason) {
        self.retried.get_or_create(&self.with_reason(reason)).inc();
    }
}

/// The handles one observer updates.
#[derive(Clone)]
pub struct ObserverMetrics {
    pub matched: Counter,
    pub duplicates: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::new_with(|_| {})
    }

    /// With more metrics in the same registry (a transport's, e.g. `fraiseql_nats_*`), so
    /// one `/metrics` serves them all.
    pub fn new_with(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            events_received: Counter::default(),
            events_matched: Family::default(),
            duplicates_skipped: Family::default(),
            actions_succeeded: Family::default(),
            actions_failed: Family::default(),
            actions_retried: Family::default(),
            action_duration: Family::new_with_constructor(action_latency_histogram),
            dlq_size: Gauge::default(),
            dlq_overflow: Counter::default(),
            events_in_flight: Gauge::default(),
            changelog_lag_rows: Gauge::default(),
            changelog_lag_seconds: Gauge::default(),
            source_batches: Counter::default(),
            source_undecodable: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "fraiseql_observer_events_received",
            "Change events received by the engine",
            m.events_received.clone(),
        );
        registry.register(
            "fraiseql_observer_events_matched",
            "Events whose entity, event and condition matched an observer",
            m.events_matched.clone(),
        );
        registry.register(
            "fraiseql_observer_duplicates_skipped",
            "EffectivelyOnce deliveries skipped because the key was already recorded",
            m.duplicates_skipped.clone(),
        );
        registry.register(
            "fraiseql_observer_actions_succeeded",
            "Actions that completed",
            m.actions_succeeded.clone(),
        );
        registry.register(
            "fraiseql_observer_actions_failed",
            "Actions that exhausted their retries or failed permanently, by reason",
            m.actions_failed.clone(),
        );
        registry.register(
            "fraiseql_observer_actions_retried",
            "Action attempts that failed and were retried, by reason",
            m.actions_retried.clone(),
        );
        registry.register(
            "fraiseql_observer_action_duration_seconds",
            "Duration of one action attempt",
            m.action_duration.clone(),
        );
        registry.register(
            "fraiseql_observer_dlq_size",
            "Entries in the dead-letter queue",
            m.dlq_size.clone(),
        );
        registry.register(
            "fraiseql_observer_dlq_overflow",
            "Dead-letter entries dropped because max_dlq_size was reached",
            m.dlq_overflow.clone(),
        );
        registry.register(
            "fraiseql_observer_events_in_flight",
            "Events accepted and not yet fully processed",
            m.events_in_flight.clone(),
        );
        registry.register(
            "fraiseql_observer_changelog_lag_rows",
            "Change-log rows not yet processed by this instance's postgres source",
            m.changelog_lag_rows.clone(),
        );
        registry.register(
            "fraiseql_observer_changelog_lag_seconds",
            "Age of the oldest change-log row not yet processed",
            m.changelog_lag_seconds.clone(),
        );
        registry.register(
            "fraiseql_observer_source_batches",
            "Change-log batches read and processed",
            m.source_batches.clone(),
        );
        registry.register(
            "fraiseql_observer_source_undecodable",
            "Change-log rows or messages that could not be decoded and were dead-lettered",
            m.source_undecodable.clone(),
        );
        extra(&mut registry);
        Metrics { registry, ..m }
    }

    pub fn observer(&self, observer: &str) -> ObserverMetrics {
        let labels = vec![("observer".to_owned(), observer.to_owned())];
        ObserverMetrics {
            matched: self.events_matched.get_or_create(&labels).clone(),
            duplicates: self.duplicates_skipped.get_or_create(&labels).clone(),
        }
    }

    pub fn action(&self, observer: &str, action: &str) -> ActionMetrics {
        let labels = vec![
            ("observer".to_owned(), observer.to_owned()),
            ("action".to_owned(), action.to_owned()),
        ];
        ActionMetrics {
            succeeded: self.actions_succeeded.get_or_create(&labels).clone(),
            duration: self.action_duration.get_or_create(&labels).clone(),
            labels,
            failed: self.actions_failed.clone(),
            retried: self.actions_retried.clone(),
        }
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Redis transport metrics (`fraiseql_redis_*`). Cheap to clone handles; register them once.
#[derive(Clone, Debug, Default)]
pub struct RedisMetrics {
    /// `fraiseql_redis_entries_forwarded_total`: change-log rows appended (XADD confirmed).
    pub forwarded: Counter,
    /// `fraiseql_redis_entries_received_total`: entries read or reclaimed from the group.
    pub received: Counter,
    /// `fraiseql_redis_entries_pending`: entries received and not yet acknowledged.
    pub pending: Gauge,
    /// `fraiseql_redis_entries_reclaimed_total`: entries taken over from an idle consumer.
    pub reclaimed: Counter,
    /// `fraiseql_redis_entries_dead_lettered_total`: malformed or over `max_deliver`.
    pub dead_lettered: Counter,
}

impl RedisMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric (counters get `_total` from the encoder).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fraiseql_redis_entries_forwarded",
            "Change-log rows appended to the Redis stream",
            self.forwarded.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_received",
            "Entries read from the Redis consumer group",
            self.received.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_pending",
            "Entries received and not yet acknowledged",
            self.pending.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_reclaimed",
            "Entries reclaimed from idle consumers",
            self.reclaimed.clone(),
        );
        registry.register(
            "fraiseql_redis_entries_dead_lettered",
            "Entries dead-lettered by the Redis transport (malformed or over max_deliver)",
            self.dead_lettered.clone(),
        );
    }
}
